package syncer

import (
	"fmt"
	"io/fs"
	"testing"
	"time"

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
// under it, uploaded, pending or in flight.
func TestGone(t *testing.T) {
	snap := &snapshotter{files: map[string]snapshot.File{}}
	s := &Syncer{snap: snap, q: newQueue(time.Second, 0, snap.uploadedAs)}
	for _, k := range []string{"a/x", "a/y", "a/b/z", "ab", "c"} {
		snap.files[k] = snapshot.File{Path: k}
	}
	s.q.pending["a/b/p"] = &pend{}
	s.q.pending["a/q"] = &pend{inflight: true}
	s.q.pending["c"] = &pend{}
	s.gone("c")
	if _, ok := snap.files["c"]; ok || s.q.pending["c"] != nil || !snap.dirty {
		t.Fatal("file c not forgotten")
	}
	s.gone("a")
	for _, k := range []string{"a/x", "a/y", "a/b/z"} {
		if _, ok := snap.files[k]; ok {
			t.Errorf("%s still listed after its directory was removed", k)
		}
	}
	if _, ok := snap.files["ab"]; !ok {
		t.Error("ab forgotten with directory a")
	}
	if s.q.pending["a/b/p"] != nil || s.q.pending["a/q"] == nil || !s.q.pending["a/q"].removed {
		t.Errorf("pending after removing a: %v", s.q.pending)
	}
}
