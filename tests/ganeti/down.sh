#!/bin/bash
# Tear down what up.sh built: remove the instances, destroy the cluster, stop
# the Ganeti daemons and every qemu or other process left in the namespace,
# wipe the cluster's state and file storage, restore
# /etc/ganeti/file-storage-paths, delete the namespace and the host route.
# Safe to run again at any time; touches only what up.sh recorded as its own.
# Keeps /var/log/ganeti (SNF_GNT_PURGE_LOGS=1 empties it).
set -uo pipefail
. "$(dirname "$(readlink -f "$0")")/config.sh"
started=$(date +%s%N)
[ "$(id -u)" = 0 ] || { echo "down.sh: must run as root" >&2; exit 1; }
ours=0
[ -e "$SNF_GNT_STATE/cluster" ] && ours=1

if [ $ours = 1 ] && snf_gnt_have_ns && [ -s /var/lib/ganeti/config.data ]; then
  if snf_gnt_ns gnt-cluster getmaster >/dev/null 2>&1; then
    for instance in $(snf_gnt_ns gnt-instance list --no-headers -o name 2>/dev/null); do
      snf_gnt_log "removing instance $instance"
      snf_gnt_ns gnt-instance remove -f --ignore-failures --shutdown-timeout=0 "$instance" >/dev/null 2>&1 \
        || snf_gnt_log "  removing $instance failed; continuing"
    done
    snf_gnt_log "destroying the cluster"
    snf_gnt_ns gnt-cluster destroy --yes-do-it >/dev/null 2>&1 \
      || snf_gnt_log "  gnt-cluster destroy failed; cleaning up by hand"
  else
    snf_gnt_log "the master daemons do not answer; cleaning up by hand"
  fi
fi

if [ $ours = 1 ]; then
  # metad is started on demand and survives "gnt-cluster destroy"
  snf_gnt_have_ns && snf_gnt_ns /usr/lib/ganeti/daemon-util stop-all >/dev/null 2>&1
  # the cluster's guests, by Ganeti's pidfiles (only if the pid is still a qemu)
  for pidfile in /var/run/ganeti/kvm-hypervisor/pid/*; do
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile" 2>/dev/null)
    if [ -n "$pid" ] && grep -q qemu "/proc/$pid/cmdline" 2>/dev/null; then
      snf_gnt_log "killing qemu $pid ($pidfile)"
      kill "$pid" 2>/dev/null
    fi
  done
fi
# whatever still runs inside our namespace was started through it
if snf_gnt_have_ns; then
  for signal in TERM TERM KILL; do
    pids=$(ip netns pids "$SNF_GNT_NS" 2>/dev/null | tr '\n' ' ')
    [ -n "${pids// /}" ] || break
    snf_gnt_log "stopping processes left in namespace $SNF_GNT_NS (SIG$signal): $pids"
    for pid in $pids; do kill -s "$signal" "$pid" 2>/dev/null; done
    sleep 2
  done
fi

# ------------------------------------------------------------ state
if [ $ours = 1 ]; then
  snf_gnt_log "removing the cluster's state"
  find /var/lib/ganeti -mindepth 1 -maxdepth 1 -exec rm -rf {} + 2>/dev/null
  find /var/run/ganeti -mindepth 1 -maxdepth 1 -exec rm -rf {} + 2>/dev/null
  rm -rf "${SNF_GNT_FILE_DIR:?}"/* "${SNF_GNT_SHARED_DIR:?}"/* 2>/dev/null
  rm -f "$SNF_GNT_STATE/cluster"
fi
if [ -e "$SNF_GNT_STATE/file-storage-paths.orig" ]; then
  cp -a "$SNF_GNT_STATE/file-storage-paths.orig" /etc/ganeti/file-storage-paths
  rm -f "$SNF_GNT_STATE/file-storage-paths.orig"
elif [ -e "$SNF_GNT_STATE/file-storage-paths.absent" ]; then
  rm -f /etc/ganeti/file-storage-paths "$SNF_GNT_STATE/file-storage-paths.absent"
fi
if [ -e "$SNF_GNT_STATE/srv-ganeti" ]; then
  # up.sh created /srv/ganeti: remove the directories again if they are empty
  # (an OS definition still installed keeps them; the marker then stays too)
  rmdir "$SNF_GNT_FILE_DIR" "$SNF_GNT_SHARED_DIR" "$SNF_GNT_OS_DIR" /srv/ganeti 2>/dev/null
  [ -e /srv/ganeti ] || rm -f "$SNF_GNT_STATE/srv-ganeti"
fi
if [ "${SNF_GNT_PURGE_LOGS:-0}" = 1 ]; then
  find /var/log/ganeti -mindepth 1 -maxdepth 1 -exec rm -rf {} + 2>/dev/null
fi

# ------------------------------------------------------------ network
if snf_gnt_have_ns; then
  snf_gnt_log "deleting network namespace $SNF_GNT_NS"
  ip netns del "$SNF_GNT_NS"
fi
rm -rf "/etc/netns/$SNF_GNT_NS"
if [ -e "$SNF_GNT_STATE/host-route" ]; then
  ip route del unreachable "$SNF_GNT_HOST_BLOCK" 2>/dev/null
  rm -f "$SNF_GNT_STATE/host-route"
fi
rmdir "$SNF_GNT_STATE" 2>/dev/null
snf_gnt_log "down.sh done in $(( ($(date +%s%N) - started) / 1000000 )) ms"
exit 0
