package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/podkeeper/podkeeper/agents/changelog"
	"github.com/podkeeper/podkeeper/agents/snapshot"
	"github.com/podkeeper/podkeeper/agents/store"
	"github.com/podkeeper/podkeeper/test/peers"
)

// Many syncers on one prefix (issue 12), with the real binaries on versitygw
// and MinIO: every writer's files restorable, an upload acknowledged before
// a SIGKILL is in the next restore, deletions are per-writer tombstones, a
// point in time between two writes, and a prefix of the single-writer
// release upgraded in place.
func TestFleet(t *testing.T) {
	if testing.Short() {
		t.Skip("needs the S3 peers")
	}
	syncer := buildSyncer(t)
	for _, kind := range peers.S3Kinds {
		t.Run(kind, func(t *testing.T) {
			srv := peers.StartS3(t, kind)
			t.Run("three-writers", func(t *testing.T) { testThreeWriters(t, srv, syncer) })
			t.Run("sigkill-after-ack", func(t *testing.T) { testKillAfterAck(t, srv, syncer) })
			t.Run("point-in-time", func(t *testing.T) { testPointInTime(t, srv, syncer) })
			t.Run("v1-upgrade", func(t *testing.T) { testV1Upgrade(t, srv, syncer) })
		})
	}
}

// syncProc is one syncer binary.
type syncProc struct {
	cmd    *exec.Cmd
	log    *peers.LockedBuffer
	exited chan error
}

func startSyncerBin(t *testing.T, bin string, env ...string) *syncProc {
	t.Helper()
	p := &syncProc{log: &peers.LockedBuffer{}, exited: make(chan error, 1)}
	p.cmd = exec.Command(bin)
	p.cmd.Env = append([]string{"PATH=" + os.Getenv("PATH"), "HOME=" + t.TempDir(), "SYNC_HTTP_ADDR=off", "LOG_FORMAT=text",
		"SYNC_SNAPSHOT_INTERVAL=0", "KUBE_EVENTS=false"}, env...)
	p.cmd.Stdout, p.cmd.Stderr = p.log, p.log
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.exited <- p.cmd.Wait() }()
	t.Cleanup(func() { p.cmd.Process.Kill() })
	return p
}

// waitLog waits for substr in the log (or fails when the syncer exits first).
func (p *syncProc) waitLog(t *testing.T, substr string, timeout time.Duration) {
	t.Helper()
	err := peers.WaitFor(context.Background(), timeout, func() error {
		if strings.Contains(p.log.String(), substr) {
			return nil
		}
		select {
		case err := <-p.exited:
			p.exited <- err // for term and the others waiting on it
			t.Fatalf("syncer exited (%v) before logging %q:\n%s", err, substr, p.log.String())
		default:
		}
		return fmt.Errorf("no %q yet", substr)
	})
	if err != nil {
		t.Fatalf("%v:\n%s", err, p.log.String())
	}
}

// term stops the syncer like the kubelet and wants exit 0.
func (p *syncProc) term(t *testing.T) {
	t.Helper()
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-p.exited:
		if err != nil {
			t.Fatalf("syncer after SIGTERM: %v\n%s", err, p.log.String())
		}
	case <-time.After(2 * time.Minute):
		t.Fatalf("syncer did not exit after SIGTERM\n%s", p.log.String())
	}
}

// restoreInto runs the restore binary into a new directory and returns it.
func restoreInto(t *testing.T, storeEnv []string, extra ...string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "restored")
	code, _, stderr := runBin(t, append(append(storeEnv, "RESTORE_DIR="+dir, "KUBE_EVENTS=false"), extra...))
	if code != 0 {
		t.Fatalf("restore: exit %d\n%s", code, stderr)
	}
	return dir
}

func readTree(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	for p, f := range snapshotTree(t, dir) {
		out[p] = string(f.data)
	}
	return out
}

// writeAt puts a file into place the way a careful app does: written next
// to SYNC_DIR and renamed in, so no syncer can catch it half written (a
// half-written version with a newer mtime than another writer's would be a
// genuine, but here unwanted, extra conflict).
func writeAt(t *testing.T, dir, rel, content string) {
	t.Helper()
	p := filepath.Join(dir, filepath.FromSlash(rel))
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(dir), ".stage-*")
	if err == nil {
		_, err = tmp.WriteString(content)
		if cerr := tmp.Close(); err == nil {
			err = cerr
		}
	}
	if err == nil {
		err = os.Chmod(tmp.Name(), 0o644)
	}
	if err == nil {
		err = os.Rename(tmp.Name(), p)
	}
	if err != nil {
		t.Fatal(err)
	}
}

