#!/usr/bin/env bash
# Runs INSIDE a private mount namespace (up.sh starts it with `unshare --mount --propagation private`).
# /var and /run get an overlay whose writable layer is under $RIG/data/nsfs, so what containerd, runc, the kubelet
# and CNI write to hard-coded paths (/run/containerd, /var/lib/cni, /var/log/pods...) lands in the rig and
# disappears with it, instead of changing the host. Then starts containerd + kubelet and waits for them.
set -euo pipefail
. "$(dirname "$0")/../lib.sh"
D=$RIG/data
mount --make-rshared /
for d in var run; do
  mkdir -p "$D/nsfs/$d-upper" "$D/nsfs/$d-work"
  mount -t overlay overlay -o "lowerdir=/$d,upperdir=$D/nsfs/$d-upper,workdir=$D/nsfs/$d-work" "/$d"
done
mkdir -p "$D/containerd/root" "$RUN/containerd/state" "$D/kubelet" "$D/pod-logs" "$D/cni-ipam"
export PATH=$RIG/root/usr/bin:$RIG/root/usr/sbin:$K8S_BIN:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# Offline guard: an image pull goes to a dead proxy on loopback and fails fast instead of reaching a registry.
HTTP_PROXY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 NO_PROXY= \
  containerd --config "$RIG/node/containerd.toml" >"$LOG/containerd.log" 2>&1 &
echo $! >"$RUN/containerd.pid"
for _ in $(seq 1 100); do [ -S "$CTR_SOCK" ] && ctr_ version >/dev/null 2>&1 && break; sleep 0.1; done
for t in "$RIG"/images/*.tar; do
  ctr_ images import "$t" >>"$LOG/image-import.log" 2>&1
done
# Pinned: the kubelet's image GC must never remove the sandbox image (it cannot be pulled back).
ctr_ images label registry.k8s.io/pause:3.10 io.cri-containerd.pinned=pinned >/dev/null 2>&1 || true
kubelet --config="$RIG/node/kubelet-config.yaml" --kubeconfig="$RIG/kubelet.kubeconfig" --root-dir="$D/kubelet" \
  --hostname-override="$NODE_NAME" --v="${KUBELET_V:-2}" >"$LOG/kubelet.log" 2>&1 &
echo $! >"$RUN/kubelet.pid"
wait
