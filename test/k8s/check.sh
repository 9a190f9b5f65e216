#!/usr/bin/env bash
# make k8s-check: podkeeper's Kubernetes packaging against a real kube-apiserver.
#  1. builds kube-apiserver + kubectl v1.34.4 and etcd v3.6.4 from the Go module proxy (build.sh; cached in
#     .cache/k8s/bin: ~25 min cold on 2 shared cores, instant warm);
#  2. generates a throwaway PKI and starts etcd + kube-apiserver on 127.0.0.1, random free ports;
#  3. renders manifests/, every kustomize/overlays/* and kustomize/examples/files-api (podkeeper fetched from
#     a local git clone pinned to the example's tag) with the kubectl built in 1 and applies each with
#     server-side dry-run into its namespace (Pod Security "restricted" enforced): any warning fails;
#  4. runs test/k8s's Go tests with PODKEEPER_K8S_API=1: bare-Pod dry-runs of every pod template (PSA
#     rejects violations on Pods), RBAC with a real token of the agents' ServiceAccount, agents/kube
#     posting Events and reading labels, the injector called by the apiserver over TLS
#     (TestAPIInjector: caBundle set by the injector, Pods injected, latency p99 printed), and promtool
#     on kustomize/monitoring's rules (TestMonitoringRules: check rules + rules_test.yaml).
# Everything runs under a temp dir in .cache/k8s and is stopped (by PID) on exit.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
. "$ROOT/test/host-deps.sh"
host_deps openssl:openssl bc:bc curl:curl python3:python3 promtool:prometheus
"$ROOT/test/k8s/build.sh"
BIN=$ROOT/.cache/k8s/bin
mkdir -p "$ROOT/.cache/k8s/tmp"
W=$(mktemp -d "$ROOT/.cache/k8s/tmp/check.XXXXXX")
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  [ "${KEEP:-0}" = 1 ] || rm -rf "$W"
}
trap cleanup EXIT

freeport() { # a port nothing listens on now (random in 20000-59999)
  local p
  while :; do
    p=$((20000 + RANDOM % 40000))
    (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return; }
  done
}
ETCD_PORT=$(freeport); PEER_PORT=$(freeport); API_PORT=$(freeport)

# --- PKI: CA, apiserver serving cert, admin client cert, service-account signing key.
P=$W/pki; mkdir -p "$P"
(
  cd "$P"
  openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -subj "/CN=podkeeper-test-ca" -days 2 -out ca.crt 2>/dev/null
  printf 'keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n' >server.ext
  printf 'keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n' >client.ext
  openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -subj "/CN=kube-apiserver" -out apiserver.csr 2>/dev/null
  openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -extfile server.ext -out apiserver.crt 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -keyout admin.key -subj "/O=system:masters/CN=admin" -out admin.csr 2>/dev/null
  openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -extfile client.ext -out admin.crt 2>/dev/null
  openssl genrsa -out sa.key 2048 2>/dev/null
  openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
)
export KUBECONFIG=$W/admin.kubeconfig
cat >"$KUBECONFIG" <<X
apiVersion: v1
kind: Config
clusters:
- name: test
  cluster: {certificate-authority: $P/ca.crt, server: "https://127.0.0.1:$API_PORT"}
users:
- name: admin
  user: {client-certificate: $P/admin.crt, client-key: $P/admin.key}
contexts:
- name: test
  context: {cluster: test, user: admin}
current-context: test
X

