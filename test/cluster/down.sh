#!/usr/bin/env bash
# Stops what up.sh started, in reverse: pods (gracefully, DELETE_PODS=1 default), scheduler, controller-manager,
# kubelet, remaining containers (via ctr), containerd and leftover shims (only processes whose binary is under
# $RIG), the mount namespace, kube-apiserver, etcd. Removes the kubepods cgroups and restores the kernel tunables
# the kubelet changed. WIPE=1 also deletes cluster state (etcd, containerd, kubelet); binaries, packages, PKI and
# images are kept. Safe to run when nothing is running.
set -uo pipefail
. "$(dirname "$0")/lib.sh"
stop_pid() { # name
  local f=$RUN/$1.pid pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    echo "stopped $1 ($pid)"
  fi
  rm -f "$f"
}
if [ "${DELETE_PODS:-1}" = 1 ] && alive kubelet && alive kube-apiserver; then
  kubectl_ delete pods --all -A --timeout=60s >/dev/null 2>&1 || echo "warning: pod deletion did not finish in 60s"
fi
stop_pid kube-scheduler
stop_pid kube-controller-manager
stop_pid kubelet
if [ -S "$CTR_SOCK" ] && alive containerd; then
  for t in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks kill -s SIGKILL "$t" >/dev/null 2>&1; done
  for _ in $(seq 1 50); do [ -z "$(ctr_ tasks ls -q 2>/dev/null | head -1)" ] && break; sleep 0.1
    for t in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks delete -f "$t" >/dev/null 2>&1; done; done
  for c in $(ctr_ containers ls -q 2>/dev/null); do ctr_ containers delete "$c" >/dev/null 2>&1; done
fi
stop_pid containerd
for p in /proc/[0-9]*; do
  exe=$(readlink "$p/exe" 2>/dev/null) || continue
  case "$exe" in "$RIG"/root/usr/bin/containerd-shim*) kill -KILL "${p#/proc/}" 2>/dev/null && echo "killed leftover shim ${p#/proc/}" ;; esac
done
stop_pid node-ns
# veth-self stops each Pod's nsfwd on CNI DEL; a Pod never torn down (containerd killed) leaves one
for f in "$RUN"/nsfwd/*.pid; do
  [ -f "$f" ] || continue
  pid=$(cat "$f")
  [ "$(readlink "/proc/$pid/exe" 2>/dev/null)" = "$(readlink -f "$RIG/cni/bin/nsfwd")" ] && kill "$pid" 2>/dev/null && echo "stopped leftover nsfwd $pid"
  rm -f "$f"
done
rm -f "$RUN/fwd-ports"
# cgroups the kubelet and runc created (cgroupfs driver): empty dirs, deepest first
for h in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/*/kubepods.slice /sys/fs/cgroup/unified/kubepods; do
  [ -d "$h" ] && find "$h" -depth -type d -exec rmdir {} \; 2>/dev/null
done
left=$(ls -d /sys/fs/cgroup/*/kubepods 2>/dev/null) && echo "warning: cgroups left: $left"
stop_pid kube-apiserver
stop_pid etcd
if [ -f "$RUN/sysctl-orig.txt" ]; then
  while read -r s v; do echo "$v" >"/proc/sys/$s"; done <"$RUN/sysctl-orig.txt" && rm -f "$RUN/sysctl-orig.txt" && echo "kernel tunables restored"
fi
if [ "${WIPE:-0}" = 1 ]; then
  rm -rf "$RIG/data" "$RUN/containerd"
  echo "cluster state wiped"
fi
exit 0