func fleetFiles() int {
	if n, err := strconv.Atoi(os.Getenv("FLEET_FILES")); err == nil && n > 0 {
		return n
	}
	return 2000
}

// Three syncers write one prefix at once, each its own files plus 50 paths
// all three write with the same content and 20 paths each writes with its
// own; a restore brings back the union with the rule's winners, and
// `restore conflicts` lists every loser (0 silent overwrites).
// A fourth syncer started on the restored union uploads nothing; with
// SYNC_DELETE it tombstones only a file it had and saw removed.
func testThreeWriters(t *testing.T, srv *peers.S3Server, bin string) {
	const prefix = "fleet-three"
	n := fleetFiles()
	storeEnv := srv.AgentEnv(prefix)
	want := map[string]string{}
	var procs []*syncProc
	var dirs []string
	for w := range 3 {
		dir := t.TempDir()
		dirs = append(dirs, dir)
		// SIGTERM comes right after the last write: the drain uploads what is
		// left, which on a loaded 2-core CI machine can take longer than 25 s.
		procs = append(procs, startSyncerBin(t, bin, append(storeEnv, "SYNC_DIR="+dir, "SYNC_SETTLE=50ms", "SYNC_SHUTDOWN_TIMEOUT=100s",
			fmt.Sprintf("POD_NAME=files-%d", w), "POD_NAMESPACE=fleet", fmt.Sprintf("POD_UID=uid-%d", w))...))
	}
	for _, p := range procs {
		p.waitLog(t, "msg=watching", 30*time.Second)
	}
	start := time.Now()
	for i := range n {
		for w, dir := range dirs {
			rel := fmt.Sprintf("w%d/%03d/f%05d.txt", w, i%100, i)
			want[rel] = fmt.Sprintf("writer %d file %d", w, i)
			writeAt(t, dir, rel, want[rel])
			if i < 50 {
				shared := fmt.Sprintf("shared/s%02d.txt", i)
				want[shared] = fmt.Sprintf("the same bytes from every writer %d", i)
				writeAt(t, dir, shared, want[shared])
			}
		}
	}
	losers := writeClashes(t, dirs, want)
	for _, p := range procs {
		p.term(t)
	}
	t.Logf("3 writers × %d own files + 50 identical and 20 clashing shared paths: written, uploaded and drained in %s",
		n, time.Since(start).Round(time.Millisecond))
	checkConflicts(t, storeEnv, losers)
	checkRestore(t, storeEnv, want)
	t.Logf("union restored: %d files, all byte-identical, clashes resolved to the newest version", len(want))
	testFourthWriter(t, bin, storeEnv, want)
}

// writeClashes writes 20 paths in every writer's directory, each with its
// own content and mtime (renamed into place, so it goes at once with that
// mtime): writer 2's newest version wins, and it returns the losers' content
// by "PATH WRITER".
func writeClashes(t *testing.T, dirs []string, want map[string]string) map[string]string {
	clashBase := time.Now().Add(-time.Hour).Truncate(time.Second)
	losers := map[string]string{}
	for i := range 20 {
		rel := fmt.Sprintf("clash/c%02d.txt", i)
		for w, dir := range dirs {
			content := fmt.Sprintf("clash %d by writer %d", i, w)
			writeAt(t, dir, rel+".tmp", content)
			mt := clashBase.Add(time.Duration(w) * time.Second)
			os.Chtimes(filepath.Join(dir, rel+".tmp"), mt, mt)
			if err := os.Rename(filepath.Join(dir, rel+".tmp"), filepath.Join(dir, rel)); err != nil {
				t.Fatal(err)
			}
			if w == len(dirs)-1 {
				want[rel] = content
			} else {
				losers[rel+" "+fmt.Sprintf("fleet/files-%d/uid-%d", w, w)] = content
			}
		}
	}
	return losers
}

// checkConflicts: `restore conflicts` lists every loser, and the key it
// names holds the loser's bytes (no silent overwrite).
func checkConflicts(t *testing.T, storeEnv []string, losers map[string]string) {
	t.Helper()
	code, out, stderr := runBin(t, storeEnv, "conflicts")
	if code != 0 {
		t.Fatalf("restore conflicts: exit %d\n%s", code, stderr)
	}
	st := openStore(t, storeEnv)
	kept := 0
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) != 6 {
			continue
		}
		content, ok := losers[f[0]+" "+f[1]]
		if !ok {
			continue
		}
		rc, _, err := st.Get(context.Background(), f[5], store.GetOptions{})
		if err != nil {
			t.Errorf("%s: %v", f[5], err)
			continue
		}
		b, _ := io.ReadAll(rc)
		rc.Close()
		if string(b) == content {
			kept++
		}
	}
	if kept != len(losers) || strings.Count(out, "\n") != len(losers)+1 {
		t.Errorf("restore conflicts lists %d of the %d losers with their bytes:\n%s", kept, len(losers), out)
	}
	t.Logf("%d losers kept byte-identical and listed by restore conflicts", kept)
}

