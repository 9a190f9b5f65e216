#!/usr/bin/env bash
# Builds the images the e2e tests run, as OCI archives in $RIG/images/e2e/ (imported into containerd by run.sh):
#  - podkeeper.local/upload-app:e2e: test/e2e/app, the stand-in upload app (one static binary, no base image)
#  - the agents' image: exactly what `make image` builds from Dockerfile.agents (buildah) and exports
#    (docker-archive) — not a separate recipe
set -euo pipefail
. "$(dirname "$0")/../cluster/lib.sh"
OUT=$RIG/images/e2e
mkdir -p "$OUT"
cd "$ROOT"
export CGO_ENABLED=0
go build -trimpath -ldflags "-s -w" -o "$OUT/upload-app" ./test/e2e/app
go build -o "$RIG/bin-mkimage" ./test/cluster/mkimage
"$RIG/bin-mkimage" -bin "$OUT/upload-app" -path /upload-app -out "$OUT/upload-app.tar" podkeeper.local/upload-app:e2e
rm -f "$OUT/upload-app"

# The agents' image: `make image` (test/k8s/image.sh) with a fixed version so the overlay can name it. Target
# "agents" holds all three binaries (the manifests pick one with `command`), so one build, not three; its
# docker-archive export is imported as docker.io/podkeeper/agents:e2e.
# Reused while the sources it is built from are unchanged (a warm `make e2e` does not rebuild it).
src=$(find go.mod go.sum Dockerfile.agents agents cmd restore syncer logshipper -type f ! -name '*_test.go' | sort | xargs sha256sum | sha256sum | cut -c1-16)
if [ -f "$OUT/agents.tar" ] && [ "$(cat "$OUT/agents.stamp" 2>/dev/null)" = "$src" ]; then
  echo "agents image unchanged (sources $src): reusing $OUT/agents.tar"; exit 0
fi
rm -f "$OUT"/agent*.tar "$OUT/agents-missing" "$OUT/agents.stamp"
t=$(date +%s)
if VERSION=e2e TARGETS=agents make --no-print-directory image >"$RIG/logs-image.log" 2>&1; then
  cp "$ROOT/.cache/k8s/buildah/out/agents.tar" "$OUT/agents.tar"
  echo "$src" >"$OUT/agents.stamp"
  grep -E '^(image|agents) ' "$RIG/logs-image.log" || true
  echo "make image (target agents) took $(($(date +%s) - t))s"
else
  echo "make image failed (log: $RIG/logs-image.log); the scenarios that need the agents will fail:" >&2
  tail -15 "$RIG/logs-image.log" >&2
  echo "make image failed; see $RIG/logs-image.log" >"$OUT/agents-missing"
fi
