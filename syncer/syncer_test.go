package syncer

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/podkeeper/podkeeper/agents/changelog"
	"github.com/podkeeper/podkeeper/agents/snapshot"
	"github.com/podkeeper/podkeeper/agents/store"
	"github.com/podkeeper/podkeeper/test/peers"
)

// TestSyncer runs every scenario on each S3 peer: the scenarios share the
// peer, in parallel, each on its own prefix; the outage, which stops the
// peer, runs after them.
func TestSyncer(t *testing.T) {
	if testing.Short() {
		t.Skip("needs the S3 peers")
	}
	for _, kind := range peers.S3Kinds {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			srv := peers.StartS3(t, kind)
			t.Run("shared", func(t *testing.T) {
				for name, fn := range map[string]func(*testing.T, *peers.S3Server){
					"watch":                 testWatch,
					"rename-skips-settle":   testRenameSkipsSettle,
					"multipart-resume":      testMultipartResume,
					"multipart-abandoned":   testMultipartAbandoned,
					"restart-after-restore": testRestartAfterRestore,
					"overflow-rescan":       testOverflowRescan,
					"lease":                 testLease,
					"sigterm-drain":         testSIGTERMDrain,
					"mass-delete-guard":     testMassDeleteGuard,
					"permanent-error":       testPermanentError,
					"retention-delete":      testRetentionDelete,
					"conflicts":             testConflicts,
					"poll-shared":           testPollShared,
					"swap-parent-for-link":  testSwapParentForLink,
				} {
					t.Run(name, func(t *testing.T) {
						t.Parallel()
						fn(t, srv)
					})
				}
			})
			t.Run("outage", func(t *testing.T) { testOutage(t, srv) })
		})
	}
}

// Nested directories made after start, a tree moved in, rename-into-place,
// a slow writer pausing for less than the settle time, excluded names and
// the state directory.
func testWatch(t *testing.T, srv *peers.S3Server) {
	dir := t.TempDir()
	staging := t.TempDir()
	const prefix = "watch"
	r := startSyncer(t, testConfig(t, srv, srv.Endpoint, prefix, dir, "SYNC_SETTLE=1s"))

	want := map[string][]byte{}
	put := func(rel string, b []byte) {
		writeFile(t, filepath.Join(dir, rel), b)
		want[rel] = b
	}
	// mkdir -p then files, at once: the watch on c must exist before its scan.
	put("a/b/c/deep.txt", []byte("deep"))
	put("a/top.json", []byte(`{"top":true}`))
	// A tree built elsewhere and moved in.
	for i := range 3 {
		writeFile(t, filepath.Join(staging, "tree", "x", "y", fmt.Sprintf("f%d.bin", i)), randBytes(uint64(i), 1000+i))
		want[fmt.Sprintf("tree/x/y/f%d.bin", i)] = randBytes(uint64(i), 1000+i)
	}
	if err := os.Rename(filepath.Join(staging, "tree"), filepath.Join(dir, "tree")); err != nil {
		t.Fatal(err)
	}
	// Write-then-rename.
	writeFile(t, filepath.Join(dir, "r.dat.tmp"), []byte("renamed into place"))
	if err := os.Rename(filepath.Join(dir, "r.dat.tmp"), filepath.Join(dir, "r.dat")); err != nil {
		t.Fatal(err)
	}
	want["r.dat"] = []byte("renamed into place")
	// Excluded names and the agents' state are never uploaded.
	for _, rel := range []string{"skip.tmp", "sub/.#lock", "sub/x.swp", "dl.part", "backup~", ".podkeeper/restored.json"} {
		writeFile(t, filepath.Join(dir, rel), []byte("never"))
	}
	// A slow writer: pauses shorter than the settle time.
	f, err := os.Create(filepath.Join(dir, "slow.log"))
	if err != nil {
		t.Fatal(err)
	}
	var final []byte
	for i := range 8 {
		line := []byte(fmt.Sprintf("line %d %s\n", i, strings.Repeat("x", 100)))
		if _, err := f.Write(line); err != nil {
			t.Fatal(err)
		}
		final = append(final, line...)
		select {
		case <-time.After(120 * time.Millisecond):
		case <-ctxT(t).Done():
		}
	}
	f.Close()
	want["slow.log"] = final

	for rel, b := range want {
		waitObject(t, srv, prefix, rel, b, 30*time.Second)
	}
	if err := r.shutdown(t); err != nil {
		t.Fatalf("drain: %v", err)
	}
	finalSum := sha256.Sum256(final)
	ups := r.uploadsOf("slow.log")
	if len(ups) == 0 {
		t.Fatal("slow.log never reported uploaded")
	}
	for _, u := range ups {
		if u.SHA256 != hex.EncodeToString(finalSum[:]) {
			t.Errorf("slow.log was uploaded as a half-written version (%d bytes, want %d)", u.Size, len(final))
		}
	}
	for _, rel := range []string{"skip.tmp", "sub/.#lock", "sub/x.swp", "dl.part", "backup~", ".podkeeper/restored.json"} {
		if objectExists(srv, prefix+"/data/"+rel) {
			t.Errorf("excluded %s was uploaded", rel)
		}
	}
	m, err := latestSnapshot(t, s3Store(t, srv, prefix))
	if err != nil {
		t.Fatalf("final snapshot: %v", err)
	}
	var got []string
	for _, f := range m.Files {
		got = append(got, f.Path)
	}
	var exp []string
	for rel := range want {
		exp = append(exp, rel)
	}
	slices.Sort(exp)
	if !slices.Equal(got, exp) {
		t.Errorf("snapshot lists %v\nwant %v", got, exp)
	}
	for _, f := range m.Files {
		if f.Path == "a/top.json" {
			obj, err := srv.Client().HeadObject(context.Background(), &s3.HeadObjectInput{Bucket: aws.String(peers.Bucket), Key: aws.String(prefix + "/data/a/top.json")})
			if err != nil || aws.ToString(obj.ContentType) != "application/json" {
				t.Errorf("a/top.json content type %q (%v), want application/json", aws.ToString(obj.ContentType), err)
			}
		}
	}
}

