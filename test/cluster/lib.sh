# Shared variables for the test/cluster scripts (sourced, not run).
# Everything the rig builds or writes lives under $RIG (default .cache/cluster, git-ignored); the Kubernetes
# binaries live in the packaging checks' cache ($K8S_BIN, default .cache/k8s/bin) so they are built once.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export RIG=${RIG:-$ROOT/.cache/cluster}
K8S_BIN=${K8S_BIN:-$ROOT/.cache/k8s/bin}
SRC=$ROOT/test/cluster
RUN=$RIG/run
LOG=$RIG/logs
PKI=$RIG/pki
NODE_NAME=${NODE_NAME:-$(hostname)}
CTR_SOCK=$RUN/containerd/containerd.sock

ctr_() { "$RIG/root/usr/bin/ctr" -a "$CTR_SOCK" -n k8s.io "$@"; }
kubectl_() { "$K8S_BIN/kubectl" --kubeconfig "$RIG/admin.kubeconfig" "$@"; }
alive() { [ -f "$RUN/$1.pid" ] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }
now() { date +%s.%N; }
since() { printf '%.1f' "$(echo "$(date +%s.%N) - $1" | bc)"; }
# subst FILE: copy a template with ${RIG} replaced by the rig's absolute path
subst() { sed "s|\${RIG}|$RIG|g" "$1"; }
APISERVER_PORT=${APISERVER_PORT:-16443}
ETCD_PORT=${ETCD_PORT:-22379}
