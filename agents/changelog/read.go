package changelog

import (
	"context"
	"errors"
	"fmt"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/podkeeper/podkeeper/agents/snapshot"
	"github.com/podkeeper/podkeeper/agents/store"
)

// loadConcurrency bounds parallel batch GETs: a tail of a few hundred batches
// at 20 ms per GET would otherwise cost seconds.
const loadConcurrency = 16

// Fold is FoldCompact as a []File manifest (small prefixes, tests).
func Fold(ctx context.Context, st store.Store, at time.Time) (*snapshot.Manifest, error) {
	c, err := FoldCompact(ctx, st, at)
	if err != nil {
		return nil, err
	}
	return c.Manifest(), nil
}

// FoldCompact returns the state of the prefix at instant at as a manifest:
// the newest checkpoint created at or before at, and every batch stamped
// after it and not after at. A zero at is "latest": the newest checkpoint and
// every batch after it, whatever its stamp (a writer whose clock runs ahead
// must not hide an acknowledged upload from a restore that starts now). A
// prefix without any checkpoint starts from nothing (a v1 prefix always has
// one: its last snapshot). ErrEmpty: neither a checkpoint nor a batch.
func FoldCompact(ctx context.Context, st store.Store, at time.Time) (*snapshot.Compact, error) {
	f, err := FoldState(ctx, st, at)
	if err != nil {
		return nil, err
	}
	if f.Checkpoint == "" && f.Batches == 0 {
		return nil, ErrEmpty
	}
	if f.Batches == 0 {
		// Nothing after the checkpoint: it is the state, under its own id (a
		// prefix of the single-writer release restores exactly as before).
		return f.Base, nil
	}
	t := at
	if t.IsZero() {
		t = f.Newest // the same state has the same id
	}
	return f.State.Compact(t, f.Writer)
}

// ErrEmpty is Fold's answer for a prefix without checkpoints or batches (at
// or before the instant asked for).
var ErrEmpty = fmt.Errorf("%w: no checkpoint and no change log", snapshot.ErrNoSnapshot)

// Folded is a fold with its provenance.
type Folded struct {
	State      *State
	Checkpoint string    // id of the checkpoint it started from ("" none)
	From       time.Time // that checkpoint's creation time
	Writer     snapshot.Writer
	Base       *snapshot.Compact // that checkpoint, when no batch came after it
	Batches    int               // batches applied
	Newest     time.Time         // stamp of the newest batch applied
	Applied    []string          // keys of the batches applied
}

// FoldState is Fold with tombstones kept and the provenance returned.
func FoldState(ctx context.Context, st store.Store, at time.Time) (*Folded, error) {
	cpAt := at
	if cpAt.IsZero() {
		cpAt = time.Now().Add(100 * 365 * 24 * time.Hour)
	}
	f, err := checkpointAt(ctx, st, cpAt)
	if err != nil {
		return nil, err
	}
	infos, err := List(ctx, st, f.From)
	if err != nil {
		return nil, err
	}
	var tail []Info
	for _, info := range infos {
		if at.IsZero() || !info.Time.After(at) {
			tail = append(tail, info)
		}
	}
	batches, err := loadAll(ctx, st, tail)
	if err != nil {
		return nil, err
	}
	for i, b := range batches {
		f.State.Apply(b)
		f.Applied = append(f.Applied, tail[i].Key)
		f.Batches++
		if b.Time.After(f.Newest) {
			f.Newest = b.Time
		}
	}
	if f.Batches > 0 {
		f.Base = nil // the state has it all: a large checkpoint is not held twice
	}
	return f, nil
}

func checkpointAt(ctx context.Context, st store.Store, at time.Time) (*Folded, error) {
	info, err := snapshot.Resolve(ctx, st, at.UTC().Format(time.RFC3339Nano))
	if errors.Is(err, snapshot.ErrNoSnapshot) {
		return &Folded{State: NewState()}, nil
	}
	if err != nil {
		return nil, err
	}
	c, err := snapshot.LoadCompact(ctx, st, info)
	if err != nil {
		return nil, fmt.Errorf("checkpoint: %w", err)
	}
	return &Folded{State: FromCompact(c), Checkpoint: c.ID, From: c.Created, Writer: c.Writer, Base: c}, nil
}

func loadAll(ctx context.Context, st store.Store, infos []Info) ([]*Batch, error) {
	out := make([]*Batch, len(infos))
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(loadConcurrency)
	for i, info := range infos {
		g.Go(func() error {
			b, err := Load(gctx, st, info)
			out[i] = b
			return err
		})
	}
	return out, g.Wait()
}

// CheckpointDue reports, with two listings and no download, whether a batch
// stamped at or before now - margin arrived since the newest checkpoint: the
// compactors of every writer ask it each interval, and only then take the
// compaction lease.
func CheckpointDue(ctx context.Context, st store.Store, now time.Time, margin time.Duration) (bool, error) {
	if margin <= 0 {
		margin = Margin
	}
	horizon := now.Add(-margin).UTC()
	var from time.Time
	info, err := snapshot.Resolve(ctx, st, horizon.Format(time.RFC3339Nano))
	switch {
	case err == nil:
		from = info.Created
	case !errors.Is(err, snapshot.ErrNoSnapshot):
		return false, err
	}
	infos, err := List(ctx, st, from)
	if err != nil {
		return false, err
	}
	return len(infos) > 0 && !infos[0].Time.After(horizon), nil
}

// Checkpoint folds everything stamped at or before now - margin (every
// batch of that age has landed; margin 0 means Margin) into a snapshot and
// returns its id, or "" when no batch arrived since the newest checkpoint
// (nothing to fold). Only one writer at a time should call it (the compaction
// lease), but two racing produce the same content under different ids, never
// a wrong one.
//
// The fold is streamed (checkpointStreamed): the previous checkpoint is read
// from the store in path order and merged entry by entry with the batches
// after it into the upload, so memory is O(batches), not O(files). A
// checkpoint it cannot stream (ErrUnstreamable: files out of path order, as
// the format allows, or the header after them) is folded in memory, as a
// State; both write the same bytes.
func Checkpoint(ctx context.Context, st store.Store, now time.Time, margin time.Duration, w snapshot.Writer) (string, error) {
	if margin <= 0 {
		margin = Margin
	}
	horizon := now.Add(-margin).UTC()
	id, err := checkpointStreamed(ctx, st, horizon, w)
	if !errors.Is(err, ErrUnstreamable) {
		return id, err
	}
	return checkpointInMemory(ctx, st, horizon, w)
}

// checkpointInMemory is Checkpoint with the fold held as a State: for a
// checkpoint the streamed fold cannot read (ErrUnstreamable), and the
// reference the streamed one must agree with byte for byte.
func checkpointInMemory(ctx context.Context, st store.Store, horizon time.Time, w snapshot.Writer) (string, error) {
	f, err := FoldState(ctx, st, horizon)
	if err != nil {
		return "", err
	}
	if f.Batches == 0 {
		return "", nil
	}
	m, err := f.State.Compact(horizon, w)
	if err != nil {
		return "", err
	}
	if _, err := snapshot.WriteCompact(ctx, st, m); err != nil && !errors.Is(err, store.ErrPrecondition) {
		// ErrPrecondition: a racing compactor wrote this horizon already, and
		// the fold of the same batches is the same content.
		return "", err
	}
	return m.ID, nil
}
