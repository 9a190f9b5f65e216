package restore

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/podkeeper/podkeeper/agents/changelog"
	"github.com/podkeeper/podkeeper/agents/snapshot"
	"github.com/podkeeper/podkeeper/agents/store"
)

// Resolve returns the manifest to restore for spec: "latest" (or empty) is
// the fold of the change log now — every writer's acknowledged files, the
// union, with deletions applied; an RFC 3339 time is the fold at that
// instant (the newest checkpoint at or before it plus the batches stamped up
// to it); a snapshot id is that snapshot as it was written. A prefix written
// by a single-writer release has only snapshots: its newest is the fold.
func Resolve(ctx context.Context, st store.Store, spec string) (*snapshot.Compact, error) {
	if spec != "" && spec != "latest" && snapshot.ValidateID(spec) == nil {
		info, err := snapshot.Resolve(ctx, st, spec)
		if err != nil {
			return nil, err
		}
		m, err := snapshot.LoadCompact(ctx, st, info)
		if err != nil {
			return nil, fmt.Errorf("refusing snapshot %s: %w", info.ID, err)
		}
		return m, nil
	}
	var at time.Time
	if spec != "" && spec != "latest" {
		t, err := time.Parse(time.RFC3339Nano, spec)
		if err != nil {
			return nil, fmt.Errorf("snapshot %q is neither \"latest\", an id nor an RFC 3339 time", spec)
		}
		at = t
	}
	// The fold is checked as it is built (every rule of a manifest).
	m, err := changelog.FoldCompact(ctx, st, at)
	if errors.Is(err, snapshot.ErrNoSnapshot) {
		return nil, err
	}
	if err != nil {
		return nil, fmt.Errorf("refusing the change log: %w", err)
	}
	return m, nil
}
