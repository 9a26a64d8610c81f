#!/bin/bash
# Bring up the single-node Ganeti 3.0 cluster that snf-image's integration
# tests run against, inside network namespace $SNF_GNT_NS (see config.sh and
# README.md). Idempotent: a healthy cluster is left alone, a cluster whose
# daemons died is restarted, and from nothing everything is built (~10 s).
# Refuses to touch a Ganeti cluster that it did not create itself.
set -euo pipefail
. "$(dirname "$(readlink -f "$0")")/config.sh"
started=$(date +%s%N)
die() { echo "up.sh: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root"
for program in gnt-cluster ip socat fping "$SNF_GNT_KVM"; do
  command -v "$program" >/dev/null || die "$program is missing (run tools/install-deps.sh)"
done
if [ -s /var/lib/ganeti/config.data ] && [ ! -e "$SNF_GNT_STATE/cluster" ]; then
  die "a Ganeti cluster this script did not create exists (/var/lib/ganeti/config.data); refusing to touch it"
fi
mkdir -p "$SNF_GNT_STATE"
# gnt-cluster init records the node's SSH host key, so one must exist
if ! ls /etc/ssh/ssh_host_*_key.pub >/dev/null 2>&1; then
  snf_gnt_log "no SSH host key: generating them (ssh-keygen -A), as openssh-server's installation does"
  ssh-keygen -A
fi
# cron would run ganeti-watcher outside the namespace
if pgrep -x cron >/dev/null 2>&1; then
  snf_gnt_log "WARNING: cron is running; /etc/cron.d/ganeti would run ganeti-watcher outside the namespace"
fi

# ------------------------------------------------------------ network
# Host side: nothing may reach the cluster's addresses through the default route.
routes=$(ip route show table main)
if [[ "$routes" != *"unreachable $SNF_GNT_HOST_BLOCK"* ]]; then
  ip route add unreachable "$SNF_GNT_HOST_BLOCK"
  touch "$SNF_GNT_STATE/host-route"
fi
if ! snf_gnt_have_ns; then
  snf_gnt_log "creating network namespace $SNF_GNT_NS"
  ip netns add "$SNF_GNT_NS"
fi
ip -n "$SNF_GNT_NS" link set lo up
ip netns exec "$SNF_GNT_NS" sysctl -q -w net.ipv6.conf.default.disable_ipv6=1
# Ganeti refuses a loopback node address, and this kernel has no "dummy"
# interfaces: a bridge without ports carries the node and master addresses
# (and is the link of the instances' NICs).
if ! ip -n "$SNF_GNT_NS" link show "$SNF_GNT_BRIDGE" >/dev/null 2>&1; then
  ip -n "$SNF_GNT_NS" link add "$SNF_GNT_BRIDGE" type bridge
  ip netns exec "$SNF_GNT_NS" sysctl -q -w "net.ipv6.conf.$SNF_GNT_BRIDGE.disable_ipv6=1" || true
fi
ip -n "$SNF_GNT_NS" link set "$SNF_GNT_BRIDGE" up
addresses=$(ip -n "$SNF_GNT_NS" -4 addr show dev "$SNF_GNT_BRIDGE")
if [[ "$addresses" != *" $SNF_GNT_NODE_IP/"* ]]; then
  ip -n "$SNF_GNT_NS" addr add "$SNF_GNT_NODE_IP/$SNF_GNT_PREFIX" dev "$SNF_GNT_BRIDGE"
fi
# "ip netns exec" bind-mounts /etc/netns/NS/* over /etc/*: the namespace gets
# its own hosts file (this host becomes $SNF_GNT_NODE) without touching the host's.
mkdir -p "/etc/netns/$SNF_GNT_NS"
{
  echo "127.0.0.1 localhost"
  echo "$SNF_GNT_NODE_IP $SNF_GNT_NODE $SNF_GNT_SHORT $(hostname)"
  echo "$SNF_GNT_MASTER_IP $SNF_GNT_CLUSTER ${SNF_GNT_CLUSTER%%.*}"
  for i in 1 2 3 4 5 6 7 8 9; do
    echo "$SNF_GNT_INSTANCE_NET.1$i inst$i.$SNF_GNT_DOMAIN inst$i"
  done
} > "/etc/netns/$SNF_GNT_NS/hosts"
echo "nameserver 127.0.0.1" > "/etc/netns/$SNF_GNT_NS/resolv.conf"
fqdn=$(snf_gnt_ns python3 -c 'import socket; print(socket.getfqdn())')
[ "$fqdn" = "$SNF_GNT_NODE" ] || die "inside the namespace this host is '$fqdn', expected '$SNF_GNT_NODE'"

# ------------------------------------------------------------ storage
[ -d /srv/ganeti ] || touch "$SNF_GNT_STATE/srv-ganeti"
mkdir -p "$SNF_GNT_FILE_DIR" "$SNF_GNT_SHARED_DIR" "$SNF_GNT_OS_DIR"
# file disks are refused unless their directory is listed here
if [ ! -e "$SNF_GNT_STATE/file-storage-paths.orig" ] && [ ! -e "$SNF_GNT_STATE/file-storage-paths.absent" ]; then
  if [ -e /etc/ganeti/file-storage-paths ]; then
    cp -a /etc/ganeti/file-storage-paths "$SNF_GNT_STATE/file-storage-paths.orig"
  else
    touch "$SNF_GNT_STATE/file-storage-paths.absent"
  fi
fi
for d in "$SNF_GNT_FILE_DIR" "$SNF_GNT_SHARED_DIR"; do
  grep -qxF "$d" /etc/ganeti/file-storage-paths 2>/dev/null || echo "$d" >> /etc/ganeti/file-storage-paths
done

# ------------------------------------------------------------ cluster
master_answers() { snf_gnt_ns gnt-cluster getmaster >/dev/null 2>&1; }
wait_for_master() {
  for _ in $(seq 1 90); do master_answers && return 0; sleep 1; done
  die "the master daemons did not answer within 90 s"
}
daemons_running() {
  local daemon
  for daemon in ganeti-noded ganeti-confd ganeti-wconfd ganeti-luxid ganeti-rapi; do
    snf_gnt_ns /usr/lib/ganeti/daemon-util check "$daemon" >/dev/null 2>&1 || return 1
  done
}

if [ ! -s /var/lib/ganeti/config.data ]; then
  snf_gnt_log "initialising cluster $SNF_GNT_CLUSTER (node $SNF_GNT_NODE, $SNF_GNT_NODE_IP)"
  # leftovers of a half-destroyed cluster of ours make init refuse to run
  snf_gnt_ns /usr/lib/ganeti/daemon-util stop-all >/dev/null 2>&1 || true
  find /var/lib/ganeti -maxdepth 1 -type f -delete 2>/dev/null || true
  rm -rf /var/lib/ganeti/queue /var/lib/ganeti/export
  touch "$SNF_GNT_STATE/cluster"
  # PID 1 is not systemd here: daemon-util starts the daemons itself.
  # --user-shutdown=yes keeps ganeti-kvmd running. kvm_flag=disabled: qemu
  # runs guests under TCG (nested KVM hangs here); kernel_path= boots the
  # guest from its disk. The ipolicy allows the small disks the tests use.
  snf_gnt_ns gnt-cluster init \
    --no-ssh-init --no-etc-hosts \
    --master-netdev "$SNF_GNT_BRIDGE" --master-netmask "$SNF_GNT_PREFIX" \
    --enabled-hypervisors kvm,fake \
    -H "kvm:kvm_flag=disabled,kvm_path=$SNF_GNT_KVM,kernel_path=,vnc_bind_address=" \
    -N "mode=bridged,link=$SNF_GNT_BRIDGE" \
    --enabled-disk-templates file,sharedfile \
    --file-storage-dir "$SNF_GNT_FILE_DIR" --shared-file-storage-dir "$SNF_GNT_SHARED_DIR" \
    --user-shutdown=yes \
    --ipolicy-bounds-specs "min:disk-size=1,memory-size=32,cpu-count=1,disk-count=1,nic-count=0,spindle-use=0/max:disk-size=1048576,memory-size=65536,cpu-count=8,disk-count=16,nic-count=8,spindle-use=12" \
    "$SNF_GNT_CLUSTER"
  wait_for_master
elif ! daemons_running || ! master_answers; then
  snf_gnt_log "cluster exists; (re)starting its daemons"
  snf_gnt_ns /usr/lib/ganeti/daemon-util start-all
  wait_for_master
  snf_gnt_ns gnt-cluster activate-master-ip || true
else
  snf_gnt_log "cluster $SNF_GNT_CLUSTER is already up"
fi
snf_gnt_log "up.sh done in $(( ($(date +%s%N) - started) / 1000000 )) ms"
