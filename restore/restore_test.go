package restore

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	s3types "github.com/aws/aws-sdk-go-v2/service/s3/types"

	"github.com/podkeeper/podkeeper/agents/lifecycle"
	"github.com/podkeeper/podkeeper/agents/snapshot"
	"github.com/podkeeper/podkeeper/agents/store"
	"github.com/podkeeper/podkeeper/test/peers"
)

// TestS3 runs every behaviour against each real S3 peer, one server per kind,
// one prefix per case.
func TestS3(t *testing.T) {
	if testing.Short() {
		t.Skip("needs S3 peers")
	}
	for _, kind := range peers.S3Kinds {
		t.Run(kind, func(t *testing.T) {
			srv := peers.StartS3(t, kind)
			t.Run("RoundTrip", func(t *testing.T) { testRoundTrip(t, s3Target(t, srv, "roundtrip", "")) })
			t.Run("NamedAndPointInTime", func(t *testing.T) { testNamedAndPointInTime(t, s3Target(t, srv, "named", "")) })
			t.Run("Modes", func(t *testing.T) { testModes(t, s3Target(t, srv, "modes", "")) })
			t.Run("IfMissing", func(t *testing.T) { testIfMissing(t, s3Target(t, srv, "missing", "")) })
			t.Run("RerunFetchesNothing", func(t *testing.T) {
				proxy := peers.NewCountingProxy(t, srv.Endpoint)
				testRerun(t, s3Target(t, srv, "rerun", proxy.URL), proxy)
			})
			t.Run("Corrupted", func(t *testing.T) { testCorrupted(t, s3Target(t, srv, "corrupt", "")) })
			t.Run("LargeRanged", func(t *testing.T) {
				proxy := peers.NewCountingProxy(t, srv.Endpoint)
				testLarge(t, s3Target(t, srv, "large", proxy.URL), proxy)
			})
			t.Run("Outage", func(t *testing.T) {
				proxy := peers.NewCountingProxy(t, srv.Endpoint)
				testOutage(t, s3Target(t, srv, "outage", proxy.URL), proxy)
			})
			t.Run("Hostile", func(t *testing.T) {
				testHostile(t, func(t *testing.T, prefix string) *target { return s3Target(t, srv, "hostile/"+prefix, "") })
			})
			t.Run("ListVerify", func(t *testing.T) { testListVerify(t, s3Target(t, srv, "ops", "")) })
			if kind == "minio" {
				// versitygw's posix backend keeps no versions unless started with a
				// versioning directory; MinIO versions any bucket on request.
				t.Run("VersionID", func(t *testing.T) { testVersionID(t, srv, s3Target(t, srv, "versions", "")) })
			}
		})
	}
}

// The same behaviours on the file:// store (no server): fast, and the demo's store.
func TestFileStore(t *testing.T) {
	t.Run("RoundTrip", func(t *testing.T) { testRoundTrip(t, fileTarget(t)) })
	t.Run("Modes", func(t *testing.T) { testModes(t, fileTarget(t)) })
	t.Run("Corrupted", func(t *testing.T) { testCorrupted(t, fileTarget(t)) })
	t.Run("Hostile", func(t *testing.T) { testHostile(t, func(t *testing.T, _ string) *target { return fileTarget(t) }) })
}

func testRoundTrip(t *testing.T, tg *target) {
	files := sampleFiles("x")
	m := tg.putSnapshot(t, baseTime, files)
	dir := filepath.Join(t.TempDir(), "data")
	res, rec, err := tg.run(t, dir)
	if err != nil {
		t.Fatal(err)
	}
	assertTree(t, dir, files)
	assertNoTemp(t, filepath.Join(dir, StateDirName))
	if res.Snapshot != m.ID || res.Fetched != len(files) || res.Outcome != "restored" {
		t.Errorf("result %+v", res)
	}
	saved, err := ReadResult(filepath.Join(dir, StateDirName))
	if err != nil {
		t.Fatal(err)
	}
	if saved.Snapshot != m.ID || saved.Files != len(files) || saved.Bytes != res.Bytes {
		t.Errorf("restored.json %+v", saved)
	}
	if ev := rec.all(); !strings.Contains(ev, "Normal Restored: snapshot "+m.ID) {
		t.Errorf("events: %s", ev)
	}
	// Durability mode FsyncEach gives the same result.
	dir2 := filepath.Join(t.TempDir(), "data")
	r := New(tg.cfg(t, dir2), lifecycle.Deps{Store: tg.st, Log: testLog(t)})
	r.Durability = FsyncEach
	if _, err := r.Run(context.Background()); err != nil {
		t.Fatal(err)
	}
	assertTree(t, dir2, files)
}

