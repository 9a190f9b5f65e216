#!/usr/bin/env bash
# Builds or unpacks everything the offline node needs; a second run reuses what is there.
#  - etcd, kube-apiserver, kubectl: test/k8s/build.sh (the packaging checks' build, same cache)
#  - kubelet, kube-controller-manager, kube-scheduler: `go build` on the same wrapper module (test/k8s/build);
#    with -modfile pointing at a copy, so the extra go.sum lines these commands need never touch test/k8s/
#  - containerd, runc, CNI host-local: Debian packages fetched with `apt-get download` and unpacked with
#    `dpkg -x` into $RIG/root (nothing installed system-wide)
#  - nsfwd (test/cluster/nsfwd), which veth-self starts per Pod: Pod IPs reachable from the host, the host's
#    loopback servers from inside the Pod
#  - the sandbox ("pause") image, built from test/e2e/app by test/cluster/mkimage
set -euo pipefail
. "$(dirname "$0")/lib.sh"
mkdir -p "$RIG" "$LOG" "$K8S_BIN"
export CGO_ENABLED=0 GOTOOLCHAIN=local

t=$(now)
nice -n 10 "$ROOT/test/k8s/build.sh"
echo "phase build: etcd + kube-apiserver + kubectl (test/k8s/build.sh) ready in $(since "$t")s"

KV=v1.34.4
LD="-s -w -X k8s.io/component-base/version.gitVersion=$KV -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=34 -X k8s.io/component-base/version.gitTreeState=clean"
WRAP=$ROOT/test/k8s/build
MODCOPY=$RIG/k8sbuild
stamp=$(sha256sum "$WRAP/go.mod" | cut -c1-16)
for name in kubelet kube-controller-manager kube-scheduler; do
  if [ -x "$K8S_BIN/$name" ] && [ "$(cat "$K8S_BIN/$name.version" 2>/dev/null)" = "$stamp" ]; then continue; fi
  if [ "$(cat "$MODCOPY/stamp" 2>/dev/null)" != "$stamp" ]; then
    mkdir -p "$MODCOPY"
    cp "$WRAP/go.mod" "$MODCOPY/go.mod"; cp "$WRAP/go.sum" "$MODCOPY/go.sum"
    echo "$stamp" >"$MODCOPY/stamp"
  fi
  t=$(now)
  (cd "$WRAP" && GOFLAGS=-mod=mod nice -n 10 go build -modfile="$MODCOPY/go.mod" -trimpath -ldflags "$LD" \
    -o "$K8S_BIN/$name.tmp" "k8s.io/kubernetes/cmd/$name")
  mv "$K8S_BIN/$name.tmp" "$K8S_BIN/$name"
  echo "$stamp" >"$K8S_BIN/$name.version"
  echo "phase build: $name built in $(since "$t")s"
done

# Debian packages: exact versions, so a second run (and CI) unpacks the same bits.
DEBS="containerd=1.6.20~ds1-1+deb12u3 runc=1.1.5+ds1-1+deb12u1 containernetworking-plugins=1.1.1+ds1-3+b5"
if [ ! -x "$RIG/root/usr/bin/containerd" ] || [ ! -x "$RIG/root/usr/sbin/runc" ] || [ ! -x "$RIG/root/usr/lib/cni/host-local" ]; then
  t=$(now)
  mkdir -p "$RIG/debs" && rm -rf "$RIG/root"
  for d in $DEBS; do
    # a fresh machine may have no package lists yet
    ls "$RIG/debs/${d%%=*}_"*.deb >/dev/null 2>&1 || (cd "$RIG/debs" && { apt-get download "$d" || { apt-get update -qq && apt-get download "$d"; }; })
  done
  for f in "$RIG"/debs/*.deb; do dpkg -x "$f" "$RIG/root"; done
  echo "phase build: containerd + runc + CNI unpacked in $(since "$t")s"
fi
mkdir -p "$RIG/cni/bin" "$RIG/cni/net.d"
# containerd always sets up "lo" with the loopback plugin; host-local hands out pod IPs
for p in host-local loopback; do cp "$RIG/root/usr/lib/cni/$p" "$RIG/cni/bin/$p"; done
subst "$SRC/cni/veth-self" >"$RIG/cni/bin/veth-self"; chmod 755 "$RIG/cni/bin/veth-self"
# veth-self's relay between a Pod's network namespace and the host's loopback
(cd "$ROOT" && go build -trimpath -ldflags "-s -w" -o "$RIG/cni/bin/nsfwd" ./test/cluster/nsfwd)
subst "$SRC/cni/net.d/10-podnet.conflist" >"$RIG/cni/net.d/10-podnet.conflist"

# The sandbox image: containerd asks for registry.k8s.io/pause:3.10 and must never pull it.
t=$(now)
mkdir -p "$RIG/images"
(cd "$ROOT" && go build -trimpath -ldflags "-s -w" -o "$RIG/images/upload-app" ./test/e2e/app \
  && go build -o "$RIG/bin-mkimage" ./test/cluster/mkimage)
"$RIG/bin-mkimage" -bin "$RIG/images/upload-app" -path /upload-app -entrypoint /upload-app,pause \
  -out "$RIG/images/pause.tar" registry.k8s.io/pause:3.10
rm -f "$RIG/images/upload-app"
echo "phase build: pause image in $(since "$t")s"
