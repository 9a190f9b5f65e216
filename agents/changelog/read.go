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

// Fold returns the state of the prefix at instant at (zero: now) as a
// manifest: the newest checkpoint created at or before at, and every batch
// stamped after it and not after at. A prefix without any checkpoint starts
// from nothing (a v1 prefix always has one: its last snapshot).
func Fold(ctx context.Context, st store.Store, at time.Time) (*snapshot.Manifest, error) {
	if at.IsZero() {
		at = time.Now()
	}
	state, from, w, err := checkpointAt(ctx, st, at)
	if err != nil {
		return nil, err
	}
	infos, err := List(ctx, st, from)
	if err != nil {
		return nil, err
	}
	var tail []Info
	for _, info := range infos {
		if !info.Time.After(at) {
			tail = append(tail, info)
		}
	}
	batches, err := loadAll(ctx, st, tail)
	if err != nil {
		return nil, err
	}
	for _, b := range batches {
		state.Apply(b)
	}
	return state.Manifest(at, w), nil
}

func checkpointAt(ctx context.Context, st store.Store, at time.Time) (State, time.Time, snapshot.Writer, error) {
	info, err := snapshot.Resolve(ctx, st, at.UTC().Format(time.RFC3339Nano))
	if errors.Is(err, snapshot.ErrNoSnapshot) {
		return State{}, time.Time{}, snapshot.Writer{}, nil
	}
	if err != nil {
		return nil, time.Time{}, snapshot.Writer{}, err
	}
	m, err := snapshot.Load(ctx, st, info)
	if err != nil {
		return nil, time.Time{}, snapshot.Writer{}, fmt.Errorf("checkpoint: %w", err)
	}
	return FromManifest(m), m.Created, m.Writer, nil
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

// Checkpoint folds everything stamped at or before now - Margin (every batch
// of that age has landed) into a snapshot and returns its id. Only one writer
// at a time should call it (the compaction lease), but two racing produce
// the same content under different ids, never a wrong one.
func Checkpoint(ctx context.Context, st store.Store, now time.Time, w snapshot.Writer) (string, error) {
	horizon := now.Add(-Margin).UTC()
	m, err := Fold(ctx, st, horizon)
	if err != nil {
		return "", err
	}
	m.Writer = w
	if _, err := snapshot.Write(ctx, st, m); err != nil && !errors.Is(err, store.ErrPrecondition) {
		// ErrPrecondition: a racing compactor wrote this horizon already, and
		// the fold of the same batches is the same content.
		return "", err
	}
	return m.ID, nil
}