func testNamedAndPointInTime(t *testing.T, tg *target) {
	old := sampleFiles("o")
	newer := sampleFiles("n")
	delete(newer, "a.txt")
	t1, t2 := baseTime, baseTime.Add(time.Hour)
	m1 := tg.putSnapshot(t, t1, old)
	// The newer snapshot overwrites data objects; the old one must still be
	// restorable by id when its objects are unchanged, so use new paths there.
	newer2 := map[string]entry{}
	for p, e := range newer {
		newer2["v2/"+p] = e
	}
	m2 := tg.putSnapshot(t, t2, newer2)

	dir := t.TempDir()
	res, _, err := tg.run(t, dir)
	if err != nil || res.Snapshot != m2.ID {
		t.Fatalf("latest: %v %+v", err, res)
	}
	assertTree(t, dir, newer2)

	dir = t.TempDir()
	res, _, err = tg.run(t, dir, "RESTORE_SNAPSHOT", m1.ID)
	if err != nil || res.Snapshot != m1.ID {
		t.Fatalf("by id: %v %+v", err, res)
	}
	assertTree(t, dir, old)

	for spec, want := range map[string]string{
		t1.Add(30 * time.Minute).Format(time.RFC3339): m1.ID, // between: the older one
		t1.Format(time.RFC3339Nano):                   m1.ID, // exactly at
		t2.Add(time.Minute).Format(time.RFC3339):      m2.ID,
	} {
		dir = t.TempDir()
		res, _, err = tg.run(t, dir, "RESTORE_SNAPSHOT", spec)
		if err != nil || res.Snapshot != want {
			t.Errorf("at %s: %v %+v, want %s", spec, err, res, want)
		}
	}
	// Before the first snapshot: nothing to restore, and with fail it fails.
	before := t1.Add(-time.Hour).Format(time.RFC3339)
	dir = t.TempDir()
	res, _, err = tg.run(t, dir, "RESTORE_SNAPSHOT", before)
	if err != nil || res.Outcome != "no-snapshot" {
		t.Errorf("before first, empty: %v %+v", err, res)
	}
	_, _, err = tg.run(t, dir, "RESTORE_SNAPSHOT", before, "RESTORE_IF_MISSING", "fail")
	if !errors.Is(err, snapshot.ErrNoSnapshot) {
		t.Errorf("before first, fail: %v", err)
	}
	// An id that does not exist.
	_, _, err = tg.run(t, dir, "RESTORE_SNAPSHOT", snapshot.NewID(t1.Add(time.Second), ""), "RESTORE_IF_MISSING", "fail")
	if !errors.Is(err, snapshot.ErrNoSnapshot) {
		t.Errorf("unknown id: %v", err)
	}
}

