#!/usr/bin/env bash
# make image: builds every target of Dockerfile.agents with buildah, offline:
#   - buildah + busybox-static from Debian when missing (idempotent);
#   - stand-in base images made here (no registry is reachable): localhost/golang:1.26
#     (busybox + this machine's /usr/local/go) and localhost/static:nonroot (CA bundle,
#     passwd/group with nonroot 65532, /tmp; what distroless static:nonroot holds);
#   - modules from the host's module cache (read-only volume, GOPROXY=off);
#   - buildah's storage in .cache/k8s/buildah, never the system's.
# Prints each image's size uncompressed and gzip-compressed (what a registry stores).
# Env: VERSION (stamped, default git describe), TARGETS (default: restore syncer logshipper injector agents).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
VERSION=${VERSION:-$(git describe --tags --always --dirty 2>/dev/null || echo dev)}
TARGETS=${TARGETS:-restore syncer logshipper injector agents}
W=$ROOT/.cache/k8s/buildah
mkdir -p "$W/root" "$W/run" "$W/out"
rm -f "$W/out/sizes.txt.new"

if ! command -v buildah >/dev/null || [ ! -x /bin/busybox ]; then
  echo "installing buildah and busybox-static (Debian)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq buildah busybox-static >/dev/null
fi

cat >"$W/storage.conf" <<X
[storage]
driver = "vfs"
graphroot = "$W/root"
runroot = "$W/run"
X
export CONTAINERS_STORAGE_CONF=$W/storage.conf
# buildah wants a policy file; accept local images only (nothing is pulled).
cat >"$W/policy.json" <<'X'
{"default": [{"type": "insecureAcceptAnything"}]}
X
B=(buildah --signature-policy "$W/policy.json")
export BUILDAH_ISOLATION=chroot

have() { buildah images --quiet "$1" >/dev/null 2>&1; }

GOVER=$(go env GOVERSION)
if ! have localhost/golang:1.26 || [ "$(buildah inspect --format '{{index .ImageAnnotations "go"}}' localhost/golang:1.26 2>/dev/null)" != "$GOVER" ]; then
  echo "stand-in builder image localhost/golang:1.26 ($GOVER)"
  c=$("${B[@]}" from scratch)
  m=$(buildah mount "$c")
  mkdir -p "$m/bin" "$m/usr/local" "$m/tmp" "$m/go" "$m/root" "$m/etc/ssl/certs"
  chmod 1777 "$m/tmp"
  cp /bin/busybox "$m/bin/busybox"
  buildah run --isolation chroot "$c" -- /bin/busybox --install -s /bin
  cp -a "$(go env GOROOT)" "$m/usr/local/go"
  cp /etc/ssl/certs/ca-certificates.crt "$m/etc/ssl/certs/"
  buildah umount "$c" >/dev/null
  buildah config --env GOPATH=/go --env GOTOOLCHAIN=local --env GOFLAGS=-buildvcs=false \
    --env PATH=/go/bin:/usr/local/go/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --annotation go="$GOVER" "$c"
  buildah commit --quiet --rm "$c" localhost/golang:1.26 >/dev/null
fi
if ! have localhost/static:nonroot; then
  echo "stand-in base image localhost/static:nonroot"
  c=$("${B[@]}" from scratch)
  m=$(buildah mount "$c")
  mkdir -p "$m/etc/ssl/certs" "$m/home/nonroot" "$m/tmp"
  chmod 1777 "$m/tmp"
  chown 65532:65532 "$m/home/nonroot"
  cp /etc/ssl/certs/ca-certificates.crt "$m/etc/ssl/certs/"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$m/etc/passwd"
  printf 'root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n' >"$m/etc/group"
  buildah umount "$c" >/dev/null
  buildah config --user 65532:65532 --workingdir /home/nonroot "$c"
  buildah commit --quiet --rm "$c" localhost/static:nonroot >/dev/null
fi

printf '%-12s %12s %12s %8s\n' image uncompressed gzip build
for t in $TARGETS; do
  s=$(date +%s)
  "${B[@]}" bud --quiet --isolation chroot --pull=never --layers \
    --build-arg GO_IMAGE=localhost/golang:1.26 --build-arg BASE_IMAGE=localhost/static:nonroot \
    --build-arg GOPROXY=off --build-arg VERSION="$VERSION" \
    --volume "$(go env GOMODCACHE):/go/pkg/mod:ro" \
    --target "$t" -f Dockerfile.agents -t "localhost/podkeeper/$t:$VERSION" . >"$W/out/$t.build.log" 2>&1 ||
    { echo "build of target $t failed:"; tail -30 "$W/out/$t.build.log"; exit 1; }
  e=$(($(date +%s) - s))
  rm -f "$W/out/$t.tar"
  buildah push --quiet "localhost/podkeeper/$t:$VERSION" "docker-archive:$W/out/$t.tar:podkeeper/$t:$VERSION" >/dev/null
  raw=$(stat -c %s "$W/out/$t.tar")
  gz=$(gzip -c "$W/out/$t.tar" | wc -c)
  printf '%-12s %9.2f MiB %9.2f MiB %6ss\n' "$t" "$(echo "$raw/1048576" | bc -l)" "$(echo "$gz/1048576" | bc -l)" "$e"
  echo "$t $raw $gz" >>"$W/out/sizes.txt.new"
done
mv "$W/out/sizes.txt.new" "$W/out/sizes.txt"
# The final images run as 65532 and carry no shell.
for t in $TARGETS; do
  u=$(buildah inspect --format '{{.OCIv1.Config.User}}' "localhost/podkeeper/$t:$VERSION")
  [ "$u" = "65532:65532" ] || { echo "image $t runs as '$u', want 65532:65532"; exit 1; }
  c=$("${B[@]}" from "localhost/podkeeper/$t:$VERSION")
  m=$(buildah mount "$c")
  if [ -e "$m/bin/sh" ] || [ -e "$m/bin/busybox" ]; then echo "image $t has a shell"; exit 1; fi
  bin=$t; [ "$t" = agents ] && bin=syncer
  out=$(buildah run --isolation chroot "$c" -- "/$bin" --version)
  buildah umount "$c" >/dev/null; buildah rm "$c" >/dev/null
  case "$out" in *"$VERSION"*) ;; *) echo "image $t: /$bin --version printed '$out', want $VERSION"; exit 1 ;; esac
done
echo "images: ${TARGETS// /, } built as localhost/podkeeper/<target>:$VERSION; archives in $W/out"