// With a settle time of an hour, only files that appear complete are
// uploaded while running: renamed inside SYNC_DIR (write-then-rename, a
// staged tree renamed), or moved in from outside a while after their last
// write; a file written in place waits, and goes at the drain.
func testRenameSkipsSettle(t *testing.T, srv *peers.S3Server) {
	dir := t.TempDir()
	outside := t.TempDir()
	const prefix = "rename"
	writeFile(t, filepath.Join(dir, "incoming", "sub", "m.txt"), []byte("moved in"))
	writeFile(t, filepath.Join(outside, "tree", "deep", "t.txt"), []byte("tree from outside"))
	writeFile(t, filepath.Join(outside, "single.txt"), []byte("file from outside"))
	r := startSyncer(t, testConfig(t, srv, srv.Endpoint, prefix, dir, "SYNC_SETTLE=1h"))
	writeFile(t, filepath.Join(dir, "inplace.txt"), []byte("written in place"))
	writeFile(t, filepath.Join(dir, "r.dat.tmp"), []byte("renamed"))
	if err := os.Rename(filepath.Join(dir, "r.dat.tmp"), filepath.Join(dir, "r.dat")); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(dir, "incoming"), filepath.Join(dir, "done")); err != nil {
		t.Fatal(err)
	}
	// Files from outside: moved once the clock has passed their last write
	// (what a download finished earlier looks like).
	if err := peers.WaitFor(context.Background(), 10*time.Second, func() error {
		fi, err := os.Stat(filepath.Join(outside, "single.txt"))
		if err != nil || time.Since(fi.ModTime()) < 20*time.Millisecond {
			return fmt.Errorf("written too recently")
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(outside, "single.txt"), filepath.Join(dir, "single.txt")); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(outside, "tree"), filepath.Join(dir, "tree")); err != nil {
		t.Fatal(err)
	}
	waitObject(t, srv, prefix, "r.dat", []byte("renamed"), 20*time.Second)
	waitObject(t, srv, prefix, "done/sub/m.txt", []byte("moved in"), 20*time.Second)
	waitObject(t, srv, prefix, "single.txt", []byte("file from outside"), 20*time.Second)
	waitObject(t, srv, prefix, "tree/deep/t.txt", []byte("tree from outside"), 20*time.Second)
	if n := len(r.uploadsOf("inplace.txt")); n != 0 || objectExists(srv, prefix+"/data/inplace.txt") {
		t.Fatalf("inplace.txt uploaded %d time(s) before its settle time", n)
	}
	if n := len(r.uploadsOf("incoming/sub/m.txt")); n != 0 {
		t.Fatalf("the staged file was uploaded under its staging name")
	}
	if err := r.shutdown(t); err != nil {
		t.Fatal(err)
	}
	waitObject(t, srv, prefix, "inplace.txt", []byte("written in place"), time.Second)
}

// killMidMultipart starts the syncer binary on dir with S3 refusing every part
// after okParts, waits until the journal records those parts and kills the
// process with SIGKILL: a multipart upload is left half done.
func killMidMultipart(t *testing.T, srv *peers.S3Server, prefix, dir, pod string, okParts int) (*peers.CountingProxy, []string, string) {
	t.Helper()
	proxy := peers.NewCountingProxy(t, srv.Endpoint)
	proxy.FailWith(http.StatusServiceUnavailable, func(r *http.Request) bool {
		n, err := strconv.Atoi(r.URL.Query().Get("partNumber"))
		return err == nil && n > okParts
	})
	env := append(srv.AgentEnv(prefix), "S3_ENDPOINT="+proxy.URL, "SYNC_DIR="+dir, "SYNC_HTTP_ADDR=127.0.0.1:0",
		"POD_NAME="+pod, "SYNC_SETTLE=100ms", "SYNC_SNAPSHOT_INTERVAL=0")
	p := startBin(t, env)
	jdir := filepath.Join(dir, ".podkeeper", "multipart")
	err := peers.WaitFor(context.Background(), 90*time.Second, func() error {
		js, _ := filepath.Glob(filepath.Join(jdir, "*.json"))
		if len(js) != 1 {
			return fmt.Errorf("%d journals", len(js))
		}
		b, err := os.ReadFile(js[0])
		if err != nil {
			return err
		}
		j, err := store.ParseJournal(b)
		if err != nil {
			return err
		}
		if j.PartCount() != okParts {
			return fmt.Errorf("journal has %d parts", j.PartCount())
		}
		return nil
	})
	if err != nil {
		t.Fatalf("%v\n%s", err, p.output())
	}
	if err := p.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	p.wait(t, 10*time.Second)
	return proxy, env, jdir
}

// A multipart upload interrupted by SIGKILL whose file is deleted before the
// restart is aborted by its journal's upload id: nothing is left to bill, on
// MinIO too, where listing uploads by prefix finds nothing.
func testMultipartAbandoned(t *testing.T, srv *peers.S3Server) {
	dir := t.TempDir()
	const prefix = "multipart-abandoned"
	const size = 6 * partSize
	big := filepath.Join(dir, "gone.bin")
	if err := os.WriteFile(big, randBytes(7, size), 0o644); err != nil {
		t.Fatal(err)
	}
	proxy, env, jdir := killMidMultipart(t, srv, prefix, dir, "mpa", 2)
	key := aws.String(prefix + "/data/gone.bin")
	ups, err := srv.Client().ListMultipartUploads(context.Background(), &s3.ListMultipartUploadsInput{Bucket: aws.String(peers.Bucket), Prefix: key})
	if err != nil || len(ups.Uploads) != 1 {
		t.Fatalf("after SIGKILL: %v uploads in progress (%v), want 1", len(ups.Uploads), err)
	}
	if err := os.Remove(big); err != nil {
		t.Fatal(err)
	}
	proxy.FailWith(0, nil)
	p2 := startBin(t, env)
	p2.waitLog(t, "aborting multipart upload of a file that is gone", 30*time.Second)
	err = peers.WaitFor(context.Background(), 30*time.Second, func() error {
		ups, err := srv.Client().ListMultipartUploads(context.Background(), &s3.ListMultipartUploadsInput{Bucket: aws.String(peers.Bucket), Prefix: key})
		if err != nil {
			return err
		}
		if len(ups.Uploads) != 0 {
			return fmt.Errorf("%d uploads still in progress", len(ups.Uploads))
		}
		if js, _ := filepath.Glob(filepath.Join(jdir, "*.json")); len(js) != 0 {
			return fmt.Errorf("%d journals left", len(js))
		}
		return nil
	})
	if err != nil {
		t.Fatalf("%v\n%s", err, p2.output())
	}
}