func testModes(t *testing.T, tg *target) {
	files := sampleFiles("m")
	tg.putSnapshot(t, baseTime, files)

	local := func(t *testing.T) string {
		dir := t.TempDir()
		writeLocal(t, dir, "extra.txt", []byte("mine"))
		writeLocal(t, dir, "extra-dir/x", []byte("mine too"))
		writeLocal(t, dir, "a.txt", []byte("a different content")) // different: restored
		writeLocal(t, dir, ".podkeeper/syncer-state", []byte("kept"))
		return dir
	}
	t.Run("merge", func(t *testing.T) {
		dir := local(t)
		res, _, err := tg.run(t, dir)
		if err != nil {
			t.Fatal(err)
		}
		want := map[string]entry{}
		for p, e := range files {
			want[p] = e
		}
		want["extra.txt"] = entry{data: []byte("mine"), mode: 0o644}
		want["extra-dir/x"] = entry{data: []byte("mine too"), mode: 0o644}
		for _, p := range []string{"extra.txt", "extra-dir/x"} {
			fi, _ := os.Stat(filepath.Join(dir, p))
			e := want[p]
			e.mtime = fi.ModTime()
			want[p] = e
		}
		assertTree(t, dir, want)
		if res.Removed != 0 || res.Fetched != len(files) {
			t.Errorf("%+v", res)
		}
	})
	t.Run("mirror", func(t *testing.T) {
		dir := local(t)
		// A directory where the snapshot has a file, and a file where it has a directory.
		writeLocal(t, dir, "empty/inner", []byte("in the way"))
		writeLocal(t, dir, "dir/sub/deep", []byte("file in the way of a dir"))
		os.Remove(filepath.Join(dir, "dir/sub/deep/d.json"))
		res, _, err := tg.run(t, dir, "RESTORE_MODE", "mirror")
		if err != nil {
			t.Fatal(err)
		}
		assertTree(t, dir, files)
		if b, err := os.ReadFile(filepath.Join(dir, ".podkeeper/syncer-state")); err != nil || string(b) != "kept" {
			t.Errorf("state dir touched: %v %q", err, b)
		}
		if _, err := os.Stat(filepath.Join(dir, "extra-dir")); !os.IsNotExist(err) {
			t.Errorf("extra dir kept: %v", err)
		}
		if res.Removed < 4 {
			t.Errorf("%+v", res)
		}
	})
	t.Run("merge refuses what mirror removes", func(t *testing.T) {
		dir := t.TempDir()
		writeLocal(t, dir, "empty/inner", []byte("a directory where the snapshot has a file"))
		_, _, err := tg.run(t, dir)
		var ce *ConflictError
		if !errors.As(err, &ce) || !strings.Contains(err.Error(), "mirror") {
			t.Fatalf("got %v", err)
		}
		if got := listTree(t, dir); len(got) != 1 {
			t.Errorf("merge conflict wrote files: %v", got)
		}
	})
	t.Run("skip-if-not-empty", func(t *testing.T) {
		dir := local(t)
		before := fingerprint(t, dir)
		res, rec, err := tg.run(t, dir, "RESTORE_MODE", "skip-if-not-empty")
		if err != nil || res.Outcome != "not-empty" {
			t.Fatalf("%v %+v", err, res)
		}
		if fingerprint(t, dir) != before {
			t.Error("skip-if-not-empty changed the directory")
		}
		if !strings.Contains(rec.all(), "RestoreSkipped") {
			t.Error(rec.all())
		}
		// Only the state dir: counts as empty, so it restores.
		dir = t.TempDir()
		writeLocal(t, dir, ".podkeeper/syncer-state", []byte("kept"))
		res, _, err = tg.run(t, dir, "RESTORE_MODE", "skip-if-not-empty")
		if err != nil || res.Outcome != "restored" {
			t.Fatalf("%v %+v", err, res)
		}
		assertTree(t, dir, files)
	})
	t.Run("fail-if-not-empty", func(t *testing.T) {
		dir := local(t)
		before := fingerprint(t, dir)
		_, rec, err := tg.run(t, dir, "RESTORE_MODE", "fail-if-not-empty")
		if !errors.Is(err, ErrNotEmpty) {
			t.Fatalf("got %v", err)
		}
		if fingerprint(t, dir) != before {
			t.Error("fail-if-not-empty changed the directory")
		}
		if !strings.Contains(rec.all(), "Warning RestoreFailed") {
			t.Error(rec.all())
		}
		dir = t.TempDir()
		if _, _, err := tg.run(t, dir, "RESTORE_MODE", "fail-if-not-empty"); err != nil {
			t.Fatal(err)
		}
		assertTree(t, dir, files)
	})
}

