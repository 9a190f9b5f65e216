#!/usr/bin/env bash
# What Kubernetes support costs an agent, and how big the images are:
#  - the size probe test/k8s/kubesize/{with,without} (the kit every agent links, with and without
#    agents/kube), stripped like the release binaries; the difference is client-go's share;
#  - each agent binary (bin/, from make build) against the 20 MiB budget;
#  - image sizes from the last make image (uncompressed and gzip), against the 10 MB seed target.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
T=$(mktemp -d); trap 'rm -rf "$T"' EXIT
for v in with without; do
  CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$T/$v" ./test/k8s/kubesize/$v
done
w=$(stat -c %s "$T/with"); wo=$(stat -c %s "$T/without")
printf 'agents/kube adds %.2f MiB to an agent (kit %.2f MiB -> %.2f MiB stripped)\n' \
  "$(echo "($w-$wo)/1048576" | bc -l)" "$(echo "$wo/1048576" | bc -l)" "$(echo "$w/1048576" | bc -l)"
fail=0
for b in bin/restore bin/syncer bin/logshipper bin/injector; do
  [ -f "$b" ] || continue
  s=$(stat -c %s "$b")
  printf '%-16s %6.2f MiB (budget 20 MiB)\n' "$b" "$(echo "$s/1048576" | bc -l)"
  [ "$s" -le $((20 * 1048576)) ] || { echo "  over budget"; fail=1; }
done
S=.cache/k8s/buildah/out/sizes.txt
if [ -f "$S" ]; then
  while read -r t raw gz; do
    printf 'image %-11s %6.2f MiB uncompressed, %5.2f MiB gzip%s\n' "$t" "$(echo "$raw/1048576" | bc -l)" \
      "$(echo "$gz/1048576" | bc -l)" "$([ "$t" != agents ] && [ "$gz" -gt 10000000 ] && echo ' (over the 10 MB seed target)')"
  done <"$S"
else
  echo "no image sizes yet: run make image"
fi
exit $fail