// A ≥200 MiB file goes multipart; the syncer is SIGKILLed with 4 parts on
// the server, and the next process uploads only the missing parts.
func testMultipartResume(t *testing.T, srv *peers.S3Server) {
	dir := t.TempDir()
	const prefix = "multipart"
	const size = 200 << 20
	const parts = (size + partSize - 1) / partSize
	big := filepath.Join(dir, "video", "big.bin")
	chunk := randBytes(42, 1<<20)
	if err := os.MkdirAll(filepath.Dir(big), 0o755); err != nil {
		t.Fatal(err)
	}
	f, err := os.Create(big)
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	for i := range size >> 20 {
		copy(chunk, fmt.Sprintf("MiB %06d", i))
		f.Write(chunk)
		h.Write(chunk)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	sum := hex.EncodeToString(h.Sum(nil))

	proxy, env, jdir := killMidMultipart(t, srv, prefix, dir, "mp", 4)
	ups, err := srv.Client().ListMultipartUploads(context.Background(), &s3.ListMultipartUploadsInput{Bucket: aws.String(peers.Bucket), Prefix: aws.String(prefix + "/data/video/big.bin")})
	if err != nil || len(ups.Uploads) != 1 {
		t.Fatalf("after SIGKILL: %v uploads in progress (%v), want 1", len(ups.Uploads), err)
	}

	proxy.FailWith(0, nil)
	proxy.Reset()
	p2 := startBin(t, env)
	p2.waitLog(t, "resuming multipart upload", 30*time.Second)
	err = peers.WaitFor(context.Background(), 120*time.Second, func() error {
		out, err := srv.Client().HeadObject(context.Background(), &s3.HeadObjectInput{Bucket: aws.String(peers.Bucket), Key: aws.String(prefix + "/data/video/big.bin")})
		if err != nil {
			return err
		}
		if aws.ToInt64(out.ContentLength) != size || out.Metadata["sha256"] != sum {
			return fmt.Errorf("object is %d bytes, sha256 %q", aws.ToInt64(out.ContentLength), out.Metadata["sha256"])
		}
		return nil
	})
	if err != nil {
		t.Fatalf("%v\n%s", err, p2.output())
	}
	if got := proxy.Count("PUT-part"); got != parts-4 {
		t.Errorf("second process uploaded %d parts, want %d (4 of %d reused)", got, parts-4, parts)
	}
	if proxy.Count("LIST-parts") == 0 {
		t.Error("resume did not check the parts with ListParts")
	}
	out, err := srv.Client().GetObject(context.Background(), &s3.GetObjectInput{Bucket: aws.String(peers.Bucket), Key: aws.String(prefix + "/data/video/big.bin")})
	if err != nil {
		t.Fatal(err)
	}
	gh := sha256.New()
	n, err := io.Copy(gh, out.Body)
	out.Body.Close()
	if err != nil || n != size || hex.EncodeToString(gh.Sum(nil)) != sum {
		t.Fatalf("object content: %d bytes, err %v, sha256 match %v", n, err, hex.EncodeToString(gh.Sum(nil)) == sum)
	}
	if err := p2.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code := p2.wait(t, 30*time.Second); code != 0 {
		t.Fatalf("exit %d after SIGTERM\n%s", code, p2.output())
	}
	if js, _ := filepath.Glob(filepath.Join(jdir, "*.json")); len(js) != 0 {
		t.Errorf("journals left after the upload: %v", js)
	}
	ups, err = srv.Client().ListMultipartUploads(context.Background(), &s3.ListMultipartUploadsInput{Bucket: aws.String(peers.Bucket), Prefix: aws.String(prefix + "/data/video/big.bin")})
	if err != nil || len(ups.Uploads) != 0 {
		t.Errorf("multipart uploads left: %d (%v)", len(ups.Uploads), err)
	}
}

// After a restore (files with the snapshot's exact mtimes and modes), a new
// syncer uploads nothing; changing one file uploads exactly that file.
func testRestartAfterRestore(t *testing.T, srv *peers.S3Server) {
	const prefix = "restart"
	dir1 := t.TempDir()
	for i := range 12 {
		writeFile(t, filepath.Join(dir1, fmt.Sprintf("d%d/f%02d.txt", i%3, i)), randBytes(uint64(100+i), 500+i*37))
		if i%4 == 0 {
			os.Chmod(filepath.Join(dir1, fmt.Sprintf("d%d/f%02d.txt", i%3, i)), 0o600)
		}
	}
	r1 := startSyncer(t, testConfig(t, srv, srv.Endpoint, prefix, dir1, "SYNC_SETTLE=100ms"))
	if err := r1.shutdown(t); err != nil {
		t.Fatal(err)
	}
	st := s3Store(t, srv, prefix)
	m, err := latestSnapshot(t, st)
	if err != nil || len(m.Files) != 12 {
		t.Fatalf("first snapshot: %v, %v", m, err)
	}

	// What restore does: content, mode and the exact mtime of each entry.
	dir2 := t.TempDir()
	for _, f := range m.Files {
		b, _, err := getObject(context.Background(), srv, prefix+"/data/"+f.Path)
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dir2, filepath.FromSlash(f.Path))
		writeFile(t, p, b)
		if err := os.Chmod(p, os.FileMode(f.Mode)); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(p, f.MTime, f.MTime); err != nil {
			t.Fatal(err)
		}
	}
	writeFile(t, filepath.Join(dir2, ".podkeeper", "restored.json"), []byte(`{"snapshot":"`+m.ID+`"}`))

	kc := newKeyCounter(t, srv.Endpoint)
	// SYNC_EXCLUSIVE: its lease write shows the counter sees the traffic.
	r2 := startSyncer(t, testConfig(t, srv, kc.URL, prefix, dir2, "SYNC_SETTLE=100ms", "SYNC_EXCLUSIVE=true"))
	if err := r2.shutdown(t); err != nil {
		t.Fatal(err)
	}
	if w := kc.writes("data/"); len(w) != 0 {
		t.Errorf("restart after restore uploaded data: %v", w)
	}
	if w := append(kc.writes("snapshots/"), kc.writes("log/")...); len(w) != 0 {
		t.Errorf("restart after restore wrote to the log or a snapshot although nothing changed: %v", w)
	}
	if len(kc.writes("lease.json")) == 0 {
		t.Error("the counter saw no lease write: it does not see the syncer's traffic")
	}

	// The counter can fail: one changed file is one upload.
	changed := filepath.Join(dir2, "d1/f01.txt")
	writeFile(t, changed, []byte("changed after the restore"))
	kc2 := newKeyCounter(t, srv.Endpoint)
	r3 := startSyncer(t, testConfig(t, srv, kc2.URL, prefix, dir2, "SYNC_SETTLE=100ms"))
	if err := r3.shutdown(t); err != nil {
		t.Fatal(err)
	}
	if w := kc2.writes("data/"); !slices.Equal(w, []string{"PUT " + prefix + "/data/d1/f01.txt x1"}) {
		t.Errorf("after changing one file the syncer wrote %v", w)
	}
}

