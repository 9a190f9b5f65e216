package syncer

import (
	"context"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/podkeeper/podkeeper/agents/changelog"
	"github.com/podkeeper/podkeeper/agents/safefs"
	"github.com/podkeeper/podkeeper/agents/snapshot"
)

// fakeFS is what the queue learns from the filesystem, without one.
type fakeFS map[string]fileStat

func (f fakeFS) stat(rel string) (fileStat, error) {
	st, ok := f[rel]
	if !ok {
		return fileStat{}, fs.ErrNotExist
	}
	return st, nil
}

func fakeFiles(n int) fakeFS {
	f := fakeFS{}
	mtime := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for i := range n {
		f[fmt.Sprintf("f%03d", i)] = fileStat{size: 1, mtime: mtime, mode: 0o644}
	}
	return f
}

func testQueue() *queue {
	return newQueue(time.Second, 0, func(string, fileStat) bool { return false })
}

// A file written again and again keeps one live entry in the due heap, and is
// handed out once, a settle period after its last write.
func TestDuesRewrittenFile(t *testing.T) {
	q, files := testQueue(), fakeFiles(1)
	jobs := make(chan job, 2)
	t0 := time.Now()
	for i := range 1000 {
		q.touch("f000", files["f000"], t0.Add(time.Duration(i)*time.Millisecond), false)
	}
	if len(q.dues) != 1 {
		t.Fatalf("%d heap entries for one file, want 1", len(q.dues))
	}
	last := t0.Add(999 * time.Millisecond)
	// The entry of the first write comes up early and is pushed again.
	if next := q.nextDue(); !next.Equal(t0.Add(time.Second)) {
		t.Fatalf("next due %v, want the first write's 1 s", next.Sub(t0))
	}
	for _, now := range []time.Time{t0.Add(time.Second), last.Add(time.Second - time.Millisecond)} {
		q.dispatch(now, files.stat)
		q.handOut(jobs)
		if len(jobs) != 0 {
			t.Fatalf("handed out at %v, before it settled", now.Sub(t0))
		}
		if len(q.dues) != 1 {
			t.Fatalf("%d heap entries after dispatch, want 1", len(q.dues))
		}
	}
	if next := q.nextDue(); !next.Equal(last.Add(time.Second)) {
		t.Fatalf("next due %v, want %v", next.Sub(t0), last.Add(time.Second).Sub(t0))
	}
	q.dispatch(last.Add(time.Second), files.stat)
	q.handOut(jobs)
	if len(jobs) != 1 {
		t.Fatalf("%d jobs once settled, want 1", len(jobs))
	}
	if len(q.dues) != 0 || !q.nextDue().IsZero() {
		t.Fatalf("heap still holds %d entries for an in-flight file", len(q.dues))
	}
	// Its result (changed during the upload) schedules it again.
	j := <-jobs
	if f := q.finished(result{rel: j.rel, gen: j.gen, changed: true, stat: q.pending["f000"].stat}, last.Add(2*time.Second)); f.outcome != outChanged {
		t.Fatalf("outcome %v of a changed result", f.outcome)
	}
	if next := q.nextDue(); !next.Equal(last.Add(3 * time.Second)) {
		t.Fatalf("after a changed result next due is %v, want 3 s after the last write", next.Sub(last))
	}
}

// Files are handed out in due order, only once due, and removed files leave
// no live entry behind.
func TestDuesOrder(t *testing.T) {
	q, files := testQueue(), fakeFiles(100)
	jobs := make(chan job, 101)
	t0 := time.Now()
	for i := 99; i >= 0; i-- {
		rel := fmt.Sprintf("f%03d", i)
		q.touch(rel, files[rel], t0.Add(time.Duration(i)*time.Millisecond), false)
	}
	q.forgetTree("f050", false)
	q.dispatch(t0.Add(time.Second+49*time.Millisecond), files.stat)
	q.handOut(jobs)
	if len(jobs) != 50 {
		t.Fatalf("%d jobs, want the 50 due ones", len(jobs))
	}
	for i := range 50 {
		if j := <-jobs; j.rel != fmt.Sprintf("f%03d", i) {
			t.Fatalf("job %d is %s: not in due order", i, j.rel)
		}
	}
	q.dispatch(t0.Add(2*time.Second), files.stat)
	q.handOut(jobs)
	if len(jobs) != 49 {
		t.Fatalf("%d jobs, want the 49 left (f050 was removed)", len(jobs))
	}
}

