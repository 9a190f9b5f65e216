package syncer

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/podkeeper/podkeeper/agents/health"
	"github.com/podkeeper/podkeeper/agents/snapshot"
)

func duesSyncer(t *testing.T, files int) *Syncer {
	dir := t.TempDir()
	for i := range files {
		if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("f%03d", i)), []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return &Syncer{cfg: &Config{Dir: dir, Settle: time.Second}, pending: map[string]*pend{},
		files: map[string]snapshot.File{}, jobs: make(chan job, files+1), m: newMetrics(health.New("syncer"))}
}

func (s *Syncer) touchFile(t *testing.T, rel string, now time.Time) {
	fi, err := os.Lstat(s.abs(rel))
	if err != nil {
		t.Fatal(err)
	}
	s.touch(rel, statOf(fi), now, false)
}

// A file written again and again keeps one live entry in the due heap, and is
// handed out once, a settle period after its last write.
func TestDuesRewrittenFile(t *testing.T) {
	s := duesSyncer(t, 1)
	t0 := time.Now()
	for i := range 1000 {
		s.touchFile(t, "f000", t0.Add(time.Duration(i)*time.Millisecond))
	}
	if len(s.dues) != 1 {
		t.Fatalf("%d heap entries for one file, want 1", len(s.dues))
	}
	last := t0.Add(999 * time.Millisecond)
	// The entry of the first write comes up early and is pushed again.
	if next := s.nextDue(); !next.Equal(t0.Add(time.Second)) {
		t.Fatalf("next due %v, want the first write's 1 s", next.Sub(t0))
	}
	for _, now := range []time.Time{t0.Add(time.Second), last.Add(time.Second - time.Millisecond)} {
		s.dispatch(now)
		if len(s.jobs) != 0 {
			t.Fatalf("handed out at %v, before it settled", now.Sub(t0))
		}
		if len(s.dues) != 1 {
			t.Fatalf("%d heap entries after dispatch, want 1", len(s.dues))
		}
	}
	if next := s.nextDue(); !next.Equal(last.Add(time.Second)) {
		t.Fatalf("next due %v, want %v", next.Sub(t0), last.Add(time.Second).Sub(t0))
	}
	s.dispatch(last.Add(time.Second))
	if len(s.jobs) != 1 {
		t.Fatalf("%d jobs once settled, want 1", len(s.jobs))
	}
	if len(s.dues) != 0 || !s.nextDue().IsZero() {
		t.Fatalf("heap still holds %d entries for an in-flight file", len(s.dues))
	}
	// Its result (changed during the upload) schedules it again.
	j := <-s.jobs
	s.handleResult(result{rel: j.rel, gen: j.gen, changed: true, stat: s.pending["f000"].stat}, last.Add(2*time.Second))
	if next := s.nextDue(); !next.Equal(last.Add(3 * time.Second)) {
		t.Fatalf("after a changed result next due is %v, want 3 s after the last write", next.Sub(last))
	}
}

// Files are handed out in due order, only once due, and removed files leave
// no live entry behind.
func TestDuesOrder(t *testing.T) {
	s := duesSyncer(t, 100)
	t0 := time.Now()
	for i := 99; i >= 0; i-- {
		s.touchFile(t, fmt.Sprintf("f%03d", i), t0.Add(time.Duration(i)*time.Millisecond))
	}
	s.gone("f050")
	s.dispatch(t0.Add(time.Second + 49*time.Millisecond))
	if len(s.jobs) != 50 {
		t.Fatalf("%d jobs, want the 50 due ones", len(s.jobs))
	}
	for i := range 50 {
		if j := <-s.jobs; j.rel != fmt.Sprintf("f%03d", i) {
			t.Fatalf("job %d is %s: not in due order", i, j.rel)
		}
	}
	s.dispatch(t0.Add(2 * time.Second))
	if len(s.jobs) != 49 {
		t.Fatalf("%d jobs, want the 49 left (f050 was removed)", len(s.jobs))
	}
}

// Removing a file forgets only it; removing a directory forgets everything
// under it, uploaded, pending or in flight.
func TestGone(t *testing.T) {
	s := duesSyncer(t, 0)
	for _, k := range []string{"a/x", "a/y", "a/b/z", "ab", "c"} {
		s.files[k] = snapshot.File{Path: k}
	}
	s.pending["a/b/p"] = &pend{}
	s.pending["a/q"] = &pend{inflight: true}
	s.pending["c"] = &pend{}
	s.gone("c")
	if _, ok := s.files["c"]; ok || s.pending["c"] != nil || !s.dirty {
		t.Fatal("file c not forgotten")
	}
	s.gone("a")
	for _, k := range []string{"a/x", "a/y", "a/b/z"} {
		if _, ok := s.files[k]; ok {
			t.Errorf("%s still listed after its directory was removed", k)
		}
	}
	if _, ok := s.files["ab"]; !ok {
		t.Error("ab forgotten with directory a")
	}
	if s.pending["a/b/p"] != nil || s.pending["a/q"] == nil || !s.pending["a/q"].removed {
		t.Errorf("pending after removing a: %v", s.pending)
	}
}
