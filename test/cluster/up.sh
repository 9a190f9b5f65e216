#!/usr/bin/env bash
# Starts the single-node cluster: etcd + kube-apiserver + kube-controller-manager + kube-scheduler on the host,
# containerd + kubelet in a private mount namespace (node/node-ns.sh). Waits until the Node is Ready and prints
# the time of each step. Already running and healthy: does nothing. FRESH=1 starts from empty state.
# Run test/cluster/build.sh first. kubectl: KUBECONFIG=$RIG/admin.kubeconfig (see env.sh).
# The apiserver and etcd use uncommon ports so the rig can run next to another test apiserver on 6443/2379;
# the kubelet's (10248, 10250) and the controllers' (10257, 10259) are fixed: one rig per machine.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
[ "$(id -u)" = 0 ] || { echo "up.sh needs root (mount namespace, cgroups, containerd); use KUBECONFIG instead" >&2; exit 1; }
[ "$(uname -s)" = Linux ] || { echo "up.sh runs on Linux only; use KUBECONFIG instead" >&2; exit 1; }
. "$ROOT/test/host-deps.sh"
host_deps curl:curl openssl:openssl jq:jq bc:bc ip:iproute2 nsenter:util-linux unshare:util-linux setsid:util-linux
for b in etcd kube-apiserver kubectl kubelet kube-controller-manager kube-scheduler; do
  [ -x "$K8S_BIN/$b" ] || { echo "missing $K8S_BIN/$b: run test/cluster/build.sh" >&2; exit 1; }
