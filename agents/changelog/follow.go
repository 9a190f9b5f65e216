package changelog

import (
	"context"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/podkeeper/podkeeper/agents/store"
)

// Follower reads the batches appended to the log since it last looked, for
// a reader that keeps a live fold (the syncer's pull). Batches are keyed by
// their writers' clocks and may land up to Margin after their stamp, so each
// look lists from Margin before the reader's own clock (one LIST, StartAfter
// where the store has it) and skips the keys it has applied already; what a
// writer whose clock runs more than Margin behind appends is only seen by
// the next full fold (a restart, or restore).
type Follower struct {
	st     store.Store
	window time.Duration
	now    func() time.Time
	// applied are the keys read within the window, by stamp.
	applied map[string]time.Time
	newest  time.Time
}

// NewFollower follows st from a fold that already applied the batches f
// names.
func NewFollower(st store.Store, f *Folded) *Follower {
	fl := &Follower{st: st, window: Margin, now: time.Now, applied: map[string]time.Time{}, newest: f.Newest}
	for _, k := range f.Applied {
		if info, ok := parseKey(k); ok {
			fl.applied[k] = info.Time
		}
	}
	return fl
}

// Next returns the batches appended since the last call, in key order. A
// batch that cannot be read for good (not a valid batch) is not retried: it
// is returned in bad and skipped, so one broken object cannot stall the
// reader; a store error that may pass (retryable) fails the call, and the
// next call lists again.
func (fl *Follower) Next(ctx context.Context) (batches []*Batch, bad []error, err error) {
	from := fl.now().Add(-fl.window)
	after := Dir + from.UTC().Format("20060102T150405.000000000Z")
	var fresh []Info
	for o, err := range store.ListAfter(ctx, fl.st, Dir, after) {
		if err != nil {
			return nil, nil, err
		}
		info, ok := parseKey(o.Key)
		if !ok {
			continue
		}
		if _, done := fl.applied[o.Key]; !done {
			fresh = append(fresh, info)
		}
	}
	loaded := make([]*Batch, len(fresh))
	errs := make([]error, len(fresh))
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(loadConcurrency)
	for i, info := range fresh {
		g.Go(func() error {
			b, err := Load(gctx, fl.st, info)
			if err != nil && (store.IsRetryable(err) || gctx.Err() != nil) {
				return err
			}
			loaded[i], errs[i] = b, err
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return nil, nil, err
	}
	for i, info := range fresh {
		if errs[i] != nil {
			bad = append(bad, errs[i])
		} else {
			batches = append(batches, loaded[i])
		}
		fl.applied[info.Key] = info.Time
		if info.Time.After(fl.newest) {
			fl.newest = info.Time
		}
	}
	for k, t := range fl.applied {
		if t.Before(from.Add(-time.Second)) {
			delete(fl.applied, k) // listed no more
		}
	}
	return batches, bad, nil
}

// Newest is the stamp of the newest batch applied (zero: none).
func (fl *Follower) Newest() time.Time { return fl.newest }