func testIfMissing(t *testing.T, tg *target) {
	dir := filepath.Join(t.TempDir(), "new")
	res, rec, err := tg.run(t, dir)
	if err != nil || res.Outcome != "no-snapshot" {
		t.Fatalf("empty: %v %+v", err, res)
	}
	if !strings.Contains(rec.all(), "NothingToRestore") {
		t.Error(rec.all())
	}
	if _, err := os.Stat(filepath.Join(dir, StateDirName, ResultName)); !os.IsNotExist(err) {
		t.Errorf("restored.json written without a restore: %v", err)
	}
	_, rec, err = tg.run(t, dir, "RESTORE_IF_MISSING", "fail")
	if !errors.Is(err, snapshot.ErrNoSnapshot) || !strings.Contains(err.Error(), "RESTORE_IF_MISSING=fail") {
		t.Fatalf("fail: %v", err)
	}
	if !strings.Contains(rec.all(), "RestoreFailed") {
		t.Error(rec.all())
	}
}

func testRerun(t *testing.T, tg *target, proxy *peers.CountingProxy) {
	files := sampleFiles("r")
	tg.putSnapshot(t, baseTime, files)
	dir := t.TempDir()
	proxy.Reset()
	if _, _, err := tg.run(t, dir); err != nil {
		t.Fatal(err)
	}
	if got := proxy.Count("GET"); got != len(files)+1 {
		t.Errorf("first run: %d GETs, want %d (files + manifest)", got, len(files)+1)
	}
	proxy.Reset()
	res, _, err := tg.run(t, dir)
	if err != nil {
		t.Fatal(err)
	}
	if got, ranged := proxy.Count("GET"), proxy.Count("GET-range"); got != 1 || ranged != 0 {
		t.Errorf("rerun: %d GETs, %d ranged; want only the manifest (%v)", got, ranged, proxy.Counts())
	}
	if res.Fetched != 0 || res.Skipped != len(files) {
		t.Errorf("rerun result %+v", res)
	}
	assertTree(t, dir, files)

	// Touched mtime and mode, same content: fixed from the disk, no download.
	p := filepath.Join(dir, "dir/b.bin")
	os.Chtimes(p, time.Now(), time.Now())
	os.Chmod(p, 0o600)
	proxy.Reset()
	res, _, err = tg.run(t, dir)
	if err != nil {
		t.Fatal(err)
	}
	if proxy.Count("GET") != 1 || res.Fixed != 1 || res.Fetched != 0 {
		t.Errorf("metadata fix: %v %+v", proxy.Counts(), res)
	}
	assertTree(t, dir, files)
}

