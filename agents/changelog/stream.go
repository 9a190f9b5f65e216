package changelog

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"time"

	"github.com/podkeeper/podkeeper/agents/snapshot"
	"github.com/podkeeper/podkeeper/agents/store"
)

// The streamed fold: the checkpoint read from the store one entry at a time
// (snapshot.Scan, in path order) and merge-joined with the batches after it
// (the tail, a small map sorted once): per path the rule picks the winner as
// State does, and what is written goes entry by entry into the upload. Memory
// is O(tail), whatever the checkpoint's size; the checkpoint is read two or
// three times instead of held.

// ErrUnstreamable marks a checkpoint the streamed fold cannot read: its
// files are not in path order (the format allows it; what this version
// writes always is), or its header comes after them. Such a fold is held in
// memory (FoldState) instead.
var ErrUnstreamable = errors.New("checkpoint not streamable (files not in path order, or the header after them)")

// tail is the batches after a checkpoint, folded over nothing: per path, the
// winning change of the tail alone, and the paths in order.
type tail struct {
	cp     snapshot.Info // Key "": no checkpoint
	over   map[string]Entry
	keys   []string
	newest time.Time
	n      int // batches
}

// loadTail selects the fold at at as FoldState does (the newest checkpoint
// created at or before it, if any; zero at: latest), and folds the batches
// after it.
func loadTail(ctx context.Context, st store.Store, at time.Time) (*tail, error) {
	cpAt := at
	if cpAt.IsZero() {
		cpAt = time.Now().Add(100 * 365 * 24 * time.Hour)
	}
	info, err := snapshot.Resolve(ctx, st, cpAt.UTC().Format(time.RFC3339Nano))
	switch {
	case errors.Is(err, snapshot.ErrNoSnapshot):
		info = snapshot.Info{}
	case err != nil:
		return nil, err
	}
	infos, err := List(ctx, st, info.Created)
	if err != nil {
		return nil, err
	}
	var sel []Info
	for _, i := range infos {
		if at.IsZero() || !i.Time.After(at) {
			sel = append(sel, i)
		}
	}
	batches, err := loadAll(ctx, st, sel)
	if err != nil {
		return nil, err
	}
	s := NewState()
	t := &tail{cp: info, n: len(batches)}
	for _, b := range batches {
		s.Apply(b)
		if b.Time.After(t.newest) {
			t.newest = b.Time
		}
	}
	t.over = s.over
	t.keys = slices.Sorted(maps.Keys(t.over))
	return t, nil
}

// merged is one path of the merge: the winning change, and the
// checkpoint's entry when it has one (base).
type merged struct {
	e        Entry
	base     *snapshot.File
	fromTail bool // e is the tail's (it beat base, or base is nil)
}

// walk streams the checkpoint once and hands every path of the fold to fn
// in path order, tombstones included. The checkpoint's entries come with
// their mtime in UTC (as its Index would hand them out).
func (t *tail) walk(ctx context.Context, st store.Store, fn func(m merged) error) error {
	j := 0
	if t.cp.Key != "" {
		if err := t.walkCheckpoint(ctx, st, &j, fn); err != nil {
			return err
		}
	}
	for ; j < len(t.keys); j++ {
		if err := fn(merged{e: t.over[t.keys[j]], fromTail: true}); err != nil {
			return err
		}
	}
	return nil
}

// walkCheckpoint is walk up to the checkpoint's last path; *j is the next
// path of the tail.
func (t *tail) walkCheckpoint(ctx context.Context, st store.Store, j *int, fn func(m merged) error) error {
	rc, _, err := st.Get(ctx, t.cp.Key, store.GetOptions{})
	if err != nil {
		return err
	}
	defer rc.Close()
	var (
		writer string
		last   string
		n      int
	)
	_, err = snapshot.Scan(rc, func(h *snapshot.Manifest, complete bool) error {
		if h.ID != "" && h.ID != t.cp.ID {
			return fmt.Errorf("manifest says id %s", h.ID)
		}
		if !complete || !h.Created.Equal(t.cp.Created) {
			return ErrUnstreamable
		}
		writer = Writer{Namespace: h.Writer.Namespace, Pod: h.Writer.Pod}.ID()
		return nil
	}, func(f snapshot.File) error {
		if n > 0 && f.Path <= last {
			return ErrUnstreamable
		}
		n++
		last = f.Path
		for ; *j < len(t.keys) && t.keys[*j] < f.Path; *j++ {
			if err := fn(merged{e: t.over[t.keys[*j]], fromTail: true}); err != nil {
				return err
			}
		}
		f.MTime = f.MTime.UTC()
		m := merged{e: Entry{Change: Change{File: f}, Writer: writer}, base: &f}
		if *j < len(t.keys) && t.keys[*j] == f.Path {
			if e := t.over[f.Path]; e.beats(m.e) {
				m.e, m.fromTail = e, true
			}
			*j++
		}
		return fn(m)
	})
	if err != nil {
		return fmt.Errorf("%s: %w", t.cp.Key, err)
	}
	return nil
}

