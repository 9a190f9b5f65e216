package syncer

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/podkeeper/podkeeper/test/peers"
)

// TestPull runs SYNC_PULL's scenarios on each S3 peer.
func TestPull(t *testing.T) {
	if testing.Short() {
		t.Skip("needs the S3 peers")
	}
	for _, kind := range peers.S3Kinds {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			srv := peers.StartS3(t, kind)
			t.Run("three-replicas-converge", func(t *testing.T) { testPullConverge(t, srv) })
			t.Run("local-change-kept-as-conflict", func(t *testing.T) { testPullLocalConflict(t, srv) })
			t.Run("max-bytes", func(t *testing.T) { testPullMaxBytes(t, srv) })
		})
	}
}

// pullEnv is the environment of replica i of a pulling fleet on prefix.
func pullEnv(srv *peers.S3Server, endpoint, prefix, dir string, i int, extra ...string) []string {
	env := append(srv.AgentEnv(prefix), "S3_ENDPOINT="+endpoint, "SYNC_DIR="+dir, "SYNC_HTTP_ADDR=off",
		"SYNC_PULL=true", "SYNC_DELETE=true", "SYNC_SETTLE=200ms", "SYNC_PULL_INTERVAL=200ms", "SYNC_LOG_INTERVAL=100ms",
		"SYNC_SNAPSHOT_INTERVAL=2s", "POD_NAMESPACE=fleet", fmt.Sprintf("POD_NAME=replica-%d", i), fmt.Sprintf("POD_UID=uid-%d", i), "LOG_LEVEL=debug")
	return append(env, extra...)
}

// treeOf describes every file under dir (the state dir left out) as
// "sha256 mode mtime".
func treeOf(dir string) (map[string]string, error) {
	out := map[string]string{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		if d.IsDir() {
			if rel == StateDirName {
				return filepath.SkipDir
			}
			return nil
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		h := sha256.Sum256(b)
		out[filepath.ToSlash(rel)] = fmt.Sprintf("%s %v %d", hex.EncodeToString(h[:8]), fi.Mode().Perm(), fi.ModTime().UnixNano())
		return nil
	})
	return out, err
}

