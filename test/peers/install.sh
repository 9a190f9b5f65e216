#!/usr/bin/env bash
# Installs the real peers the tests run against into a git-ignored project cache.
# Usage: test/peers/install.sh [versitygw|minio|rclone|otelfwd|fluentserver|test|all]...
#   test = what `make test` needs (versitygw minio otelfwd fluentserver); all = test + rclone (bench).
# Each peer is built only when missing (or its pinned version changed), so a second run is instant.
# MinIO is AGPL-3.0: it is only ever built and run as an external process, never imported.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
PEERS_DIR=${PEERS_DIR:-$root/.cache/peers}
BIN=$PEERS_DIR/bin
mkdir -p "$BIN"
export GOTOOLCHAIN=${GOTOOLCHAIN:-local} CGO_ENABLED=0 GOFLAGS=-buildvcs=false

VERSITYGW=github.com/versity/versitygw/cmd/versitygw@v1.8.0
MINIO=github.com/minio/minio@v0.0.0-20260212201848-7aac2a2c5b7c
RCLONE=github.com/rclone/rclone@v1.76.0

log() { printf 'peers: %s\n' "$*" >&2; }
die() { printf 'peers: ERROR: %s\n' "$*" >&2; exit 1; }

# stamp NAME PIN: true when BIN/NAME exists and was built from PIN.
fresh() { [ -x "$BIN/$1" ] && [ "$(cat "$BIN/$1.pin" 2>/dev/null)" = "$2" ]; }

goinstall() { # name pkg@version
  local name=$1 pkg=$2
  if fresh "$name" "$pkg"; then log "$name up to date"; return; fi
  log "building $name from $pkg (cold build takes minutes on 2 cores)"
  local t0=$SECONDS
  GOBIN=$BIN go install -trimpath -ldflags "-s -w" "$pkg" || die "could not install $name ($pkg): is the Go module proxy reachable?"
  echo "$pkg" >"$BIN/$name.pin"
  log "$name built in $((SECONDS - t0)) s"
}

otelfwd() {
  local pin
  pin=$(cat "$here/otelfwd/go.mod" "$here/otelfwd/go.sum" "$here/otelfwd/main.go" | sha256sum | cut -c1-16)
  if fresh otelfwd "$pin"; then log "otelfwd up to date"; return; fi
  log "building otelfwd (OpenTelemetry Collector + fluent_forward receiver; cold build ~2-3 min)"
  local t0=$SECONDS
  (cd "$here/otelfwd" && go build -trimpath -ldflags "-s -w" -o "$BIN/otelfwd" .) || die "could not build otelfwd"
  echo "$pin" >"$BIN/otelfwd.pin"
  log "otelfwd built in $((SECONDS - t0)) s"
}

fluentserver() {
  local dir=$PEERS_DIR/fluentserver
  if [ -f "$dir/node_modules/@fluent-org/logger/package.json" ] && cmp -s "$here/fluentserver/server.js" "$dir/server.js"; then
    log "fluentserver up to date"; return
  fi
  command -v npm >/dev/null || die "npm is required for the TLS forward receiver (@fluent-org/logger); install Node.js 20+"
  mkdir -p "$dir"
  cp "$here/fluentserver/package.json" "$here/fluentserver/server.js" "$dir/"
  [ -f "$here/fluentserver/package-lock.json" ] && cp "$here/fluentserver/package-lock.json" "$dir/"
  log "installing @fluent-org/logger with npm"
  (cd "$dir" && npm install --no-audit --no-fund --loglevel=error >/dev/null) || die "npm install of @fluent-org/logger failed"
}

targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(test)
for t in "${targets[@]}"; do
  case $t in
    versitygw) goinstall versitygw "$VERSITYGW" ;;
    minio) goinstall minio "$MINIO" ;;
    rclone) goinstall rclone "$RCLONE" ;;
    otelfwd) otelfwd ;;
    fluentserver) fluentserver ;;
    test) goinstall versitygw "$VERSITYGW"; goinstall minio "$MINIO"; otelfwd; fluentserver ;;
    all) goinstall versitygw "$VERSITYGW"; goinstall minio "$MINIO"; otelfwd; fluentserver; goinstall rclone "$RCLONE" ;;
    *) die "unknown peer '$t' (versitygw|minio|rclone|otelfwd|fluentserver|test|all)" ;;
  esac
done
log "peers ready in $BIN"
