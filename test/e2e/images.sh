#!/usr/bin/env bash
# Builds the images the e2e tests run, as OCI archives in $RIG/images/e2e/ (imported into containerd by run.sh):
#  - podkeeper.local/upload-app:e2e: test/e2e/app, the stand-in upload app (one static binary, no base image)
#  - the agents' images: exactly what `make image` builds from Dockerfile.agents (buildah), exported with
#    `buildah push ... oci-archive:` — not a separate recipe
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

# The agents' images: `make image` (test/k8s/image.sh) with a fixed version so the overlay can name them;
# its docker-archive exports are imported as docker.io/podkeeper/<agent>:e2e.
rm -f "$OUT"/agent-*.tar "$OUT/agents-missing"
if VERSION=e2e TARGETS="restore syncer logshipper" make --no-print-directory image >"$RIG/logs-image.log" 2>&1; then
  for a in restore syncer logshipper; do cp "$ROOT/.cache/k8s/buildah/out/$a.tar" "$OUT/agent-$a.tar"; done
  grep -E '^(image|restore|syncer|logshipper) ' "$RIG/logs-image.log" || true
else
  echo "make image failed (log: $RIG/logs-image.log); the scenarios that need the agents will fail:" >&2
  tail -15 "$RIG/logs-image.log" >&2
  echo "make image failed; see $RIG/logs-image.log" >"$OUT/agents-missing"
fi
