#!/usr/bin/env bash
# make demo: the podkeeper round trip on a file:// store in a temp dir, no
# server needed. The syncer watches a directory and uploads what the "app"
# writes, the logshipper ships its log lines to stdout (LOGSHIP_OUTPUT=stdout,
# the embedded log sink); SIGTERM makes both drain and the syncer write a final
# snapshot; the directory is wiped (the Pod is gone); restore brings it back;
# the tree must be byte-identical, with the same modes and nanosecond mtimes.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
syncer=$root/bin/syncer
restore=$root/bin/restore
logshipper=$root/bin/logshipper
for b in "$syncer" "$restore" "$logshipper"; do
	[[ -x $b ]] || { echo "demo: $b is missing; run 'make build' (make demo does it)" >&2; exit 1; }
done

work=$(mktemp -d "${TMPDIR:-/tmp}/podkeeper-demo.XXXXXX")
syncer_pid=
shipper_pid=
cleanup() {
	[[ -n $syncer_pid ]] && kill -KILL "$syncer_pid" 2>/dev/null || true
	[[ -n $shipper_pid ]] && kill -KILL "$shipper_pid" 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT

dir=$work/uploads
store=$work/store
mkdir -p "$dir" "$store"
export STORE_URL=file://$store LOG_FORMAT=text POD_NAME=demo-0 POD_NAMESPACE=demo
# stop NAME PID: SIGTERM, wait, and fail with the agent's log unless it exited 0.
stop() {
	local code=0
	kill -TERM "$2"
	wait "$2" || code=$?
	echo "$1 exited with code $code"
	[[ $code -eq 0 ]] || { cat "$work/$1.log" >&2; exit 1; }
}
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

# Describes a tree: sha256, mode and mtime (ns) of every file, state dir aside.
describe() {
	(cd "$1" && find . -path ./.podkeeper -prune -o -type f -printf '%P\n' | LC_ALL=C sort | while IFS= read -r f; do
		printf '%s  %s  %s  %s\n' "$(sha256sum <"$f" | cut -c1-64)" "$(stat -c %a "$f")" "$(stat -c %.9Y "$f")" "$f"
	done)
}

step "1. start the syncer on $dir (store $STORE_URL)"
SYNC_DIR=$dir SYNC_HTTP_ADDR=off SYNC_SETTLE=300ms SYNC_SNAPSHOT_INTERVAL=0 "$syncer" >"$work/syncer.log" 2>&1 &
syncer_pid=$!
echo "syncer pid $syncer_pid"
mkdir -p "$work/logs"
LOGSHIP_PATHS="$work/logs/*.log" LOGSHIP_OUTPUT=stdout LOGSHIP_STATE_DIR=$work/logship-state LOGSHIP_HTTP_ADDR=off \
	"$logshipper" >"$work/records.jsonl" 2>"$work/logshipper.log" &
shipper_pid=$!
echo "logshipper pid $shipper_pid (records to stdout)"

step "2. the app writes files: nested directories and a larger file"
mkdir -p "$dir/invoices/2026/03" "$dir/avatars" "$dir/videos"
echo "hello from the app" >"$dir/hello.txt"
for i in 1 2 3; do printf 'invoice %d\n' "$i" >"$dir/invoices/2026/03/inv-$i.txt"; done
head -c 65536 /dev/urandom >"$dir/avatars/user-42.png"
chmod 600 "$dir/avatars/user-42.png"
head -c $((24 << 20)) /dev/urandom >"$dir/videos/intro.mp4"
: >"$dir/empty.flag"
find "$dir" -type f -printf '  %P (%s bytes)\n' | LC_ALL=C sort
for f in hello.txt invoices/2026/03/inv-1.txt invoices/2026/03/inv-2.txt invoices/2026/03/inv-3.txt avatars/user-42.png videos/intro.mp4; do
	printf '{"level":"info","msg":"stored upload","path":"%s"}\n' "$f" >>"$work/logs/app.log"
done

step "3. wait until the syncer has uploaded every file"
deadline=$((SECONDS + 60))
until (cd "$dir" && find . -path ./.podkeeper -prune -o -type f -printf '%P\n' | while IFS= read -r f; do
	cmp -s "$f" "$store/data/$f" || exit 1
done); do
	if ((SECONDS > deadline)); then
		echo "demo: files not uploaded after 60 s; syncer log:" >&2
		cat "$work/syncer.log" >&2
		exit 1
	fi
	if ! kill -0 "$syncer_pid" 2>/dev/null; then
		echo "demo: the syncer exited; its log:" >&2
		cat "$work/syncer.log" >&2
		exit 1
	fi
	sleep 0.2
done
echo "all files are in the store"
describe "$dir" >"$work/before.txt"

step "4. SIGTERM the syncer (the kubelet stopping the Pod): it drains and writes the final snapshot"
stop syncer "$syncer_pid"
syncer_pid=
"$restore" list 2>/dev/null

step "4b. SIGTERM the logshipper: it reads every file to its end and delivers before exiting"
stop logshipper "$shipper_pid"
shipper_pid=
sed 's/^/  /' "$work/records.jsonl"
n=$(grep -c '"stored upload' "$work/records.jsonl" || true)
[[ $n -eq 6 ]] || { echo "demo: $n of 6 log lines shipped" >&2; cat "$work/logshipper.log" >&2; exit 1; }
echo "6 of 6 log lines shipped, each with file, pod and namespace"

step "5. the Pod is gone and so is its emptyDir: rm -rf $dir"
rm -rf "$dir"

step "6. restore (the init container of the next Pod)"
RESTORE_DIR=$dir "$restore" 2>"$work/restore.log" || { cat "$work/restore.log" >&2; exit 1; }
grep -E 'msg=(plan|restored)' "$work/restore.log" | sed 's/^/  /'
describe "$dir" >"$work/after.txt"

step "7. compare: sha256, mode and mtime of every file"
if diff -u "$work/before.txt" "$work/after.txt"; then
	sed 's/^/  /' "$work/after.txt"
	echo "byte-identical: $(wc -l <"$work/after.txt") files, same content, modes and mtimes"
else
	echo "demo: the restored tree differs" >&2
	exit 1
fi

step "8. run restore again: nothing to fetch (idempotent)"
RESTORE_DIR=$dir "$restore" 2>"$work/restore2.log" || { cat "$work/restore2.log" >&2; exit 1; }
grep -E 'msg=restored' "$work/restore2.log" | sed 's/^/  /'
grep -q 'fetched_files=0' "$work/restore2.log" || { echo "demo: the rerun fetched files" >&2; exit 1; }

step "9. restore verify --deep: every object of the snapshot downloaded and hashed"
"$restore" verify --deep 2>/dev/null

printf '\n\033[1mdemo OK\033[0m: syncer + logshipper -> SIGTERM -> wipe -> restore gave back the same tree.\n'
