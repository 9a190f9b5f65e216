#!/usr/bin/env bash
# `make e2e`: the full Pod life cycle on a real kubelet.
#   1. build (cached): Kubernetes binaries, containerd/runc from Debian packages, the test images
#   2. start the offline single-node cluster (test/cluster/up.sh) and import the images into containerd
#   3. go test -tags e2e ./test/e2e/ (versitygw and the OTel fluent_forward receiver run on loopback)
#   4. stop the cluster and restore the host (test/cluster/down.sh), also on failure or Ctrl-C
# Prints the time of every phase. E2E_KEEP=1 leaves the cluster running afterwards (a rerun reuses it).
# Not root or not Linux (or E2E_CLUSTER=external): no rig; the tests use the cluster in $KUBECONFIG, whose node
# must be this machine (pods reach the test's S3 and log receiver on 127.0.0.1 through hostNetwork) and must
# already have the images (podkeeper.local/upload-app:e2e and `make image`'s; see test/e2e/README.md).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
. "$ROOT/test/cluster/lib.sh"
. "$ROOT/test/host-deps.sh"
cd "$ROOT"
host_deps bc:bc
T0=$(now)
phase() { echo "=== phase $1: $(since "$2")s"; }

MODE=${E2E_CLUSTER:-rig}
if [ "$MODE" = rig ] && { [ "$(id -u)" != 0 ] || [ "$(uname -s)" != Linux ]; }; then MODE=external; fi
if [ "$MODE" = external ]; then
  [ -n "${KUBECONFIG:-}" ] || { echo "e2e: not root on Linux, so no local rig, and KUBECONFIG is not set" >&2; exit 1; }
  echo "e2e: using the cluster in KUBECONFIG=$KUBECONFIG"
fi

t=$(now)
make --no-print-directory peers >/dev/null
phase "peers (versitygw, otelfwd)" "$t"

if [ "$MODE" = rig ]; then
  t=$(now)
  "$ROOT/test/cluster/build.sh"
  phase "build cluster binaries" "$t"
fi

t=$(now)
"$ROOT/test/e2e/images.sh"
phase "build images" "$t"

if [ "$MODE" = rig ]; then
  cleanup() { rc=$?; t=$(now); "$ROOT/test/cluster/down.sh"; phase "cluster down" "$t"; echo "=== e2e total: $(since "$T0")s (exit $rc)"; exit $rc; }
  [ "${E2E_KEEP:-0}" = 1 ] || trap cleanup EXIT
  t=$(now)
  "$ROOT/test/cluster/up.sh"
  for f in "$RIG"/images/e2e/*.tar; do ctr_ images import "$f" >/dev/null; done
  phase "cluster up + images imported" "$t"
  export KUBECONFIG=$RIG/admin.kubeconfig
  export E2E_APISERVER_PORT=$APISERVER_PORT
  # Pods with their own network namespace reach the test's loopback servers through nsfwd (veth-self),
  # for the ports the tests write here
  export E2E_FWD_PORTS=$RUN/fwd-ports
fi

t=$(now)
[ -f "$RIG/images/e2e/agents-missing" ] && export E2E_AGENTS_MISSING="$(cat "$RIG/images/e2e/agents-missing")"
export E2E_KUBECTL=${E2E_KUBECTL:-$K8S_BIN/kubectl}
[ -x "$E2E_KUBECTL" ] || E2E_KUBECTL=$(command -v kubectl)
go test -count=1 -tags e2e -timeout "${E2E_TIMEOUT:-30m}" -v ${E2E_RUN:+-run "$E2E_RUN"} ./test/e2e/
phase "go test -tags e2e" "$t"