done
[ -x "$RIG/root/usr/bin/containerd" ] || { echo "missing containerd: run test/cluster/build.sh" >&2; exit 1; }
mkdir -p "$RUN" "$LOG" "$RIG/data" "$RIG/node"
apiserver_ready() { curl -sf --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" "https://127.0.0.1:$APISERVER_PORT/readyz" >/dev/null 2>&1; }
node_ready() { [ "$(kubectl_ get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ]; }

if [ "${FRESH:-0}" = 1 ]; then WIPE=1 "$SRC/down.sh"; fi
if alive etcd && alive kube-apiserver && alive node-ns && alive kube-controller-manager && alive kube-scheduler \
  && apiserver_ready && node_ready; then
  echo "cluster already up (node $NODE_NAME Ready)"; exit 0
fi
# Partly up (a crashed piece, an interrupted run): restart cleanly rather than guess.
if ls "$RUN"/*.pid >/dev/null 2>&1; then "$SRC/down.sh"; fi

"$SRC/gen-pki.sh"
subst "$SRC/node/containerd.toml" >"$RIG/node/containerd.toml"
subst "$SRC/node/kubelet-config.yaml" >"$RIG/node/kubelet-config.yaml"
# The kubelet rewrites these kernel tunables; down.sh puts the originals back.
[ -f "$RUN/sysctl-orig.txt" ] || for s in vm/overcommit_memory vm/panic_on_oom kernel/panic kernel/panic_on_oops kernel/keys/root_maxkeys kernel/keys/root_maxbytes; do
  echo "$s $(cat /proc/sys/$s)"
done >"$RUN/sysctl-orig.txt"

t0=$(now)
setsid "$K8S_BIN/etcd" --name=e2e --data-dir="$RIG/data/etcd" \
  --listen-client-urls="http://127.0.0.1:$ETCD_PORT" --advertise-client-urls="http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls="http://127.0.0.1:$((ETCD_PORT + 1))" --initial-advertise-peer-urls="http://127.0.0.1:$((ETCD_PORT + 1))" \
  --initial-cluster="e2e=http://127.0.0.1:$((ETCD_PORT + 1))" --listen-metrics-urls="http://127.0.0.1:$((ETCD_PORT + 2))" \
  --unsafe-no-fsync --quota-backend-bytes=4294967296 >"$LOG/etcd.log" 2>&1 </dev/null &
echo $! >"$RUN/etcd.pid"
for _ in $(seq 1 300); do
  curl -sf "http://127.0.0.1:$ETCD_PORT/health" >/dev/null 2>&1 && break
  alive etcd || { echo "etcd died:" >&2; tail -20 "$LOG/etcd.log" >&2; exit 1; }
  sleep 0.1
done
echo "phase up: etcd healthy after $(since "$t0")s"
t=$(now)
setsid "$K8S_BIN/kube-apiserver" --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
  --bind-address=127.0.0.1 --secure-port="$APISERVER_PORT" --advertise-address=127.0.0.1 \
  --endpoint-reconciler-type=none \
  --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" --client-ca-file="$PKI/ca.crt" \
  --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
  --service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key" \
  --service-account-issuer=https://kubernetes.default.svc.cluster.local \
  --api-audiences=https://kubernetes.default.svc.cluster.local --service-cluster-ip-range=10.0.0.0/24 \
  --kubelet-client-certificate="$PKI/apiserver-kubelet-client.crt" --kubelet-client-key="$PKI/apiserver-kubelet-client.key" \
  --kubelet-certificate-authority="$PKI/ca.crt" --kubelet-preferred-address-types=Hostname,InternalIP \
  --allow-privileged=true --profiling=false >"$LOG/kube-apiserver.log" 2>&1 </dev/null &
echo $! >"$RUN/kube-apiserver.pid"
for _ in $(seq 1 1200); do
  apiserver_ready && break
  alive kube-apiserver || { echo "kube-apiserver died:" >&2; tail -30 "$LOG/kube-apiserver.log" >&2; exit 1; }
  sleep 0.1
done
apiserver_ready || { echo "kube-apiserver not ready after 120s" >&2; exit 1; }
echo "phase up: kube-apiserver ready after $(since "$t")s"

t=$(now)
# A Node left from the last run still reads Ready until its status goes stale: let the kubelet register anew.
kubectl_ delete node "$NODE_NAME" --ignore-not-found --wait=false >/dev/null
setsid unshare --mount --propagation private "$SRC/node/node-ns.sh" >"$LOG/node-ns.log" 2>&1 </dev/null &
echo $! >"$RUN/node-ns.pid"
setsid "$K8S_BIN/kube-controller-manager" --kubeconfig="$RIG/controller-manager.kubeconfig" \
  --authentication-kubeconfig="$RIG/controller-manager.kubeconfig" --authorization-kubeconfig="$RIG/controller-manager.kubeconfig" \
  --bind-address=127.0.0.1 --secure-port=10257 --leader-elect=false --use-service-account-credentials=true \
  --service-account-private-key-file="$PKI/sa.key" --root-ca-file="$PKI/ca.crt" \
  --cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key" \
  --controllers='*,-cloud-node-lifecycle-controller,-service-lb-controller,-node-route-controller' \
  >"$LOG/kube-controller-manager.log" 2>&1 </dev/null &
echo $! >"$RUN/kube-controller-manager.pid"
setsid "$K8S_BIN/kube-scheduler" --kubeconfig="$RIG/scheduler.kubeconfig" \
  --authentication-kubeconfig="$RIG/scheduler.kubeconfig" --authorization-kubeconfig="$RIG/scheduler.kubeconfig" \
  --bind-address=127.0.0.1 --secure-port=10259 --leader-elect=false >"$LOG/kube-scheduler.log" 2>&1 </dev/null &
echo $! >"$RUN/kube-scheduler.pid"
for _ in $(seq 1 600); do
  if node_ready; then echo "phase up: node $NODE_NAME Ready after $(since "$t")s (cluster up in $(since "$t0")s)"; exit 0; fi
  alive node-ns || { echo "node-ns exited:" >&2; tail -20 "$LOG/node-ns.log" "$LOG/containerd.log" "$LOG/kubelet.log" >&2; exit 1; }
  sleep 0.5
done
echo "node not Ready after 300s" >&2; kubectl_ get node -o wide >&2; tail -30 "$LOG/kubelet.log" >&2; exit 1