// Events lost to an inotify queue overflow are recovered by a rescan.
func testOverflowRescan(t *testing.T, srv *peers.S3Server) {
	b, err := os.ReadFile("/proc/sys/fs/inotify/max_queued_events")
	if err != nil {
		t.Fatalf("inotify queue size: %v", err)
	}
	queue, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || queue > 200000 {
		t.Fatalf("max_queued_events %q: too large to overflow in a test", b)
	}
	dir := t.TempDir()
	const prefix = "overflow"
	if err := os.Mkdir(filepath.Join(dir, "junk"), 0o755); err != nil {
		t.Fatal(err)
	}
	gate := &pausedNotifier{}
	r := startSyncer(t, testConfig(t, srv, srv.Endpoint, prefix, dir, "SYNC_SETTLE=100ms"), gate.install)
	// Stop delivering events to the loop, so the kernel queue fills up as in
	// a burst the syncer cannot keep up with.
	gate.mu.Lock()
	locked := true
	defer func() {
		if locked {
			gate.mu.Unlock()
		}
	}()
	// Excluded names: the overflow is the point, not their upload. fsnotify
	// buffers up to 64 KiB of events on top of the kernel queue.
	for i := range queue + 5000 {
		f, err := os.Create(filepath.Join(dir, "junk", fmt.Sprintf("j%06d.tmp", i)))
		if err != nil {
			t.Fatal(err)
		}
		f.Close()
	}
	for i := range 3 {
		writeFile(t, filepath.Join(dir, fmt.Sprintf("real-%d.txt", i)), []byte(fmt.Sprintf("real %d", i)))
	}
	gate.mu.Unlock()
	locked = false
	for i := range 3 {
		waitObject(t, srv, prefix, fmt.Sprintf("real-%d.txt", i), []byte(fmt.Sprintf("real %d", i)), 60*time.Second)
	}
	if n := gaugeValue(r.s.health, "podkeeper_syncer_rescans_total"); n < 1 {
		t.Errorf("rescans_total = %v, want ≥ 1", n)
	}
}

// SYNC_EXCLUSIVE=true: the lease is held by namespace, Pod name and UID. A
// second Pod exits 1 naming the holder, so do the next Pod of the same name
// and a Pod of the same name in another namespace; a restarted container of
// the same Pod (same UID) takes its lease over; a clean shutdown releases it.
func testLease(t *testing.T, srv *peers.S3Server) {
	const prefix = "lease"
	base := append(srv.AgentEnv(prefix), "SYNC_HTTP_ADDR=127.0.0.1:0", "SYNC_SETTLE=100ms", "SYNC_EXCLUSIVE=true", "POD_NAMESPACE=prod")
	podA := []string{"POD_NAME=pod-a", "POD_UID=uid-a"}
	a := startBin(t, append(append(base, "SYNC_DIR="+t.TempDir()), podA...))
	a.waitLog(t, "msg=watching", 30*time.Second)
	a.cmd.Process.Signal(syscall.SIGKILL)
	a.wait(t, 10*time.Second)
	if !objectExists(srv, prefix+"/lease.json") {
		t.Fatal("no lease.json while pod-a held the prefix")
	}

	for _, other := range [][]string{
		{"POD_NAME=pod-b", "POD_UID=uid-b"},
		{"POD_NAME=pod-a", "POD_UID=uid-a2"},                         // the next Pod of that name
		{"POD_NAME=pod-a", "POD_UID=uid-a", "POD_NAMESPACE=staging"}, // same name and UID, other namespace
	} {
		b := startBin(t, append(append(base, "SYNC_DIR="+t.TempDir()), other...))
		if code := b.wait(t, 30*time.Second); code != 1 {
			t.Fatalf("%v: exit %d, want 1\n%s", other, code, b.output())
		}
		out := b.output()
		if !strings.Contains(out, "prod/pod-a") || !strings.Contains(out, "LeaseConflict") {
			t.Errorf("%v: output does not name the holder prod/pod-a or the LeaseConflict event:\n%s", other, out)
		}
	}

	a2 := startBin(t, append(append(base, "SYNC_DIR="+t.TempDir()), podA...))
	a2.waitLog(t, "msg=watching", 30*time.Second)
	if !strings.Contains(a2.output(), "taking over lease") {
		t.Errorf("pod-a did not say it took the lease over:\n%s", a2.output())
	}
	a2.cmd.Process.Signal(syscall.SIGTERM)
	if code := a2.wait(t, 30*time.Second); code != 0 {
		t.Fatalf("exit %d after SIGTERM\n%s", code, a2.output())
	}
	if objectExists(srv, prefix+"/lease.json") {
		t.Error("lease.json still there after a clean shutdown")
	}
}