# --- etcd + kube-apiserver
t0=$(date +%s.%N)
# A port free a moment ago can be taken by another process (tests run in parallel on this machine)
# before etcd binds it: a bind failure picks new ports and starts again, up to five times.
start_etcd() {
  local try
  for try in 1 2 3 4 5; do
    rm -rf "$W/etcd"
    "$BIN/etcd" --name=test --data-dir="$W/etcd" --unsafe-no-fsync \
      --listen-client-urls="http://127.0.0.1:$ETCD_PORT" --advertise-client-urls="http://127.0.0.1:$ETCD_PORT" \
      --listen-peer-urls="http://127.0.0.1:$PEER_PORT" --initial-advertise-peer-urls="http://127.0.0.1:$PEER_PORT" \
      --initial-cluster="test=http://127.0.0.1:$PEER_PORT" --listen-metrics-urls="" >"$W/etcd.log" 2>&1 </dev/null &
    ETCD_PID=$!
    for _ in $(seq 1 300); do
      curl -sf "http://127.0.0.1:$ETCD_PORT/health" >/dev/null 2>&1 && return 0
      kill -0 "$ETCD_PID" 2>/dev/null || break
      sleep 0.1
    done
    kill "$ETCD_PID" 2>/dev/null; wait "$ETCD_PID" 2>/dev/null || true
    grep -q "address already in use" "$W/etcd.log" || { echo "etcd did not start:"; tail -20 "$W/etcd.log"; exit 1; }
    echo "etcd: a port was taken meanwhile (try $try); new ports"
    ETCD_PORT=$(freeport); PEER_PORT=$(freeport)
  done
  echo "etcd: no free ports after 5 tries"; exit 1
}
start_etcd
PIDS+=("$ETCD_PID")
"$BIN/kube-apiserver" --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
  --bind-address=127.0.0.1 --secure-port="$API_PORT" --advertise-address=127.0.0.1 \
  --endpoint-reconciler-type=none --tls-cert-file="$P/apiserver.crt" --tls-private-key-file="$P/apiserver.key" \
  --client-ca-file="$P/ca.crt" --authorization-mode=RBAC \
  --service-account-key-file="$P/sa.pub" --service-account-signing-key-file="$P/sa.key" \
  --service-account-issuer=https://kubernetes.default.svc.cluster.local \
  --api-audiences=https://kubernetes.default.svc.cluster.local \
  --service-cluster-ip-range=10.0.0.0/24 --profiling=false >"$W/kube-apiserver.log" 2>&1 </dev/null &
PIDS+=($!)
for _ in $(seq 1 1200); do
  curl -sf --cacert "$P/ca.crt" --cert "$P/admin.crt" --key "$P/admin.key" "https://127.0.0.1:$API_PORT/readyz" >/dev/null 2>&1 && break
  kill -0 "${PIDS[1]}" 2>/dev/null || { echo "kube-apiserver died:"; tail -30 "$W/kube-apiserver.log"; exit 1; }
  sleep 0.1
done
curl -sf --cacert "$P/ca.crt" --cert "$P/admin.crt" --key "$P/admin.key" "https://127.0.0.1:$API_PORT/readyz" >/dev/null ||
  { echo "kube-apiserver not ready"; tail -30 "$W/kube-apiserver.log"; exit 1; }
printf 'etcd + kube-apiserver %s ready on 127.0.0.1:%s after %.1fs\n' "$("$BIN/kubectl" version -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["serverVersion"]["gitVersion"])')" "$API_PORT" "$(echo "$(date +%s.%N) - $t0" | bc)"
K=("$BIN/kubectl")

