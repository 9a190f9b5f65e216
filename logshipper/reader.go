package logshipper

import (
	"context"
	"log/slog"
	"time"

	"github.com/podkeeper/podkeeper/agents/backoff"
	"github.com/podkeeper/podkeeper/agents/health"
)

// waitRescan is how long a wait for room in the spool lasts before the files
// are looked at again.
const waitRescan = time.Second

// spillPolicy retries writing batches to disk: a full disk may be emptied.
var spillPolicy = backoff.Policy{Initial: 100 * time.Millisecond, Max: 5 * time.Second}

// reader is the loop that moves lines from the files into the spool: tailer
// -> batcher -> spool, each batch's checkpoint projected on the way. It runs
// on one goroutine; the sender meets it only in the spool and the checkpoint.
type reader struct {
	log    *slog.Logger
	health *health.Server
	tail   *tailer
	bat    *batcher
	cp     *checkpoint
	sp     *spool
	maxBuf int64

	pauseLogged time.Time
}

// run tails until stop is closed, then reads every file to its end, ships
// what is pending, and closes the spool: no more batches will come. ctx ends
// only when the shutdown deadline passes.
func (r *reader) run(ctx context.Context, stop <-chan struct{}) error {
	defer r.sp.close()
	defer r.tail.close()
	r.tail.begin()
	r.tail.start()
	if err := r.ship(ctx, r.tail.take()); err != nil {
		return err
	}
	r.health.SetReady(nil)
	// Started: the files that exist are being read and what is read reaches the
	// receiver or the spool, so the app's first lines are not missed.
	r.health.SetStarted()
	tick := time.NewTicker(pollEvery)
	defer tick.Stop()
	for {
		select {
		case <-stop:
			return r.drain(ctx)
		default:
		}
		r.health.Beat()
		now := r.tail.begin()
		r.tail.scanIfDue()
		progressed, err := r.readAll(ctx)
		if err != nil {
			return err
		}
		if err := r.housekeeping(ctx, now, false); err != nil {
			return err
		}
		if progressed {
			continue
		}
		if err := r.idle(ctx, stop, tick.C); err != nil {
			return err
		}
	}
}

// readAll reads every file, at most perFilePass of each so one busy file does
// not starve the others, shipping chunk by chunk.
func (r *reader) readAll(ctx context.Context) (progressed bool, err error) {
	for _, tf := range r.tail.list() {
		for total := 0; total < perFilePass; {
			n := r.tail.read(ctx, tf)
			if err := r.ship(ctx, r.tail.take()); err != nil {
				return progressed, err
			}
			if n == 0 {
				break
			}
			total += n
			progressed = true
		}
	}
	return progressed, nil
}

// housekeeping ships idle multi-line groups and the ends of released files,
// and seals the open batch when its wait is over (or final).
func (r *reader) housekeeping(ctx context.Context, now time.Time, final bool) error {
	r.tail.housekeeping(final)
	if err := r.ship(ctx, r.tail.take()); err != nil {
		return err
	}
	if due, open := r.bat.deadline(); open && (final || !now.Before(due)) {
		return r.seal(ctx)
	}
	return nil
}

// idle waits for something to do: a change in a watched directory, the poll
// tick, the open batch's deadline or the stop.
func (r *reader) idle(ctx context.Context, stop <-chan struct{}, tick <-chan time.Time) error {
	var deadline <-chan time.Time
	if due, open := r.bat.deadline(); open {
		timer := time.NewTimer(max(time.Until(due), 0))
		defer timer.Stop()
		deadline = timer.C
	}
	select {
	case <-stop:
	case <-r.tail.changed():
	case <-tick:
	case <-deadline:
	case <-ctx.Done():
		return ctx.Err()
	}
	return nil
}

// drain is the shutdown: the app has exited, so every file is read to its end
// and everything pending becomes a record.
func (r *reader) drain(ctx context.Context) error {
	now := r.tail.begin()
	r.tail.scan()
	for {
		progressed, err := r.readAll(ctx)
		if err != nil {
			return err
		}
		if !progressed {
			break
		}
	}
	r.tail.flushAll()
	if err := r.ship(ctx, r.tail.take()); err != nil {
		return err
	}
	return r.housekeeping(ctx, now, true)
}

// ship hands entries to the batcher and each batch it completes to the spool.
func (r *reader) ship(ctx context.Context, entries []entry) error {
	for i := range entries {
		b, err := r.bat.add(&entries[i])
		if err != nil {
			return err
		}
		if b != nil {
			if err := r.put(ctx, b); err != nil {
				return err
			}
		}
	}
	return nil
}

// seal ships the open batch.
func (r *reader) seal(ctx context.Context) error {
	b, err := r.bat.seal()
	if b == nil || err != nil {
		return err
	}
	return r.put(ctx, b)
}

// put projects b's checkpoint and queues b in the spool, waiting while it is
// full (backpressure: reading pauses, files stay open).
func (r *reader) put(ctx context.Context, b *batch) error {
	r.cp.project(b)
	if err := r.waitRoom(ctx, b); err != nil {
		return err
	}
	return backoff.Retry(ctx, spillPolicy,
		func(error) bool { return ctx.Err() == nil },
		func(_ int, err error, _ time.Duration) { r.log.Warn("cannot spool batch; retrying", "err", err) },
		func(context.Context) error { return r.sp.spill() })
}

// waitRoom queues b as soon as the spool has room for it.
func (r *reader) waitRoom(ctx context.Context, b *batch) error {
	paused := false
	for {
		full := r.sp.add(b)
		if full == nil {
			break
		}
		if !paused && time.Since(r.pauseLogged) > time.Minute {
			// Once a minute: during an outage every batch waits here.
			r.pauseLogged = time.Now()
			r.log.Info("buffer full: reading paused until the receiver catches up", "max_bytes", r.maxBuf)
		}
		paused = true
		r.health.Beat() // waiting for the receiver is not being stuck
		// Files keep being discovered, so a rotation during backpressure does
		// not lose one; every ack wakes this wait, so at the usual pace only.
		r.tail.begin()
		r.tail.scanIfDue()
		retry := time.NewTimer(waitRescan)
		select {
		case <-ctx.Done():
			retry.Stop()
			return ctx.Err()
		case <-full:
		case <-retry.C:
		}
		retry.Stop()
	}
	if paused {
		r.log.Debug("reading resumed")
	}
	return nil
}
