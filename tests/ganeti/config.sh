# Settings of the throw-away Ganeti cluster used by snf-image's integration
# tests (tests/test_ganeti.py). Sourced by up.sh, down.sh and gnt-ns; every
# value can be overridden from the environment (SNF_GNT_*).
#
# The whole cluster lives in its own network namespace: the node address and
# the master address sit on a bridge with no ports inside it, so nothing the
# cluster (or a guest it boots) sends can leave the namespace. In the host
# namespace up.sh adds an "unreachable" route for the cluster's addresses, so
# that a gnt-* command run outside the namespace by mistake reaches nothing.

SNF_GNT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SNF_GNT_NS=${SNF_GNT_NS:-snf-gnt}                 # network namespace
SNF_GNT_BRIDGE=${SNF_GNT_BRIDGE:-gnt-br0}         # inside the namespace
SNF_GNT_DOMAIN=${SNF_GNT_DOMAIN:-gnt.test}
SNF_GNT_NODE_IP=${SNF_GNT_NODE_IP:-10.77.0.1}
SNF_GNT_MASTER_IP=${SNF_GNT_MASTER_IP:-10.77.0.254}
SNF_GNT_PREFIX=${SNF_GNT_PREFIX:-24}
SNF_GNT_CLUSTER=${SNF_GNT_CLUSTER:-cluster.$SNF_GNT_DOMAIN}
SNF_GNT_SHORT=${SNF_GNT_SHORT:-$(hostname -s)}
SNF_GNT_NODE=${SNF_GNT_NODE:-$SNF_GNT_SHORT.$SNF_GNT_DOMAIN}
# inst1..inst9.$SNF_GNT_DOMAIN resolve to ${SNF_GNT_INSTANCE_NET}.11 .. .19
SNF_GNT_INSTANCE_NET=${SNF_GNT_INSTANCE_NET:-10.77.0}
SNF_GNT_HOST_BLOCK=${SNF_GNT_HOST_BLOCK:-10.77.0.0/16}
SNF_GNT_KVM=${SNF_GNT_KVM:-/usr/bin/qemu-system-x86_64}
SNF_GNT_FILE_DIR=${SNF_GNT_FILE_DIR:-/srv/ganeti/file-storage}
SNF_GNT_SHARED_DIR=${SNF_GNT_SHARED_DIR:-/srv/ganeti/shared-file-storage}
SNF_GNT_OS_DIR=${SNF_GNT_OS_DIR:-/srv/ganeti/os}
# what up.sh created (so that down.sh removes exactly that and no more)
SNF_GNT_STATE=${SNF_GNT_STATE:-/var/lib/snf-image-ganeti-test}
SNF_GNT_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# Run a command in the namespace with the small environment an init script
# would have. Daemons started this way inherit it, and Ganeti hands the
# daemon environment on to the OS import/export scripts, so nothing of the
# caller's environment must leak in.
snf_gnt_ns() {
  env -i PATH="$SNF_GNT_PATH" LANG=C.UTF-8 TERM=dumb HOME=/root \
    ip netns exec "$SNF_GNT_NS" "$@"
}

snf_gnt_have_ns() {
  local names
  names=$(ip netns list 2>/dev/null | awk '{print $1}')
  [[ $'\n'"$names"$'\n' == *$'\n'"$SNF_GNT_NS"$'\n'* ]]
}

snf_gnt_log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
