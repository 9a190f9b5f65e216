package syncer

import (
	"slices"
	"testing"
	"time"

	"github.com/podkeeper/podkeeper/agents/snapshot"
)

// The ledger's files over a compact baseline: changes and removals hide the
// baseline's entries, a directory's paths come from a range of it.
func TestFileSetOverBaseline(t *testing.T) {
	f := func(p string) snapshot.File {
		return snapshot.File{Path: p, Size: 1, SHA256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", MTime: time.Unix(1, 0), Mode: 0o644}
	}
	base, err := snapshot.IndexOf([]snapshot.File{f("a/x"), f("a/y"), f("a-b"), f("b"), f("c/d")})
	if err != nil {
		t.Fatal(err)
	}
	s := newFileSet(base)
	s.delete("a/x")
	s.set(snapshot.File{Path: "b", Size: 9})
	s.set(snapshot.File{Path: "a/z", Size: 2})
	if got, ok := s.get("b"); !ok || got.Size != 9 {
		t.Fatalf("b = %+v, %v", got, ok)
	}
	if _, ok := s.get("a/x"); ok {
		t.Fatal("a/x still there")
	}
	if got, ok := s.get("c/d"); !ok || got.Size != 1 {
		t.Fatalf("c/d = %+v, %v", got, ok)
	}
	if s.len() != 5 {
		t.Fatalf("len %d", s.len())
	}
	if got := slices.Sorted(s.paths("a/")); !slices.Equal(got, []string{"a/y", "a/z"}) {
		t.Fatalf("paths under a/: %q", got)
	}
	if got := slices.Sorted(s.paths("")); !slices.Equal(got, []string{"a-b", "a/y", "a/z", "b", "c/d"}) {
		t.Fatalf("paths: %q", got)
	}
	// A walk that saw a/y, a/z and a new file: the rest is unseen.
	w := s.walkSet()
	for _, p := range []string{"a/y", "a/z", "new"} {
		w.add(p)
	}
	if !w.has("new") || !w.has("a/y") || w.has("b") || w.has("a-b") {
		t.Fatal("walkSet.has")
	}
	if got := slices.Sorted(s.unseen(w)); !slices.Equal(got, []string{"a-b", "b", "c/d"}) {
		t.Fatalf("unseen: %q", got)
	}
}