// checkRestore restores latest into a new directory and wants exactly want.
func checkRestore(t *testing.T, storeEnv []string, want map[string]string) {
	t.Helper()
	got := readTree(t, restoreInto(t, storeEnv))
	if len(got) != len(want) {
		t.Errorf("restored %d files, want %d", len(got), len(want))
	}
	bad := 0
	for p, w := range want {
		if got[p] != w {
			bad++
			if bad < 5 {
				t.Errorf("%s: %q, want %q", p, got[p], w)
			}
		}
	}
	if bad > 0 {
		t.Fatalf("%d of %d files wrong or missing", bad, len(want))
	}
}

// testFourthWriter: a writer started on the restored union (SYNC_DELETE=true)
// uploads nothing and deletes nothing it does not have; then it removes one
// file it has, and only that one is gone from the next restore.
func testFourthWriter(t *testing.T, bin string, storeEnv []string, want map[string]string) {
	dir := restoreInto(t, storeEnv)
	os.RemoveAll(filepath.Join(dir, "w1")) // gone before it starts: never its file
	p := startSyncerBin(t, bin, append(storeEnv, "SYNC_DIR="+dir, "SYNC_SETTLE=50ms", "SYNC_DELETE=true", "LOG_LEVEL=debug",
		"POD_NAME=files-3", "POD_NAMESPACE=fleet", "POD_UID=uid-3")...)
	p.waitLog(t, "msg=watching", 30*time.Second)
	if err := os.Remove(filepath.Join(dir, "w0/000/f00000.txt")); err != nil {
		t.Fatal(err)
	}
	p.waitLog(t, "msg=\"deletion logged\" agent=syncer path=w0/000/f00000.txt", 30*time.Second)
	p.term(t)
	if strings.Contains(p.log.String(), "msg=\"object written\"") {
		t.Errorf("a syncer on the restored union uploaded:\n%s", p.log.String())
	}
	if c := strings.Count(p.log.String(), "msg=\"deletion logged\""); c != 1 {
		t.Errorf("%d deletions logged, want 1 (w1/ was never this writer's)", c)
	}
	delete(want, "w0/000/f00000.txt")
	checkRestore(t, storeEnv, want)
}

// An upload the syncer acknowledged (logged "uploaded": its batch is stored)
// is in a restore started after a SIGKILL that follows at once.
func testKillAfterAck(t *testing.T, srv *peers.S3Server, bin string) {
	const prefix = "fleet-kill"
	storeEnv := srv.AgentEnv(prefix)
	rounds := 50
	if s := os.Getenv("FLEET_KILL_ROUNDS"); s != "" {
		rounds, _ = strconv.Atoi(s)
	}
	dir := t.TempDir()
	found := 0
	var ackToKill time.Duration
	for i := range rounds {
		p := startSyncerBin(t, bin, append(storeEnv, "SYNC_DIR="+dir, "SYNC_SETTLE=0s", "SYNC_LOG_INTERVAL=20ms", "LOG_LEVEL=debug",
			"POD_NAME=killed", fmt.Sprintf("POD_UID=uid-%d", i))...)
		p.waitLog(t, "msg=watching", 30*time.Second)
		rel := fmt.Sprintf("k/%03d.txt", i)
		writeAt(t, dir, rel, fmt.Sprintf("acknowledged %d", i))
		p.waitLog(t, "msg=uploaded agent=syncer path="+rel+" ", 90*time.Second)
		acked := time.Now()
		p.cmd.Process.Signal(syscall.SIGKILL)
		ackToKill += time.Since(acked)
		<-p.exited
		m, err := changelog.Fold(context.Background(), openStore(t, storeEnv), time.Time{})
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range m.Files {
			if f.Path == rel {
				found++
				break
			}
		}
	}
	got := readTree(t, restoreInto(t, storeEnv))
	restored := 0
	for i := range rounds {
		if got[fmt.Sprintf("k/%03d.txt", i)] == fmt.Sprintf("acknowledged %d", i) {
			restored++
		}
	}
	t.Logf("SIGKILL right after the ack (mean %s later): %d/%d in the fold started after the kill, %d/%d in the final restore",
		(ackToKill / time.Duration(max(rounds, 1))).Round(time.Microsecond), found, rounds, restored, rounds)
	if found != rounds || restored != rounds {
		t.Fatalf("acknowledged uploads lost: fold %d/%d, restore %d/%d", found, rounds, restored, rounds)
	}
}