// ScanFold hands every path of the fold at at (zero: latest) to fn in path
// order, tombstones included (what State.All yields after FoldState),
// streaming the checkpoint. ErrUnstreamable (possibly after fn saw some
// paths): use FoldState.
func ScanFold(ctx context.Context, st store.Store, at time.Time, fn func(p string, e Entry) error) error {
	t, err := loadTail(ctx, st, at)
	if err != nil {
		return err
	}
	return t.walk(ctx, st, func(m merged) error { return fn(m.e.Path, m.e) })
}

// leftOut is what the file/directory rule (State.left) may leave out of a
// streamed fold: only a path of the tail, or a parent directory of a live
// one, can be a live file with a live file under it (the checkpoint alone
// holds no such pair).
type leftOut struct {
	cand map[string]*candidate
	left map[string]bool // decided after a walk
}

type candidate struct {
	live, liveUnder, fromTail bool
}

func newLeftOut(t *tail) *leftOut {
	l := &leftOut{cand: map[string]*candidate{}}
	for _, p := range t.keys {
		l.cand[p] = &candidate{}
		if t.over[p].Deleted {
			continue
		}
		for i := len(p) - 1; i > 0; i-- {
			if p[i] == '/' {
				if l.cand[p[:i]] == nil {
					l.cand[p[:i]] = &candidate{}
				}
			}
		}
	}
	return l
}

// see notes path m of a walk.
func (l *leftOut) see(m merged) {
	p, live := m.e.Path, !m.e.Deleted
	if c := l.cand[p]; c != nil {
		c.live, c.fromTail = live, m.fromTail
	}
	if !live || len(l.cand) == 0 {
		return
	}
	for i := len(p) - 1; i > 0; i-- {
		if p[i] == '/' {
			if c := l.cand[p[:i]]; c != nil {
				c.liveUnder = true
			}
		}
	}
}

// decide is the rule once a walk saw every path: a live file with a live
// file under it is left out (the directory wins).
func (l *leftOut) decide() {
	l.left = map[string]bool{}
	for p, c := range l.cand {
		if c.live && c.liveUnder {
			l.left[p] = true
		}
	}
}

// checkpointStreamed is Checkpoint over a streamed checkpoint: the fold
// at horizon is merged entry by entry into the upload. ErrUnstreamable:
// fall back to the fold in memory.
func checkpointStreamed(ctx context.Context, st store.Store, horizon time.Time, w snapshot.Writer) (string, error) {
	t, err := loadTail(ctx, st, horizon)
	if err != nil {
		return "", err
	}
	if t.n == 0 {
		return "", nil
	}
	h := &snapshot.Manifest{Format: snapshot.Format, ID: snapshot.NewID(horizon, ""), Created: horizon.UTC(), Writer: w}
	// First walk: which paths the rule leaves out, what the entries cost an
	// agent that loads the checkpoint, and the size and hash of the
	// manifest if none is left out (the usual case).
	l := newLeftOut(t)
	meter := snapshot.NewMeter()
	sum := snapshot.NewSummer()
	enc, err := snapshot.NewEncoder(sum, h, true)
	if err != nil {
		return "", err
	}
	var order snapshot.PathOrder
	var outErr error
	err = t.walk(ctx, st, func(m merged) error {
		if m.base != nil {
			if err := meter.Add(*m.base); err != nil {
				return err
			}
		}
		l.see(m)
		if m.e.Deleted {
			return nil
		}
		if err := order.Next(m.e.Path); err != nil && outErr == nil {
			outErr = err
		}
		return enc.Add(utc(m.e.File))
	})
	if err != nil {
		return "", err
	}
	if err := enc.Close(); err != nil {
		return "", err
	}
	l.decide()
	// The tail's entries that go in are charged too (the in-memory fold
	// charges the checkpoint's entries, replaced or not, and these).
	for _, p := range t.keys {
		if c := l.cand[p]; c.fromTail && c.live && !l.left[p] {
			if err := meter.Add(t.over[p].File); err != nil {
				return "", err
			}
		}
	}
	emit := func(add func(snapshot.File) error) error {
		return t.walk(ctx, st, func(m merged) error {
			if m.e.Deleted || l.left[m.e.Path] {
				return nil
			}
			return add(utc(m.e.File))
		})
	}
	want := sum.Sum()
	if len(l.left) > 0 {
		// The first walk measured files that are left out: measure again.
		sum = snapshot.NewSummer()
		if enc, err = snapshot.NewEncoder(sum, h, true); err != nil {
			return "", err
		}
		order, outErr = snapshot.PathOrder{}, nil
		err := emit(func(f snapshot.File) error {
			if err := order.Next(f.Path); err != nil {
				return err
			}
			return enc.Add(f)
		})
		if err != nil {
			return "", err
		}
		if err := enc.Close(); err != nil {
			return "", err
		}
		want = sum.Sum()
	}
	if outErr != nil {
		return "", outErr
	}
	_, err = snapshot.PutEncoded(ctx, st, h, want, func(e *snapshot.Encoder) error { return emit(e.Add) })
	if err != nil && !errors.Is(err, store.ErrPrecondition) {
		return "", err
	}
	// ErrPrecondition: a racing compactor wrote this horizon already, and
	// the fold of the same batches is the same content.
	return h.ID, nil
}

// utc is f as an Index hands it out (the mtime in UTC), so a streamed
// checkpoint has the bytes of one written from the in-memory fold.
func utc(f snapshot.File) snapshot.File {
	f.MTime = f.MTime.UTC()
	return f
}