// Removing a file forgets only it; removing a directory forgets everything
// under it, uploaded, pending or in flight. With SYNC_DELETE each file this
// writer had becomes a tombstone; a path it never had does not.
func TestGone(t *testing.T) {
	snap := newLedger(&Config{Delete: true}, nil, nil, nil, nil, changelog.Writer{Pod: "p"})
	snap.live = true
	s := &Syncer{led: snap, q: newQueue(time.Second, 0, snap.uploadedAs)}
	for _, k := range []string{"a/x", "a/y", "a/b/z", "ab", "c"} {
		snap.files.set(snapshot.File{Path: k})
	}
	s.q.pending["a/b/p"] = &pend{}
	s.q.pending["a/q"] = &pend{inflight: true}
	s.q.pending["c"] = &pend{}
	s.gone("c")
	if _, ok := snap.files.get("c"); ok || s.q.pending["c"] != nil || !snap.staged["c"].Deleted {
		t.Fatal("file c not forgotten or not tombstoned")
	}
	s.gone("never-had")
	if _, ok := snap.staged["never-had"]; ok {
		t.Fatal("a path this writer never had was tombstoned")
	}
	s.gone("a")
	for _, k := range []string{"a/x", "a/y", "a/b/z"} {
		if _, ok := snap.files.get(k); ok {
			t.Errorf("%s still listed after its directory was removed", k)
		}
	}
	if _, ok := snap.files.get("ab"); !ok {
		t.Error("ab forgotten with directory a")
	}
	if n := snap.tombstones(); n != 4 {
		t.Errorf("%d tombstones, want 4 (c, a/x, a/y, a/b/z)", n)
	}
	if s.q.pending["a/b/p"] != nil || s.q.pending["a/q"] == nil || !s.q.pending["a/q"].removed {
		t.Errorf("pending after removing a: %v", s.q.pending)
	}
}

// What a due file's stat decides: removed files are forgotten everywhere,
// non-files dropped, uploaded ones dropped, oversize ones skipped with one
// warning while unchanged, files still changing wait another settle period
// (unless renamed in), and the rest go to workers in due order.
func TestQueueChecks(t *testing.T) {
	t0 := time.Now()
	mtime := t0.Add(-time.Hour)
	st := func(size int64) fileStat { return fileStat{size: size, mtime: mtime, mode: 0o644} }
	files := fakeFS{"dev": st(1), "same": st(5), "big": st(200), "moved": st(7), "renamed": st(8), "ok": st(9)}
	q := newQueue(time.Second, 100, func(rel string, s fileStat) bool { return rel == "same" && s.same(st(5)) })
	stat := func(rel string) (fileStat, error) {
		if rel == "dev" {
			return fileStat{}, errNotRegular
		}
		return files.stat(rel)
	}
	for _, rel := range []string{"gone", "dev", "same", "big", "ok"} {
		q.touch(rel, files[rel], t0, false)
	}
	q.touch("moved", st(6), t0, false)                    // grew since its event
	q.touch("renamed", st(3), t0.Add(-time.Second), true) // renamed in: no settle, no second look
	v := q.dispatch(t0.Add(time.Second), stat)
	if len(v.gone) != 1 || v.gone[0] != "gone" {
		t.Errorf("gone %v, want [gone]", v.gone)
	}
	if len(v.tooLarge) != 1 || v.tooLarge[0] != (tooLarge{rel: "big", size: 200}) {
		t.Errorf("too large %v, want [big 200]", v.tooLarge)
	}
	for _, rel := range []string{"gone", "dev", "same", "big"} {
		if q.pending[rel] != nil {
			t.Errorf("%s still pending", rel)
		}
	}
	if p := q.pending["moved"]; p == nil || p.queued || !p.due.Equal(t0.Add(2*time.Second)) || !p.stat.same(st(7)) {
		t.Errorf("a file that changed without an event: %+v, want it to settle again from now", p)
	}
	jobs := make(chan job, 10)
	q.handOut(jobs)
	close(jobs)
	var got []string
	for j := range jobs {
		got = append(got, j.rel)
	}
	if fmt.Sprint(got) != "[renamed ok]" {
		t.Errorf("handed out %v, want [renamed ok]", got)
	}
	// Skipped once while unchanged; a changed file is warned about again.
	q.touch("big", st(200), t0.Add(2*time.Second), false)
	if v := q.dispatch(t0.Add(3*time.Second), stat); len(v.tooLarge) != 0 {
		t.Errorf("unchanged oversize file warned about again: %v", v.tooLarge)
	}
	files["big"] = st(300)
	q.touch("big", st(300), t0.Add(3*time.Second), false)
	if v := q.dispatch(t0.Add(4*time.Second), stat); len(v.tooLarge) != 1 {
		t.Errorf("changed oversize file not warned about: %v", v.tooLarge)
	}
}