# --- render + server-side dry-run, zero warnings
fail=0
dryrun() { # name file [file to apply for real, default: file]
  local name=$1 f=$2 real=${3:-$2} ns objs nss
  objs=$("${K[@]}" create --dry-run=client -f "$f" -o jsonpath='{.kind}{" "}{.metadata.name}{" "}{.metadata.namespace}{"\n"}')
  nss=$(echo "$objs" | awk '$1 == "Namespace" { print $2 } $1 != "Namespace" && $3 != "" { print $3 }' | sort -u)
  for ns in $nss; do
    if ! echo "$objs" | grep -q "^Namespace $ns "; then
      # A namespace the source does not create (overlays/aws): made here, restricted like ours.
      "${K[@]}" create ns "$ns" --dry-run=client -o yaml >"$W/ns.yaml"
      "${K[@]}" apply --server-side -f "$W/ns.yaml" >/dev/null
      "${K[@]}" label --overwrite ns "$ns" pod-security.kubernetes.io/enforce=restricted pod-security.kubernetes.io/warn=restricted >/dev/null
    fi
  done
  # The source's own Namespaces for real first (the only objects with this label): a dry-run
  # Namespace does not exist for the objects after it.
  if echo "$objs" | grep -q '^Namespace '; then
    "${K[@]}" apply --server-side -f "$f" -l pod-security.kubernetes.io/enforce=restricted >/dev/null
  fi
  for ns in $nss; do
    # What the controller-manager (not running here) would create; Pods need it.
    "${K[@]}" get sa default -n "$ns" >/dev/null 2>&1 || "${K[@]}" create sa default -n "$ns" >/dev/null
    [ "$("${K[@]}" get ns "$ns" -o jsonpath='{.metadata.labels.pod-security\.kubernetes\.io/enforce}')" = restricted ] ||
      { echo "FAIL $name: namespace $ns does not enforce restricted"; fail=1; }
  done
  if ! "${K[@]}" apply --server-side --dry-run=server -f "$f" >"$W/out" 2>"$W/err"; then
    echo "FAIL $name: dry-run rejected:"; cat "$W/err"; fail=1; return
  fi
  if [ -s "$W/err" ]; then echo "FAIL $name: warnings:"; cat "$W/err"; fail=1; return; fi
  # For real, so the bare-Pod checks find the ServiceAccount (no controllers run: nothing starts).
  "${K[@]}" apply --server-side -f "$real" >/dev/null
  echo "ok   $name: $(wc -l <"$W/out") objects accepted by server-side dry-run, 0 warnings"
}
R=$W/rendered; mkdir -p "$R"
cat manifests/namespace.yaml >"$R/manifests.yaml"
for f in manifests/*.yaml; do
  case $f in manifests/namespace.yaml | manifests/injector*.yaml) ;; *) { echo "---"; cat "$f"; } >>"$R/manifests.yaml" ;; esac
done
dryrun manifests "$R/manifests.yaml"
# The injector: all of it dry-run; for real all but its webhook configuration (which, with no
# injector running, would hold up every Pod of the other checks). TestAPIInjector creates that one
# pointed at injectors it runs on loopback.
"${K[@]}" kustomize kustomize/injector >"$R/injector.yaml"
python3 - "$R/injector.yaml" "$W/injector-apply.yaml" <<'PY'
import sys
docs = open(sys.argv[1]).read().split("\n---\n")
open(sys.argv[2], "w").write("\n---\n".join(d for d in docs if "kind: MutatingWebhookConfiguration" not in d))
PY
dryrun injector "$R/injector.yaml" "$W/injector-apply.yaml"
for d in kustomize/overlays/*/; do
  n=$(basename "$d")
  "${K[@]}" kustomize "$d" >"$R/overlay-$n.yaml"
  dryrun "overlay $n" "$R/overlay-$n.yaml"
done
# The files-api example as its user renders it: podkeeper fetched by kustomize from git, pinned to
# the example's tag, the GitHub address pointed at a local clone of this tree's kustomize/.
REPO=$W/podkeeper-remote; mkdir -p "$REPO" "$W/files-api"; cp -r kustomize "$REPO/"
ref=$(grep -o '?ref=v[0-9.]*' kustomize/examples/files-api/kustomization.yaml | head -1 | cut -d= -f2)
(cd "$REPO" && git init -q -b main && git add -A && git -c user.email=test@podkeeper -c user.name=test commit -qm t && git tag "$ref")
cp kustomize/examples/files-api/files-api.yaml "$W/files-api/"
sed "s#https://github.com/podkeeper/podkeeper#file://$REPO#g" kustomize/examples/files-api/kustomization.yaml >"$W/files-api/kustomization.yaml"
"${K[@]}" kustomize "$W/files-api" >"$R/example-files-api.yaml"
dryrun "example files-api (remote, $ref)" "$R/example-files-api.yaml"
[ $fail = 0 ] || exit 1

# --- Go tests against the apiserver
export PODKEEPER_K8S_API=1 PODKEEPER_K8S_RENDERED=$R PODKEEPER_K8S_KUBECONFIG=$KUBECONFIG
go test -count=1 -v -run 'API|Monitoring' ./test/k8s/ 2>&1 | tee "$W/go-test.log" | grep -E '^(=== RUN|--- |\s+\w+_test.go|ok|FAIL|PASS)' || true
grep -q '^ok' "$W/go-test.log" || { echo "k8s API tests failed (log: $W/go-test.log)"; KEEP=1; exit 1; }
echo "k8s-check passed"
