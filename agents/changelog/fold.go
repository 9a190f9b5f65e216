package changelog

import (
	"cmp"
	"slices"
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
// tombstones, so an older write applied later cannot bring a file back).
type State map[string]Entry

// FromManifest starts a state from a checkpoint: its files are writes by the
// manifest's writer.
func FromManifest(m *snapshot.Manifest) State {
	s := make(State, len(m.Files))
	w := Writer{Namespace: m.Writer.Namespace, Pod: m.Writer.Pod}.ID()
	for _, f := range m.Files {
		s[f.Path] = Entry{Change: Change{File: f}, Writer: w}
	}
	return s
}

// Apply folds one batch in. Order does not matter, nor does applying a
// batch twice.
func (s State) Apply(b *Batch) {
	w := b.Writer.ID()
	for _, c := range b.Changes {
		e := Entry{Change: c, Writer: w}
		if old, ok := s[c.Path]; !ok || e.beats(old) {
			s[c.Path] = e
		}
	}
}

// Files lists the live files (tombstones left out) in path order. Two
// writers can leave a file where another has a directory ("a" and "a/b"); a
// manifest cannot hold both, so the directory wins and the file is left out
// of the fold (its batch and object stay, and its writer uploads it again if
// it still has it).
func (s State) Files() []snapshot.File {
	dirs := map[string]bool{}
	for p, e := range s {
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
	out := make([]snapshot.File, 0, len(s))
	for p, e := range s {
		if !e.Deleted && !dirs[p] {
			out = append(out, e.File)
		}
	}
	slices.SortFunc(out, func(a, b snapshot.File) int { return cmp.Compare(a.Path, b.Path) })
	return out
}

// Manifest is the state as a snapshot manifest created at t (what restore
// plans from, and what a checkpoint stores).
func (s State) Manifest(t time.Time, w snapshot.Writer) *snapshot.Manifest {
	return &snapshot.Manifest{Format: snapshot.Format, ID: snapshot.NewID(t, ""), Created: t.UTC(), Writer: w, Files: s.Files()}
}