// Failed uploads are retried later and later, up to ten minutes apart; a
// drain makes everything, later changes included, due at once.
func TestQueueRetriesAndDrain(t *testing.T) {
	q, files := testQueue(), fakeFiles(2)
	jobs := make(chan job, 1)
	now := time.Now()
	q.touch("f000", files["f000"], now, false)
	for _, want := range []time.Duration{time.Minute, 2 * time.Minute, 4 * time.Minute, 8 * time.Minute, 10 * time.Minute, 10 * time.Minute} {
		now = q.pending["f000"].due
		q.dispatch(now, files.stat)
		q.handOut(jobs)
		j := <-jobs
		f := q.finished(result{rel: j.rel, gen: j.gen, err: fmt.Errorf("denied")}, now)
		if f.outcome != outFailed || f.retryIn != want || !q.nextDue().Equal(now.Add(want)) {
			t.Fatalf("failure %d: %+v, next due in %v; want a retry in %v", f.failures, f, q.nextDue().Sub(now), want)
		}
	}
	q.touch("f001", files["f001"], now, false)
	q.drain(now)
	if !q.pending["f000"].due.Equal(now) || !q.pending["f001"].due.Equal(now) {
		t.Error("drain left files waiting")
	}
	q.touch("f001", files["f001"], now.Add(time.Millisecond), false)
	if !q.pending["f001"].due.Equal(now.Add(time.Millisecond)) {
		t.Error("a change during the drain waits to settle")
	}
}

// A walk that finds a file as uploaded drops it from the queue, unless its
// upload is in flight (the result decides); a successful result of an older
// generation keeps the newer change pending.
func TestQueueConsiderAndStaleResult(t *testing.T) {
	files := fakeFiles(3)
	q := newQueue(time.Second, 0, func(rel string, st fileStat) bool { return rel != "f002" })
	now := time.Now()
	q.pending["f000"] = &pend{}
	q.pending["f001"] = &pend{inflight: true}
	q.consider("f000", files["f000"], now, false)
	q.consider("f001", files["f001"], now, false)
	q.consider("f002", files["f002"], now, false)
	if q.pending["f000"] != nil || q.pending["f001"] == nil || q.pending["f002"] == nil {
		t.Fatalf("pending after a walk: %v", q.pending)
	}
	p := q.pending["f001"]
	p.gen = 2
	if f := q.finished(result{rel: "f001", gen: 1}, now); f.outcome != outUploaded || q.pending["f001"] != p || p.inflight {
		t.Errorf("stale result: %+v, pending %+v; want the newer change kept pending", f, q.pending["f001"])
	}
	if f := q.finished(result{rel: "f002", gone: true}, now); f.outcome != outForget || q.pending["f002"] != nil {
		t.Errorf("gone result: %+v, pending %v", f, q.pending["f002"])
	}
}

// SYNC_WATCH: explicit modes win; auto polls only on a network or FUSE
// filesystem (the test's temp dir is neither).
func TestWatchMode(t *testing.T) {
	dir := t.TempDir()
	if poll, _ := watchMode("poll", dir); !poll {
		t.Error("SYNC_WATCH=poll does not poll")
	}
	if poll, _ := watchMode("inotify", dir); poll {
		t.Error("SYNC_WATCH=inotify polls")
	}
	if poll, fs := watchMode("auto", dir); poll {
		t.Errorf("auto polls on the temp dir (%s)", fs)
	}
}

// The uploader opens files below SYNC_DIR through safefs: a parent directory
// that is a link to outside (swapped in after the file was queued) is never
// followed, and nothing is sent (the store is nil: a Put would panic).
func TestUploadNeverFollowsLinkedParent(t *testing.T) {
	dir, outside := t.TempDir(), t.TempDir()
	if err := os.WriteFile(filepath.Join(outside, "secret"), []byte("outside"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(outside, filepath.Join(dir, "a")); err != nil {
		t.Fatal(err)
	}
	root, err := safefs.OpenRoot(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer root.Close()
	u := &uploader{root: root}
	if r := u.upload(context.Background(), job{rel: "a/secret"}); !r.gone || r.err != nil || r.bytesSent != 0 {
		t.Fatalf("upload through a linked parent: %+v", r)
	}
}
