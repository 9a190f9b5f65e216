package syncer

import (
	"iter"
	"strings"

	"github.com/podkeeper/podkeeper/agents/snapshot"
)

// fileSet is the ledger's record of this writer's files: the baseline (the
// fold of the log at start, a million files in their compact form) and a
// small map of what changed since. A path of the baseline that changed or
// went is marked in gone (a bit per baseline file).
type fileSet struct {
	base *snapshot.Index
	gone []uint64
	over map[string]snapshot.File
	n    int // live baseline files
}

func newFileSet(base *snapshot.Index) *fileSet {
	return &fileSet{base: base, gone: make([]uint64, (base.Len()+63)/64), over: map[string]snapshot.File{}, n: base.Len()}
}

func (s *fileSet) baseAt(p string) (int, bool) {
	i, ok := s.base.Find(p)
	return i, ok && s.gone[i/64]&(1<<(i%64)) == 0
}

func (s *fileSet) drop(i int) {
	s.gone[i/64] |= 1 << (i % 64)
	s.n--
}

func (s *fileSet) get(p string) (snapshot.File, bool) {
	if f, ok := s.over[p]; ok {
		return f, true
	}
	if i, ok := s.baseAt(p); ok {
		return s.base.At(i), true
	}
	return snapshot.File{}, false
}

func (s *fileSet) set(f snapshot.File) {
	if i, ok := s.baseAt(f.Path); ok {
		s.drop(i)
	}
	s.over[f.Path] = f
}

func (s *fileSet) delete(p string) {
	if i, ok := s.baseAt(p); ok {
		s.drop(i)
	}
	delete(s.over, p)
}

func (s *fileSet) len() int { return s.n + len(s.over) }

// paths yields every path (in no particular order); under, when not empty,
// limits them to those that start with it (a directory's, found by a range
// of the sorted baseline).
func (s *fileSet) paths(under string) iter.Seq[string] {
	return func(yield func(string) bool) {
		for p := range s.over {
			if strings.HasPrefix(p, under) && !yield(p) {
				return
			}
		}
		i := 0
		if under != "" {
			i, _ = s.base.Find(under)
		}
		for ; i < s.base.Len(); i++ {
			if s.gone[i/64]&(1<<(i%64)) != 0 {
				continue
			}
			p := s.base.Path(i)
			if !strings.HasPrefix(p, under) {
				return
			}
			if !yield(p) {
				return
			}
		}
	}
}

// walkSet is the paths a full walk saw: a bit per file of the ledger's
// baseline (the walk of a restored tree of a million files holds 128 KiB,
// not a million paths) and a map of the others (new files, queued anyway).
type walkSet struct {
	base  *snapshot.Index
	bits  []uint64
	other map[string]bool
}

// walkSet starts an empty set over the baseline.
func (s *fileSet) walkSet() *walkSet {
	return &walkSet{base: s.base, bits: make([]uint64, (s.base.Len()+63)/64), other: map[string]bool{}}
}

func (w *walkSet) add(p string) {
	if i, ok := w.base.Find(p); ok {
		w.bits[i/64] |= 1 << (i % 64)
		return
	}
	w.other[p] = true
}

func (w *walkSet) has(p string) bool {
	if w.other[p] {
		return true
	}
	i, ok := w.base.Find(p)
	return ok && w.bits[i/64]&(1<<(i%64)) != 0
}

// unseen yields the paths a walk did not see (w is a walkSet of this set's
// baseline), the baseline's by their bit.
func (s *fileSet) unseen(w *walkSet) iter.Seq[string] {
	return func(yield func(string) bool) {
		for p := range s.over {
			if !w.has(p) && !yield(p) {
				return
			}
		}
		for i := range s.base.Len() {
			if s.gone[i/64]&(1<<(i%64)) != 0 || w.bits[i/64]&(1<<(i%64)) != 0 {
				continue
			}
			if !yield(s.base.Path(i)) {
				return
			}
		}
	}
}