// RESTORE_SNAPSHOT=<time between two writes> gives the log's state then: the
// first file, not the second, and not yet the deletion of the first.
func testPointInTime(t *testing.T, srv *peers.S3Server, bin string) {
	const prefix = "fleet-pit"
	storeEnv := srv.AgentEnv(prefix)
	dir := t.TempDir()
	p := startSyncerBin(t, bin, append(storeEnv, "SYNC_DIR="+dir, "SYNC_SETTLE=0s", "SYNC_LOG_INTERVAL=20ms", "LOG_LEVEL=debug",
		"SYNC_DELETE=true", "SYNC_ALLOW_MASS_DELETE=true", "POD_NAME=pit")...)
	p.waitLog(t, "msg=watching", 30*time.Second)
	writeAt(t, dir, "first.txt", "one")
	p.waitLog(t, "msg=uploaded agent=syncer path=first.txt ", 30*time.Second)
	// first.txt's batch was stamped before its PUT, which finished before the
	// ack: now is after it, and second.txt's batch is stamped after now.
	between := time.Now().UTC()
	writeAt(t, dir, "second.txt", "two")
	os.Remove(filepath.Join(dir, "first.txt"))
	p.waitLog(t, "msg=uploaded agent=syncer path=second.txt ", 30*time.Second)
	p.waitLog(t, "msg=\"deletion logged\" agent=syncer path=first.txt", 30*time.Second)
	p.term(t)
	if got := readTree(t, restoreInto(t, storeEnv, "RESTORE_SNAPSHOT="+between.Format(time.RFC3339Nano))); len(got) != 1 || got["first.txt"] != "one" {
		t.Errorf("restore at %s: %v, want only first.txt", between.Format(time.RFC3339Nano), got)
	}
	if got := readTree(t, restoreInto(t, storeEnv)); len(got) != 1 || got["second.txt"] != "two" {
		t.Errorf("restore of latest: %v, want only second.txt", got)
	}
}

// A prefix of the single-writer release (a v1 snapshot and a lease.json left
// by a SIGKILLed holder) restores unchanged, under the snapshot's own id; the
// first new writer adds to it without losing a file, even one it does not
// have on its disk.
func testV1Upgrade(t *testing.T, srv *peers.S3Server, bin string) {
	const prefix = "fleet-v1"
	storeEnv := srv.AgentEnv(prefix)
	old := map[string][]byte{}
	for i := range 20 {
		old[fmt.Sprintf("old/%02d.txt", i)] = []byte(fmt.Sprintf("v1 file %d", i))
	}
	putS3Snapshot(t, srv, prefix, old)
	st := openStore(t, storeEnv)
	lease := []byte(`{"pod":"files-0","host":"node","acquired":"2026-01-01T00:00:00Z","expires":"2099-01-01T00:00:00Z"}`)
	if _, err := st.Put(context.Background(), "lease.json", bytes.NewReader(lease), int64(len(lease)), store.PutOptions{}); err != nil {
		t.Fatal(err)
	}
	info, err := snapshot.Resolve(context.Background(), st, "latest")
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(t.TempDir(), "restored")
	code, _, stderr := runBin(t, append(storeEnv, "RESTORE_DIR="+dir, "KUBE_EVENTS=false"))
	if code != 0 || !strings.Contains(stderr, info.ID) {
		t.Fatalf("restore of a v1 prefix: exit %d, want its snapshot %s\n%s", code, info.ID, stderr)
	}
	// The new writer on the restored directory, with one file gone before it
	// started (not its to delete) and one new.
	os.Remove(filepath.Join(dir, "old/00.txt"))
	p := startSyncerBin(t, bin, append(storeEnv, "SYNC_DIR="+dir, "SYNC_SETTLE=0s", "SYNC_DELETE=true", "LOG_LEVEL=debug", "POD_NAME=files-0")...)
	p.waitLog(t, "msg=watching", 30*time.Second)
	writeAt(t, dir, "new/after-upgrade.txt", "new")
	p.waitLog(t, "msg=uploaded agent=syncer path=new/after-upgrade.txt ", 30*time.Second)
	p.term(t)
	if c := strings.Count(p.log.String(), "msg=\"object written\""); c != 1 {
		t.Errorf("the first new writer wrote %d data objects, want 1", c)
	}
	got := readTree(t, restoreInto(t, storeEnv))
	if len(got) != 21 || got["old/00.txt"] != "v1 file 0" || got["new/after-upgrade.txt"] != "new" {
		t.Errorf("after the upgrade: %d files (want 21, old/00.txt kept): %v", len(got), got)
	}
}
