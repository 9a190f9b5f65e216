package changelog

import (
	"cmp"
	"iter"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/podkeeper/podkeeper/agents/snapshot"
)

// Entry is the winning change of one path and who made it.
type Entry struct {
	Change
	Writer string // Writer.ID()
}

// Beats reports whether e wins over o by the rule (what the fold keeps, and
// how a syncer decides a write conflict).
func (e Entry) Beats(o Entry) bool { return e.beats(o) }

// beats is the rule: the newer mtime wins; at equal mtimes the greater writer
// id; at equal writers a deletion beats a write (a writer that wrote and
// removed a file within one clock tick removed it last).
func (e Entry) beats(o Entry) bool {
	if c := e.MTime.Compare(o.MTime); c != 0 {
		return c > 0
	}
	if c := cmp.Compare(e.Writer, o.Writer); c != 0 {
		return c > 0
	}
	return e.Deleted && !o.Deleted
}

// State is the folded log: per path, the winning change (deletions kept as
// tombstones, so an older write applied later cannot bring a file back). A
// checkpoint of a million files stays in its compact form (a
// snapshot.Index, all written by the checkpoint's writer); the batches after
// it, a small tail, go to a map over it. The zero State is empty.
type State struct {
	base   *snapshot.Index
	writer string // of the base's entries
	over   map[string]Entry
}

// NewState is an empty state.
func NewState() *State { return &State{} }

// FromManifest starts a state from a checkpoint: its files are writes by the
// manifest's writer.
func FromManifest(m *snapshot.Manifest) (*State, error) {
	c, err := snapshot.CompactOf(m)
	if err != nil {
		return nil, err
	}
	return FromCompact(c), nil
}

// FromCompact starts a state from a checkpoint in compact form, which the
// state keeps (and Compact consumes).
func FromCompact(c *snapshot.Compact) *State {
	return &State{base: c.Files, writer: Writer{Namespace: c.Writer.Namespace, Pod: c.Writer.Pod}.ID()}
}

// Get is the winning change of p.
func (s *State) Get(p string) (Entry, bool) {
	if e, ok := s.over[p]; ok {
		return e, true
	}
	if i, ok := s.base.Find(p); ok {
		return Entry{Change: Change{File: s.base.At(i)}, Writer: s.writer}, true
	}
	return Entry{}, false
}

// Set makes e the change of its path, whatever was there.
func (s *State) Set(e Entry) {
	if s.over == nil {
		s.over = map[string]Entry{}
	}
	s.over[e.Path] = e
}

// Apply folds one batch in. Order does not matter, nor does applying a
// batch twice.
func (s *State) Apply(b *Batch) {
	w := b.Writer.ID()
	for _, c := range b.Changes {
		e := Entry{Change: c, Writer: w}
		if old, ok := s.Get(c.Path); !ok || e.beats(old) {
			s.Set(e)
		}
	}
}

// Len is the number of paths, tombstones included.
func (s *State) Len() int {
	n := s.base.Len() + len(s.over)
	for p := range s.over {
		if _, ok := s.base.Find(p); ok {
			n--
		}
	}
	return n
}

// All yields every path's change in path order, tombstones included.
func (s *State) All() iter.Seq2[string, Entry] {
	return func(yield func(string, Entry) bool) {
		keys := slices.Sorted(maps.Keys(s.over))
		n, j := s.base.Len(), 0
		for i := 0; i < n || j < len(keys); {
			var p string
			if i < n {
				p = s.base.Path(i)
			}
			if j < len(keys) && (i >= n || keys[j] <= p) {
				if i < n && keys[j] == p {
					i++
				}
				if !yield(keys[j], s.over[keys[j]]) {
					return
				}
				j++
				continue
			}
			if !yield(p, Entry{Change: Change{File: s.base.At(i)}, Writer: s.writer}) {
				return
			}
			i++
		}
	}
}

// left are the live files the fold leaves out. Two writers can leave a file
// where another has a directory ("a" and "a/b"); a manifest cannot hold
// both, so the directory wins and the file is left out of the fold (its
// batch and object stay, and its writer uploads it again if it still has
// it). The checkpoint alone holds no such pair: every pair involves a change
// of the tail.
func (s *State) left() map[string]bool {
	live := func(p string) bool {
		if e, ok := s.over[p]; ok {
			return !e.Deleted
		}
		_, ok := s.base.Find(p)
		return ok
	}
	dirs := map[string]bool{}
	for p, e := range s.over {
		if e.Deleted {
			continue
		}
		for i := len(p) - 1; i > 0; i-- {
			if p[i] == '/' {
				if dirs[p[:i]] {
					break // its parents are in already
				}
				dirs[p[:i]] = true
			}
		}
	}
	out := map[string]bool{}
	for d := range dirs {
		if live(d) {
			out[d] = true
		}
	}
	// A file of the tail that is a directory of the checkpoint's files.
	for p, e := range s.over {
		if e.Deleted || out[p] {
			continue
		}
		under := p + "/"
		for i, _ := s.base.Find(under); i < s.base.Len(); i++ {
			q := s.base.Path(i)
			if !strings.HasPrefix(q, under) {
				break
			}
			if live(q) {
				out[p] = true
				break
			}
		}
	}
	return out
}

// Files lists the live files (tombstones and the files left out, see left)
// in path order, as a []File (small states, tests; see Compact).
func (s *State) Files() []snapshot.File {
	left := s.left()
	var out []snapshot.File
	for p, e := range s.All() {
		if !e.Deleted && !left[p] {
			out = append(out, e.File)
		}
	}
	return out
}

// Manifest is the state as a snapshot manifest created at t, as a []File
// (small states, tests; see Compact).
func (s *State) Manifest(t time.Time, w snapshot.Writer) *snapshot.Manifest {
	return &snapshot.Manifest{Format: snapshot.Format, ID: snapshot.NewID(t, ""), Created: t.UTC(), Writer: w, Files: s.Files()}
}

// Compact is the state as a snapshot manifest created at t in compact form
// (what restore plans from, and what a checkpoint stores). It consumes the
// state: the checkpoint's index becomes the manifest's.
func (s *State) Compact(t time.Time, w snapshot.Writer) (*snapshot.Compact, error) {
	left := s.left()
	var add []snapshot.File
	for _, p := range slices.Sorted(maps.Keys(s.over)) {
		if e := s.over[p]; !e.Deleted && !left[p] {
			add = append(add, e.File)
		}
	}
	drop := map[int]bool{}
	for _, m := range []map[string]bool{left, keySet(s.over)} {
		for p := range m {
			if i, ok := s.base.Find(p); ok {
				drop[i] = true
			}
		}
	}
	x, err := snapshot.Merge(s.base, func(i int) bool { return drop[i] }, add)
	s.base, s.over = nil, nil
	if err != nil {
		return nil, err
	}
	return &snapshot.Compact{Format: snapshot.Format, ID: snapshot.NewID(t, ""), Created: t.UTC(), Writer: w, Files: x}, nil
}

func keySet(m map[string]Entry) map[string]bool {
	out := make(map[string]bool, len(m))
	for k := range m {
		out[k] = true
	}
	return out
}