// SIGTERM uploads what is pending (settle time of an hour: nothing went
// before), writes the final snapshot, releases the lease and exits 0. With
// S3 refusing writes, the drain ends at SYNC_SHUTDOWN_TIMEOUT with exit 1
// naming what was left.
func testSIGTERMDrain(t *testing.T, srv *peers.S3Server) {
	const prefix = "drain"
	dir := t.TempDir()
	p := startBin(t, append(srv.AgentEnv(prefix), "SYNC_DIR="+dir, "SYNC_HTTP_ADDR=127.0.0.1:0", "POD_NAME=drain",
		"SYNC_SETTLE=1h", "SYNC_SNAPSHOT_INTERVAL=0"))
	p.waitLog(t, "msg=watching", 30*time.Second)
	want := map[string][]byte{}
	for i := range 30 {
		rel := fmt.Sprintf("batch/%02d.dat", i)
		want[rel] = randBytes(uint64(i), 2000+i)
		writeFile(t, filepath.Join(dir, rel), want[rel])
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	if code := p.wait(t, 30*time.Second); code != 0 {
		t.Fatalf("exit %d after SIGTERM\n%s", code, p.output())
	}
	for rel, b := range want {
		waitObject(t, srv, prefix, rel, b, time.Second)
	}
	m, err := latestSnapshot(t, s3Store(t, srv, prefix))
	if err != nil {
		t.Fatalf("no final snapshot: %v", err)
	}
	if len(m.Files) != len(want) {
		t.Errorf("final snapshot lists %d files, want %d", len(m.Files), len(want))
	}
	for _, f := range m.Files {
		if _, ok := want[f.Path]; !ok {
			t.Errorf("final snapshot lists %s", f.Path)
		}
	}
	if objectExists(srv, prefix+"/lease.json") {
		t.Error("lease not released")
	}

	// Past the timeout: exit 1 and the list of what was left.
	proxy := peers.NewCountingProxy(t, srv.Endpoint)
	dir2 := t.TempDir()
	q := startBin(t, append(srv.AgentEnv(prefix+"-timeout"), "S3_ENDPOINT="+proxy.URL, "SYNC_DIR="+dir2, "SYNC_HTTP_ADDR=off",
		"POD_NAME=drain2", "SYNC_SETTLE=1h", "SYNC_SHUTDOWN_TIMEOUT=2s"))
	q.waitLog(t, "msg=watching", 30*time.Second)
	proxy.FailWith(http.StatusServiceUnavailable, func(r *http.Request) bool {
		return r.Method == http.MethodPut && strings.Contains(r.URL.Path, "/data/")
	})
	writeFile(t, filepath.Join(dir2, "stuck.txt"), []byte("S3 refuses this"))
	q.cmd.Process.Signal(syscall.SIGTERM)
	if code := q.wait(t, 30*time.Second); code != 1 {
		t.Fatalf("exit %d past SYNC_SHUTDOWN_TIMEOUT, want 1\n%s", code, q.output())
	}
	if !strings.Contains(q.output(), "stuck.txt") || !strings.Contains(q.output(), "SYNC_SHUTDOWN_TIMEOUT") {
		t.Errorf("the exit does not name what was left:\n%s", q.output())
	}
}

// Deletions (SYNC_DELETE=true) that would remove more than half of the files
// this writer had are held back, with a metric and an event, until the state
// changes: the fold of the log keeps every file meanwhile.
func testMassDeleteGuard(t *testing.T, srv *peers.S3Server) {
	const prefix = "guard"
	dir := t.TempDir()
	outside := t.TempDir()
	// Eight files in vol/ disappear at once (one rename, like an unmount).
	for i := range 10 {
		rel := fmt.Sprintf("f%d.txt", i)
		if i < 8 {
			rel = "vol/" + rel
		}
		writeFile(t, filepath.Join(dir, rel), []byte(fmt.Sprintf("file %d", i)))
	}
	r := startSyncer(t, testConfig(t, srv, srv.Endpoint, prefix, dir, "SYNC_SETTLE=100ms", "SYNC_DELETE=true"))
	st := s3Store(t, srv, prefix)
	snapWith := func(n int) error {
		return peers.WaitFor(context.Background(), 30*time.Second, func() error {
			m, err := latestSnapshot(t, st)
			if err != nil {
				return err
			}
			if len(m.Files) != n {
				return fmt.Errorf("latest snapshot %s lists %d files, want %d", m.ID, len(m.Files), n)
			}
			return nil
		})
	}
	if err := snapWith(10); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(dir, "vol"), filepath.Join(outside, "vol")); err != nil {
		t.Fatal(err)
	}
	err := peers.WaitFor(context.Background(), 30*time.Second, func() error {
		if gaugeValue(r.s.health, "podkeeper_syncer_mass_delete_blocked") != 1 || !r.rec.has("MassDeleteBlocked") {
			return fmt.Errorf("guard not reported")
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if m, err := latestSnapshot(t, st); err != nil || len(m.Files) != 10 {
		t.Fatalf("deletions of 8 of 10 files reached the log: %v %v", m, err)
	}
	// Four come back: 6 of 10 present drops 4, within the guard.
	for i := range 4 {
		writeFile(t, filepath.Join(dir, "vol", fmt.Sprintf("f%d.txt", i)), []byte(fmt.Sprintf("file %d again", i)))
	}
	if err := snapWith(6); err != nil {
		t.Fatal(err)
	}
	if v := gaugeValue(r.s.health, "podkeeper_syncer_mass_delete_blocked"); v != 0 {
		t.Errorf("mass_delete_blocked = %v after the state changed", v)
	}
	if m, _ := latestSnapshot(t, st); m != nil {
		for _, f := range m.Files {
			if _, err := os.Stat(filepath.Join(dir, f.Path)); err != nil {
				t.Errorf("snapshot lists %s which is gone", f.Path)
			}
		}
	}
}

// S3 is stopped for 10 s while files keep coming; everything arrives after
// the restart.
func testOutage(t *testing.T, srv *peers.S3Server) {
	const prefix = "outage"
	dir := t.TempDir()
	r := startSyncer(t, testConfig(t, srv, srv.Endpoint, prefix, dir, "SYNC_SETTLE=100ms", "SYNC_SNAPSHOT_INTERVAL=500ms"))
	want := map[string][]byte{}
	n := 0
	add := func() {
		rel := fmt.Sprintf("o/%03d.bin", n)
		want[rel] = randBytes(uint64(n), 3000+n)
		writeFile(t, filepath.Join(dir, rel), want[rel])
		n++
	}
	for range 10 {
		add()
	}
	waitObject(t, srv, prefix, "o/000.bin", want["o/000.bin"], 30*time.Second)
	if code, _ := probe(r, "/startupz"); code != http.StatusOK {
		t.Fatalf("/startupz %d while watching", code)
	}
	srv.Stop()
	tick := time.NewTicker(250 * time.Millisecond)
	outage := time.NewTimer(10 * time.Second)
	unready := false
during:
	for {
		select {
		case <-tick.C:
			add()
			if code, body := probe(r, "/readyz"); code == http.StatusServiceUnavailable && strings.Contains(body, "store failing") {
				unready = true
			}
		case <-outage.C:
			break during
		}
	}
	tick.Stop()
	if !unready {
		t.Error("/readyz stayed ready through a 10 s outage that failed uploads")
	}
	srv.Restart(t)
	for range 10 {
		add()
	}
	for rel, b := range want {
		waitObject(t, srv, prefix, rel, b, 90*time.Second)
	}
	waitReady(t, r) // ready again once the store answers
	if err := r.shutdown(t); err != nil {
		t.Fatal(err)
	}
	m, err := latestSnapshot(t, s3Store(t, srv, prefix))
	if err != nil || len(m.Files) != len(want) {
		t.Fatalf("final snapshot: %v (%v), want %d files", m, err, len(want))
	}
	if gaugeValue(r.s.health, "podkeeper_syncer_upload_retries_total") == 0 || !r.rec.has("UploadsFailing") {
		t.Error("no retries counted or no UploadsFailing event: the outage did not hit an upload")
	}
	if !r.rec.has("BacklogGrowing") {
		t.Error("no BacklogGrowing event although files waited through a 10 s outage")
	}
}

// A file S3 refuses for good (403) is logged, counted and retried slowly
// without holding back the others; a file over SYNC_MAX_FILE_SIZE is
// skipped with a metric.
func testPermanentError(t *testing.T, srv *peers.S3Server) {
	const prefix = "denied"
	dir := t.TempDir()
	proxy := peers.NewCountingProxy(t, srv.Endpoint)
	proxy.FailWith(http.StatusForbidden, func(r *http.Request) bool {
		return r.Method == http.MethodPut && strings.Contains(r.URL.Path, "/data/secret")
	})
	r := startSyncer(t, testConfig(t, srv, proxy.URL, prefix, dir, "SYNC_SETTLE=100ms", "SYNC_MAX_FILE_SIZE=100000"))
	writeFile(t, filepath.Join(dir, "secret.txt"), []byte("refused"))
	writeFile(t, filepath.Join(dir, "huge.bin"), make([]byte, 100001))
	for i := range 5 {
		writeFile(t, filepath.Join(dir, fmt.Sprintf("ok%d.txt", i)), []byte("fine"))
	}
	for i := range 5 {
		waitObject(t, srv, prefix, fmt.Sprintf("ok%d.txt", i), []byte("fine"), 20*time.Second)
	}
	err := peers.WaitFor(context.Background(), 20*time.Second, func() error {
		if gaugeValue(r.s.health, "podkeeper_syncer_skipped_too_large_total") != 1 {
			return fmt.Errorf("huge.bin not counted as skipped")
		}
		if !r.rec.has("UploadsFailing") {
			return fmt.Errorf("no UploadsFailing event")
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if objectExists(srv, prefix+"/data/secret.txt") || objectExists(srv, prefix+"/data/huge.bin") {
		t.Error("refused or oversize file is in the bucket")
	}
	// Once S3 accepts it, the next attempt (minutes later in production) would
	// succeed; at shutdown the drain tries the pending file once more.
	proxy.FailWith(0, nil)
	if err := r.shutdown(t); err != nil {
		t.Fatal(err)
	}
	waitObject(t, srv, prefix, "secret.txt", []byte("refused"), time.Second)
}

// Compaction under its lease: with SYNC_SNAPSHOT_RETAIN=1 one checkpoint is
// left and the batches it folds are deleted; with SYNC_DELETE=true the data
// object of a deleted file (a tombstone older than the margin, in no kept
// checkpoint) is deleted; without it, it stays and the file stays restorable.
func testRetentionDelete(t *testing.T, srv *peers.S3Server) {
	for _, del := range []bool{true, false} {
		prefix := fmt.Sprintf("retain-%v", del)
		dir := t.TempDir()
		for i := range 4 {
			writeFile(t, filepath.Join(dir, fmt.Sprintf("f%d.txt", i)), []byte("x"))
		}
		cfg := testConfig(t, srv, srv.Endpoint, prefix, dir, "SYNC_SETTLE=100ms", "SYNC_SNAPSHOT_RETAIN=1",
			"SYNC_SNAPSHOT_INTERVAL=200ms", fmt.Sprintf("SYNC_DELETE=%v", del))
		const margin = 2 * time.Second
		r := startSyncer(t, cfg, func(s *Syncer) { s.comp.margin = margin })
		st := s3Store(t, srv, prefix)
		waitSnap := func(n int) { t.Helper(); waitState(t, st, n) }
		waitSnap(4)
		os.Remove(filepath.Join(dir, "f0.txt"))
		want := 4 // union: without SYNC_DELETE a removed file stays restorable
		if del {
			want = 3
		}
		waitSnap(want) // with SYNC_DELETE the tombstone's batch is stored once the fold shows it
		// A checkpoint folds the log once its batches are older than the margin.
		if err := peers.WaitFor(context.Background(), 30*time.Second, func() error {
			all, err := snapshot.List(context.Background(), st)
			if err != nil || len(all) != 1 {
				return fmt.Errorf("checkpoints: %v %v", all, err)
			}
			if batches, err := changelog.List(context.Background(), st, time.Time{}); err != nil || len(batches) != 0 {
				return fmt.Errorf("batches left: %v %v", batches, err)
			}
			if del && objectExists(srv, prefix+"/data/f0.txt") {
				return fmt.Errorf("data/f0.txt still there")
			}
			return nil
		}); err != nil {
			t.Fatalf("SYNC_DELETE=%v: %v", del, err)
		}
		if err := r.shutdown(t); err != nil {
			t.Fatal(err)
		}
		if objectExists(srv, prefix+"/"+CompactionKey) {
			t.Error("compaction lease left behind")
		}
		if !objectExists(srv, prefix+"/data/f1.txt") {
			t.Errorf("SYNC_DELETE=%v deleted a file that is still present", del)
		}
		if !del && !objectExists(srv, prefix+"/data/f0.txt") {
			t.Error("SYNC_DELETE=false deleted a data object")
		}
		waitSnap(want)
	}
}

// Two syncers, one prefix, the same paths. Identical content is uploaded
// once and is no conflict. Different content is a conflict decided by the
// rule (the newer mtime wins) whichever writer comes first; the loser's
// bytes are kept under conflicts/, with a metric and an UploadConflict event
// on the writer that saw it; the fold names the winner's version, which is
// what data/PATH holds.
func testConflicts(t *testing.T, srv *peers.S3Server) {
	const prefix = "conflicts"
	kc := newKeyCounter(t, srv.Endpoint)
	dirA, dirB := t.TempDir(), t.TempDir()
	a := startSyncer(t, testConfig(t, srv, kc.URL, prefix, dirA, "SYNC_SETTLE=100ms", "POD_NAME=writer-a", "POD_UID=a"))
	b := startSyncer(t, testConfig(t, srv, kc.URL, prefix, dirB, "SYNC_SETTLE=100ms", "POD_NAME=writer-b", "POD_UID=b"))
	old, newer := time.Now().Add(-time.Hour).Truncate(time.Second), time.Now().Truncate(time.Second)
	put := func(dir, rel, content string, mtime time.Time) {
		t.Helper()
		p := filepath.Join(dir, rel)
		writeFile(t, p, []byte(content))
		if err := os.Chtimes(p, mtime, mtime); err != nil {
			t.Fatal(err)
		}
	}
	// same.txt: identical bytes from both.
	put(dirA, "same.txt", "identical", old)
	waitObject(t, srv, prefix, "same.txt", []byte("identical"), 20*time.Second)
	put(dirB, "same.txt", "identical", newer)
	// c.txt: A first with the older mtime, then B with the newer: B wins.
	put(dirA, "c.txt", "c from A", old)
	waitObject(t, srv, prefix, "c.txt", []byte("c from A"), 20*time.Second)
	put(dirB, "c.txt", "c from B", newer)
	// d.txt: B first with the newer mtime, then A with the older: B stays.
	put(dirB, "d.txt", "d from B", newer)
	waitObject(t, srv, prefix, "d.txt", []byte("d from B"), 20*time.Second)
	put(dirA, "d.txt", "d from A", old)

	// e.txt: A writes, removes and recreates it: an update of its own
	// object, no conflict.
	put(dirA, "e.txt", "e first", old)
	waitObject(t, srv, prefix, "e.txt", []byte("e first"), 20*time.Second)
	waitAcked(t, s3Store(t, srv, prefix), "e.txt", "e first") // in the change log: A knows it as its own
	// Whether A sees the removal before the new file (remove + create) or not
	// (an overwrite), its second version is an update of its own object.
	os.Remove(filepath.Join(dirA, "e.txt"))
	put(dirA, "e.txt", "e second", newer)
	waitObject(t, srv, prefix, "e.txt", []byte("e second"), 20*time.Second)

	waitObject(t, srv, prefix, "c.txt", []byte("c from B"), 20*time.Second)
	shaA := func(s string) string { h := sha256.Sum256([]byte(s)); return hex.EncodeToString(h[:]) }
	for _, k := range []string{ConflictKey("c.txt", shaA("c from A")), ConflictKey("d.txt", shaA("d from A"))} {
		if err := peers.WaitFor(context.Background(), 20*time.Second, func() error {
			if !objectExists(srv, prefix+"/"+k) {
				return fmt.Errorf("no %s", k)
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	if err := a.shutdown(t); err != nil {
		t.Fatal(err)
	}
	if err := b.shutdown(t); err != nil {
		t.Fatal(err)
	}
	checkConflictOutcome(t, srv, prefix, kc, a, b)
}

// checkConflictOutcome: winners in data/, losers under conflicts/, the
// fold naming the winners, identical content written once, and each side
// reporting its conflict.
func checkConflictOutcome(t *testing.T, srv *peers.S3Server, prefix string, kc *keyCounter, a, b *running) {
	t.Helper()
	shaA := func(s string) string { h := sha256.Sum256([]byte(s)); return hex.EncodeToString(h[:]) }
	for k, want := range map[string]string{"data/c.txt": "c from B", "data/d.txt": "d from B",
		ConflictKey("c.txt", shaA("c from A")): "c from A", ConflictKey("d.txt", shaA("d from A")): "d from A"} {
		got, meta, err := getObject(context.Background(), srv, prefix+"/"+k)
		if err != nil || string(got) != want {
			t.Errorf("%s: %q %v, want %q", k, got, err, want)
		}
		if meta[MetaWriter] == "" {
			t.Errorf("%s has no writer metadata: %v", k, meta)
		}
	}
	if n := kc.okWrites(http.MethodPut, prefix+"/data/same.txt"); n != 1 {
		t.Errorf("identical content written %d times, want once", n)
	}
	m, err := latestSnapshot(t, s3Store(t, srv, prefix))
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range m.Files {
		if want := map[string]string{"c.txt": "c from B", "d.txt": "d from B", "same.txt": "identical", "e.txt": "e second"}[f.Path]; f.SHA256 != shaA(want) {
			t.Errorf("the fold's %s is not the winner's version %q", f.Path, want)
		}
	}
	ca, cb := gaugeValue(a.s.health, "podkeeper_syncer_conflicts_total"), gaugeValue(b.s.health, "podkeeper_syncer_conflicts_total")
	if ca != 1 || cb != 1 || !a.rec.has("UploadConflict") || !b.rec.has("UploadConflict") {
		t.Errorf("conflicts: A %v (event %v), B %v (event %v); want 1 each (A lost d.txt, B won c.txt)", ca, a.rec.has("UploadConflict"), cb, b.rec.has("UploadConflict"))
	}
}

// Two syncers in poll mode on one directory (a shared volume): every file
// is written to the store once in total, counted at the server as
// successful PUTs, also after a rewrite; the restore state has them all.
func testPollShared(t *testing.T, srv *peers.S3Server) {
	const prefix = "poll"
	kc := newKeyCounter(t, srv.Endpoint)
	dir := t.TempDir()
	var rs []*running
	for _, pod := range []string{"nfs-a", "nfs-b"} {
		rs = append(rs, startSyncer(t, testConfig(t, srv, kc.URL, prefix, dir, "SYNC_WATCH=poll", "SYNC_POLL_INTERVAL=200ms",
			"SYNC_SETTLE=300ms", "POD_NAME="+pod, "POD_UID="+pod)))
	}
	const n = 40
	for i := range n {
		writeFile(t, filepath.Join(dir, fmt.Sprintf("p/%02d.txt", i)), []byte(fmt.Sprintf("polled %d", i)))
	}
	for i := range n {
		waitObject(t, srv, prefix, fmt.Sprintf("p/%02d.txt", i), []byte(fmt.Sprintf("polled %d", i)), 30*time.Second)
	}
	for _, r := range rs { // both walkers have seen (uploaded or found identical) every file
		waitUploads(t, r, n)
	}
	writeFile(t, filepath.Join(dir, "p/00.txt"), []byte("rewritten"))
	waitObject(t, srv, prefix, "p/00.txt", []byte("rewritten"), 30*time.Second)
	for _, r := range rs {
		waitUploads(t, r, n+1)
	}
	for _, r := range rs {
		if err := r.shutdown(t); err != nil {
			t.Fatal(err)
		}
		if r.s.polling != true {
			t.Error("SYNC_WATCH=poll did not poll")
		}
	}
	total := 0
	for i := range n {
		c := kc.okWrites(http.MethodPut, fmt.Sprintf("%s/data/p/%02d.txt", prefix, i))
		total += c
		if want := map[bool]int{true: 2, false: 1}[i == 0]; c != want {
			t.Errorf("p/%02d.txt written %d times, want %d", i, c, want)
		}
	}
	t.Logf("2 pollers, %d files + 1 rewrite: %d successful data PUTs at the server", n, total)
	m, err := latestSnapshot(t, s3Store(t, srv, prefix))
	if err != nil || len(m.Files) != n {
		t.Fatalf("state: %v %v", m, err)
	}
}

// waitUploads waits until r counted n successful uploads (an object found
// already holding the same bytes counts: uploaded once in total).
func waitUploads(t *testing.T, r *running, n int) {
	t.Helper()
	if err := peers.WaitFor(context.Background(), 30*time.Second, func() error {
		if v := gaugeValue(r.s.health, "podkeeper_syncer_uploads_total"); v < float64(n) {
			return fmt.Errorf("%v uploads counted, want %d", v, n)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}

// waitAcked waits until the change log (what a restore gives) holds rel with
// content: its writer acknowledged it.
func waitAcked(t *testing.T, st store.Store, rel, content string) {
	t.Helper()
	h := sha256.Sum256([]byte(content))
	want := hex.EncodeToString(h[:])
	if err := peers.WaitFor(context.Background(), 30*time.Second, func() error {
		m, err := latestSnapshot(t, st)
		if err != nil {
			return err
		}
		for _, f := range m.Files {
			if f.Path == rel && f.SHA256 == want {
				return nil
			}
		}
		return fmt.Errorf("%s not acknowledged yet", rel)
	}); err != nil {
		t.Fatal(err)
	}
}

// waitState waits until the fold of the log (what a restore of latest
// gives) lists n files.
func waitState(t *testing.T, st store.Store, n int) {
	t.Helper()
	if err := peers.WaitFor(context.Background(), 30*time.Second, func() error {
		m, err := latestSnapshot(t, st)
		if err != nil || len(m.Files) != n {
			return fmt.Errorf("latest state: %v %v", m, err)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}