// waitConverged waits until every dir holds the same tree of want files
// (want < 0: any number) and returns it.
func waitConverged(t *testing.T, dirs []string, want int, timeout time.Duration) map[string]string {
	t.Helper()
	var trees []map[string]string
	err := peers.WaitFor(context.Background(), timeout, func() error {
		trees = trees[:0]
		for _, d := range dirs {
			tr, err := treeOf(d)
			if err != nil {
				return err
			}
			trees = append(trees, tr)
		}
		for i, tr := range trees {
			if want >= 0 && len(tr) != want {
				return fmt.Errorf("replica %d has %d files, want %d", i, len(tr), want)
			}
			if i > 0 {
				for k, v := range trees[0] {
					if tr[k] != v {
						return fmt.Errorf("replica %d: %s is %q, replica 0 has %q", i, k, tr[k], v)
					}
				}
				if len(tr) != len(trees[0]) {
					return fmt.Errorf("replica %d has %d files, replica 0 %d", i, len(tr), len(trees[0]))
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("replicas did not converge within %s: %v", timeout, err)
	}
	return trees[0]
}

// Three syncer processes on three directories share one prefix (one of them
// compressing): 1000 files written spread over them converge everywhere
// (content, mode, mtime), also
// on a replica SIGKILLed half-way and started again; an overlapping path ends
// as the rule says on all three; deletions propagate; no data object is
// written twice (counted at the server).
func testPullConverge(t *testing.T, srv *peers.S3Server) {
	const prefix = "pull-converge"
	dirs := []string{t.TempDir(), t.TempDir(), t.TempDir()}
	procs := make([]*proc, 3)
	kcs := make([]*keyCounter, 3)
	// Replica 2 stores its files zstd-encoded: the others decode what they pull.
	extra := [][]string{nil, nil, {"SYNC_COMPRESS=zstd"}}
	for i := range procs {
		kcs[i] = newKeyCounter(t, srv.Endpoint)
		procs[i] = startBin(t, pullEnv(srv, kcs[i].URL, prefix, dirs[i], i, extra[i]...))
		procs[i].waitLog(t, "msg=watching", 30*time.Second)
	}
	write := func(from, to int) {
		for n := from; n < to; n++ {
			d := dirs[n%3]
			p := filepath.Join(d, fmt.Sprintf("d%02d", n%17), fmt.Sprintf("f-%05d.txt", n))
			// Written then renamed into place, as upload services do: each
			// file is complete when it appears, so it goes up exactly once
			// (a file written in place may be sent half-written and again).
			writeFile(t, p+".tmp", []byte(strings.Repeat(fmt.Sprintf("file %d from replica %d\n", n, n%3), 1+n%50)))
			if n%7 == 0 {
				os.Chmod(p+".tmp", 0o600)
			}
			if err := os.Rename(p+".tmp", p); err != nil {
				t.Fatal(err)
			}
		}
	}
	write(0, 500)
	// Replica 1 dies without a drain; the app goes on writing on its disk.
	killed := procs[1]
	killed.cmd.Process.Signal(syscall.SIGKILL)
	killed.wait(t, 10*time.Second)
	write(500, 1000)
	procs[1] = startBin(t, pullEnv(srv, kcs[1].URL, prefix, dirs[1], 1))
	start := time.Now()
	waitConverged(t, dirs, 1000, 3*time.Minute)
	t.Logf("1000 files converged on 3 replicas %.1fs after the killed one restarted", time.Since(start).Seconds())
	if _, meta, err := getObject(context.Background(), srv, prefix+"/data/d05/f-00005.txt"); err != nil || meta["encoding"] != "zstd" {
		t.Errorf("replica 2's f-00005.txt is not stored zstd-encoded (metadata %v, %v): the pull's decoding is not exercised", meta, err)
	}

	// The same path written differently on two replicas: the newer mtime
	// wins everywhere.
	old, newer := time.Now().Add(-time.Hour).Truncate(time.Second), time.Now().Add(-time.Minute).Truncate(time.Second)
	for i, w := range []struct {
		body  string
		mtime time.Time
	}{{"older version", old}, {"newer version", newer}} {
		p := filepath.Join(dirs[i], "overlap.txt")
		writeFile(t, p+".part", []byte(w.body))
		os.Chtimes(p+".part", w.mtime, w.mtime)
		os.Rename(p+".part", p)
	}
	// Deletions: a replica's own file, and one it had pulled.
	os.Remove(filepath.Join(dirs[2], "d02", "f-00002.txt"))
	os.Remove(filepath.Join(dirs[2], "d00", "f-00000.txt"))
	tree := waitConverged(t, dirs, 999, time.Minute)
	for _, gone := range []string{"d02/f-00002.txt", "d00/f-00000.txt"} {
		if _, ok := tree[gone]; ok {
			t.Errorf("%s deleted on replica 2 is still on the others", gone)
		}
	}
	h := sha256.Sum256([]byte("newer version"))
	if got := tree["overlap.txt"]; !strings.HasPrefix(got, hex.EncodeToString(h[:8])) || !strings.HasSuffix(got, fmt.Sprint(newer.UnixNano())) {
		t.Errorf("overlap.txt converged to %q, want the newer version (sha %x, mtime %v)", got, h[:8], newer)
	}

	// No file went up twice: a replica never sends a file it pulled (each
	// replica talks through its own counter), and no object was written twice
	// (the restarted replica's re-sends of unacknowledged uploads meet their
	// objects: a refused conditional write is not a write).
	senders := map[string][]int{}
	written := map[string]int{}
	for i, kc := range kcs {
		kc.mu.Lock()
		for k, n := range kc.put {
			if strings.HasPrefix(k, "PUT "+prefix+"/data/") && n > 0 {
				senders[k] = append(senders[k], i)
				written[k] += kc.ok[k]
			}
		}
		kc.mu.Unlock()
	}
	var twice []string
	for k, who := range senders {
		if strings.Contains(k, "overlap.txt") {
			continue
		}
		if len(who) > 1 || written[k] > 1 {
			twice = append(twice, fmt.Sprintf("%s sent by replicas %v, written %d times", k, who, written[k]))
		}
	}
	slices.Sort(twice)
	if len(twice) > 0 {
		t.Errorf("%d files sent by more than one replica or written twice: %v", len(twice), twice[:min(len(twice), 10)])
		shown := 0
		for _, l := range strings.Split(killed.output()+procs[1].output(), "\n") {
			if shown > 20 {
				break
			}
			for _, tw := range twice[:min(len(twice), 3)] {
				if f := strings.Fields(tw)[1]; strings.Contains(l, strings.TrimPrefix(f, prefix+"/data/")) {
					t.Log(l)
					shown++
				}
			}
		}
	}
	if len(senders) < 1000 {
		t.Errorf("the counters saw %d data keys sent, want ≥ 1000: they do not see the traffic", len(senders))
	}
	for i, p := range procs {
		if strings.Contains(p.output(), "sync-conflict") {
			t.Errorf("replica %d made a conflict file, none was expected", i)
		}
	}
}

// A replica whose app changed a file that is not uploaded yet (a settle time
// of an hour) meets another replica's newer version: the pulled one takes the
// path, the local one is kept beside it as a .sync-conflict- file, reported,
// and never uploaded.
func testPullLocalConflict(t *testing.T, srv *peers.S3Server) {
	const prefix = "pull-conflict"
	a, b := t.TempDir(), t.TempDir()
	ra := startSyncer(t, testConfig(t, srv, srv.Endpoint, prefix, a, "SYNC_PULL=true", "SYNC_PULL_INTERVAL=100ms", "SYNC_SETTLE=1h", "POD_NAME=slow"))
	pb := startBin(t, pullEnv(srv, srv.Endpoint, prefix, b, 1))
	pb.waitLog(t, "msg=watching", 30*time.Second)

	mine := filepath.Join(a, "report.csv")
	writeFile(t, mine, []byte("local, pending\n")) // written in place: settles for an hour
	writeFile(t, filepath.Join(b, "report.csv"), []byte("replica 1, newer\n"))

	err := peers.WaitFor(context.Background(), 30*time.Second, func() error {
		got, err := os.ReadFile(mine)
		if err != nil || string(got) != "replica 1, newer\n" {
			return fmt.Errorf("report.csv on the slow replica is %q (%v)", got, err)
		}
		// The event and the metric follow the rename.
		if !ra.rec.has("PullConflict") {
			return fmt.Errorf("no PullConflict event")
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	matches, _ := filepath.Glob(filepath.Join(a, "report.sync-conflict-*.csv"))
	if len(matches) != 1 {
		t.Fatalf("conflict files %v, want one report.sync-conflict-*.csv", matches)
	}
	if got, _ := os.ReadFile(matches[0]); string(got) != "local, pending\n" {
		t.Errorf("the conflict file holds %q, want the local version", got)
	}
	if n := gaugeValue(ra.s.health, "podkeeper_syncer_pull_conflicts_total"); n != 1 {
		t.Errorf("pull_conflicts_total = %v, want 1", n)
	}
	if err := ra.shutdown(t); err != nil { // the drain sends everything pending
		t.Fatal(err)
	}
	for o, err := range s3Store(t, srv, prefix).List(context.Background(), "") {
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(o.Key, "sync-conflict") {
			t.Errorf("conflict file uploaded as %s", o.Key)
		}
	}
}

// SYNC_PULL_MAX_BYTES: a replica stops pulling new files once it would hold
// more, says so, and keeps uploading its own.
func testPullMaxBytes(t *testing.T, srv *peers.S3Server) {
	const prefix = "pull-max"
	a, b := t.TempDir(), t.TempDir()
	pa := startBin(t, pullEnv(srv, srv.Endpoint, prefix, a, 0))
	pa.waitLog(t, "msg=watching", 30*time.Second)
	for i := range 10 {
		writeFile(t, filepath.Join(a, fmt.Sprintf("big-%d.bin", i)), randBytes(uint64(i), 10_000))
	}
	rb := startSyncer(t, testConfig(t, srv, srv.Endpoint, prefix, b, "SYNC_PULL=true", "SYNC_PULL_INTERVAL=100ms", "SYNC_PULL_MAX_BYTES=35000", "POD_NAME=small"))
	err := peers.WaitFor(context.Background(), 30*time.Second, func() error {
		if gaugeValue(rb.s.health, "podkeeper_syncer_pull_limited") != 1 {
			return fmt.Errorf("not limited yet")
		}
		if n := gaugeValue(rb.s.health, "podkeeper_syncer_pull_files_total"); n != 3 {
			return fmt.Errorf("%v files pulled, want 3 (35000 bytes hold three of 10000)", n)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if !rb.rec.has("PullLimitReached") {
		t.Error("no PullLimitReached event")
	}
	writeFile(t, filepath.Join(b, "own.txt"), []byte("uploads go on"))
	waitObject(t, srv, prefix, "own.txt", []byte("uploads go on"), 30*time.Second)
	tree, _ := treeOf(b)
	if len(tree) != 4 {
		t.Errorf("the limited replica holds %d files, want 3 pulled + its own", len(tree))
	}
}