func testCorrupted(t *testing.T, tg *target) {
	files := sampleFiles("c")
	m := tg.putSnapshot(t, baseTime, files)
	// The object changes after the snapshot: same size, other bytes.
	bad := bytes.Repeat([]byte{9}, len(files["dir/b.bin"].data))
	if _, err := tg.st.Put(context.Background(), snapshot.DataKey("dir/b.bin"), bytes.NewReader(bad), int64(len(bad)), store.PutOptions{}); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	_, rec, err := tg.run(t, dir)
	var ce *ChangedError
	if !errors.As(err, &ce) || ce.Path != "dir/b.bin" || !strings.Contains(err.Error(), "changed after the snapshot") || !strings.Contains(err.Error(), `"dir/b.bin"`) {
		t.Fatalf("got %v", err)
	}
	if !strings.Contains(rec.all(), "RestoreFailed") {
		t.Error(rec.all())
	}
	if _, err := os.Lstat(filepath.Join(dir, "dir/b.bin")); !os.IsNotExist(err) {
		t.Errorf("corrupt file visible under its name: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, StateDirName, ResultName)); !os.IsNotExist(err) {
		t.Error("restored.json written after a failure")
	}
	assertNoTemp(t, filepath.Join(dir, StateDirName))
	// A different size is caught as a change too.
	if _, err := tg.st.Put(context.Background(), snapshot.DataKey("dir/b.bin"), bytes.NewReader(bad[:10]), 10, store.PutOptions{}); err != nil {
		t.Fatal(err)
	}
	_, _, err = tg.run(t, dir)
	if !errors.As(err, &ce) || !strings.Contains(err.Error(), "size") {
		t.Fatalf("size change: %v", err)
	}
	// With verification off the content mismatch passes (size still checked).
	if _, err := tg.st.Put(context.Background(), snapshot.DataKey("dir/b.bin"), bytes.NewReader(bad), int64(len(bad)), store.PutOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, _, err := tg.run(t, dir, "RESTORE_VERIFY", "false"); err != nil {
		t.Fatalf("verify off: %v", err)
	}
	_ = m
}

func testLarge(t *testing.T, tg *target, proxy *peers.CountingProxy) {
	big := make([]byte, 7<<20+12345) // 8 parts of 1 MiB in tests
	rand.Read(big)
	files := sampleFiles("L")
	files["big/blob"] = entry{data: big, mode: 0o600, mtime: baseTime}
	tg.putSnapshot(t, baseTime, files)
	dir := t.TempDir()
	proxy.Reset()
	if _, _, err := tg.run(t, dir, "RESTORE_CONCURRENCY", "4"); err != nil {
		t.Fatal(err)
	}
	if got := proxy.Count("GET-range"); got != 8 {
		t.Errorf("%d ranged GETs, want 8 (%v)", got, proxy.Counts())
	}
	assertTree(t, dir, files)

	// Corrupt the large object: the in-order hash catches it.
	big[5<<20] ^= 0xff
	if _, err := tg.st.Put(context.Background(), snapshot.DataKey("big/blob"), bytes.NewReader(big), int64(len(big)), store.PutOptions{}); err != nil {
		t.Fatal(err)
	}
	os.Remove(filepath.Join(dir, "big/blob"))
	_, _, err := tg.run(t, dir)
	var ce *ChangedError
	if !errors.As(err, &ce) || ce.Path != "big/blob" {
		t.Fatalf("got %v", err)
	}
	assertNoTemp(t, filepath.Join(dir, StateDirName))
}

// An outage (every data GET answered 503) delays the restore; it completes
// once the server answers again and loses nothing.
func testOutage(t *testing.T, tg *target, proxy *peers.CountingProxy) {
	files := sampleFiles("u")
	tg.putSnapshot(t, baseTime, files)
	dir := t.TempDir()
	proxy.FailWith(http.StatusServiceUnavailable, func(r *http.Request) bool {
		return r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/data/")
	})
	done := make(chan error, 1)
	logs := &peers.LockedBuffer{}
	r := New(tg.cfg(t, dir), lifecycle.Deps{Store: tg.st, Log: slog.New(slog.NewTextHandler(logs, nil))})
	r.progressEvery = 30 * time.Millisecond
	go func() { _, err := r.Run(context.Background()); done <- err }()
	if err := peers.WaitFor(context.Background(), 30*time.Second, func() error {
		if n := proxy.Count("GET"); n < 3*len(files) {
			return errors.New("waiting for the restore to retry through the outage")
		}
		// The periodic progress line reports while it waits.
		if !strings.Contains(logs.String(), "msg=progress files=0 files_total=6") {
			return errors.New("no progress line yet")
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		t.Fatalf("restore ended during the outage: %v", err)
	default:
	}
	proxy.FailWith(0, nil)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	assertTree(t, dir, files)
	if out := logs.String(); !strings.Contains(out, "download failed, retrying") || !strings.Contains(out, "msg=restored") {
		t.Errorf("log lacks the retries or the summary:\n%s", out)
	}
}

func testListVerify(t *testing.T, tg *target) {
	files := sampleFiles("v")
	m1 := tg.putSnapshot(t, baseTime, files)
	m2 := tg.putSnapshot(t, baseTime.Add(time.Minute), map[string]entry{"only": {data: []byte("one"), mode: 0o644, mtime: baseTime}})
	tg.putRaw(t, snapshot.NewID(baseTime.Add(2*time.Minute), "broken"), []byte("{not json"))
	ctx := context.Background()
	list, err := List(ctx, tg.st)
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 3 || list[0].ID != m1.ID || list[0].Files != len(files) || list[1].ID != m2.ID || list[1].Bytes != 3 || list[2].Err == nil {
		t.Fatalf("list: %+v", list)
	}
	var out bytes.Buffer
	PrintList(&out, list)
	if !strings.Contains(out.String(), m1.ID) || !strings.Contains(out.String(), "UNREADABLE") {
		t.Errorf("list output:\n%s", out.String())
	}

	for _, deep := range []bool{false, true} {
		rep, err := Verify(ctx, tg.st, m1.ID, deep, 4)
		if err != nil || len(rep.Problems) != 0 || rep.Files != len(files) {
			t.Fatalf("verify deep=%v: %v %+v", deep, err, rep)
		}
	}
	// Object replaced with other bytes but the recorded metadata: only --deep sees it.
	f := m1.Files[1]
	bad := bytes.Repeat([]byte{7}, int(f.Size))
	if _, err := tg.st.Put(ctx, snapshot.DataKey(f.Path), bytes.NewReader(bad), f.Size, store.PutOptions{Metadata: f.Metadata()}); err != nil {
		t.Fatal(err)
	}
	// Another object deleted: both see it.
	gone := m1.Files[2].Path
	if err := tg.st.Delete(ctx, snapshot.DataKey(gone)); err != nil {
		t.Fatal(err)
	}
	rep, err := Verify(ctx, tg.st, m1.ID, false, 4)
	if err != nil || len(rep.Problems) != 1 || rep.Problems[0].Path != gone || !strings.Contains(rep.Problems[0].Reason, "missing") {
		t.Fatalf("shallow: %v %+v", err, rep)
	}
	rep, err = Verify(ctx, tg.st, m1.ID, true, 4)
	if err != nil || len(rep.Problems) != 2 {
		t.Fatalf("deep: %v %+v", err, rep)
	}
}

// A snapshot entry with a version_id restores that version even after the
// object was overwritten.
func testVersionID(t *testing.T, srv *peers.S3Server, tg *target) {
	ctx := context.Background()
	c := srv.Client()
	if _, err := c.PutBucketVersioning(ctx, &s3.PutBucketVersioningInput{Bucket: aws.String(peers.Bucket),
		VersioningConfiguration: &s3types.VersioningConfiguration{Status: s3types.BucketVersioningStatusEnabled}}); err != nil {
		t.Fatal(err)
	}
	defer c.PutBucketVersioning(ctx, &s3.PutBucketVersioningInput{Bucket: aws.String(peers.Bucket),
		VersioningConfiguration: &s3types.VersioningConfiguration{Status: s3types.BucketVersioningStatusSuspended}})
	v1 := []byte("version one")
	f := snapshot.File{Path: "doc.txt", Size: int64(len(v1)), SHA256: sum(v1), MTime: baseTime, Mode: 0o644}
	info, err := tg.st.Put(ctx, snapshot.DataKey(f.Path), bytes.NewReader(v1), f.Size, store.PutOptions{Metadata: f.Metadata()})
	if err != nil {
		t.Fatal(err)
	}
	if info.VersionID == "" {
		t.Fatal("no version id from a versioned bucket")
	}
	f.VersionID = info.VersionID
	m := &snapshot.Manifest{Format: snapshot.Format, ID: snapshot.NewID(baseTime, "v"), Created: baseTime, Files: []snapshot.File{f}}
	if _, err := snapshot.Write(ctx, tg.st, m); err != nil {
		t.Fatal(err)
	}
	v2 := []byte("version two, longer")
	if _, err := tg.st.Put(ctx, snapshot.DataKey(f.Path), bytes.NewReader(v2), int64(len(v2)), store.PutOptions{}); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if _, _, err := tg.run(t, dir); err != nil {
		t.Fatal(err)
	}
	assertTree(t, dir, map[string]entry{"doc.txt": {data: v1, mode: 0o644, mtime: baseTime}})
	rep, err := Verify(ctx, tg.st, m.ID, true, 2)
	if err != nil || len(rep.Problems) != 0 {
		t.Fatalf("verify of the versioned snapshot: %v %+v", err, rep)
	}
}
