package syncer

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/fsnotify/fsnotify"

	"github.com/podkeeper/podkeeper/agents/adaptive"
	"github.com/podkeeper/podkeeper/agents/backoff"
	"github.com/podkeeper/podkeeper/agents/changelog"
	"github.com/podkeeper/podkeeper/agents/config"
	"github.com/podkeeper/podkeeper/agents/events"
	"github.com/podkeeper/podkeeper/agents/health"
	"github.com/podkeeper/podkeeper/agents/lifecycle"
	"github.com/podkeeper/podkeeper/agents/safefs"
	"github.com/podkeeper/podkeeper/agents/store"
)

// Syncer is one running syncer: stages with one owner each, joined by the
// event loop. The loop goroutine owns the watcher, the queue and the ledger
// (this writer's part of the change log); workers only upload (uploader) and
// report back; the compactor and the optional lease run in the background.
type Syncer struct {
	cfg    *Config
	deps   lifecycle.Deps
	log    *slog.Logger
	rec    events.Recorder
	health *health.Server
	m      *metrics

	w     *watcher
	q     *queue
	led   *ledger
	comp  *compactor
	lease *lease // nil unless SYNC_EXCLUSIVE
	up    *uploader

	jobs    chan job
	results chan result
	// lastBacklog is the queue length at the last backlog report: an event
	// says so only when it grows.
	lastBacklog int
	// newNotifier opens the fsnotify watcher (a test substitutes one it can
	// pause).
	newNotifier func() (notifier, error)
	// polling: SYNC_WATCH resolved to poll (no events: a walk per interval).
	polling bool
	// pullTmp and pulls are SYNC_PULL's: its temp directory (the state dir's
	// pull/, on SYNC_DIR's filesystem) and the puller's requests to the loop.
	pullTmp *safefs.Root
	pulls   chan pullRequest
}

// New builds a syncer on deps.Store, which is required. It does not touch the
// network; Run does.
func New(cfg *Config, deps lifecycle.Deps) (*Syncer, error) {
	if deps.Store == nil {
		return nil, errors.New("syncer: no store in deps")
	}
	if deps.Log == nil {
		deps.Log = slog.Default()
	}
	if deps.Events == nil {
		deps.Events = events.Log{L: deps.Log}
	}
	if deps.Health == nil {
		deps.Health = health.New("syncer") // not served: metrics only
	}
	if deps.DrainTimeout <= 0 {
		deps.DrainTimeout = cfg.DrainTimeout()
	}
	id := newIdentity(cfg.Base.PodName, cfg.Base.PodNamespace, cfg.Base.PodUID)
	s := &Syncer{cfg: cfg, deps: deps, log: deps.Log, health: deps.Health, newNotifier: newFSNotifier,
		jobs: make(chan job, cfg.Concurrency), results: make(chan result, cfg.Concurrency)}
	// One limiter for every stage: a reason is rate-limited wherever it comes from.
	s.rec = newLimitedRecorder(deps.Events)
	s.m = newMetrics(deps.Health)
	s.w = newWatcher(cfg, s.log, s.m)
	s.led = newLedger(cfg, deps.Store, s.log, s.rec, s.m, id.writer())
	s.comp = &compactor{st: deps.Store, log: s.log, rec: s.rec, m: s.m, cfg: cfg, writer: id.writer(),
		margin: changelog.Margin, now: time.Now}
	s.q = newQueue(cfg.Settle, cfg.MaxFileSize, s.led.uploadedAs)
	s.q.seen = s.led.seenAt
	if cfg.Exclusive {
		s.lease = newLease(deps.Store, id, s.log, s.rec, s.m.leaseRenewals)
	}
	s.up = &uploader{writer: id.writer().ID(), journal: filepath.Join(cfg.StateDir, "multipart"), st: deps.Store,
		log: s.log, rec: s.rec, m: s.m}
	s.up.mp, _ = deps.Store.(store.Multiparter)
	s.up.lim = adaptive.New(cfg.Concurrency, cfg.MaxConcurrency, time.Now())
	if cfg.Compress != "off" {
		s.up.compress = cfg.Compress
	}
	return s, nil
}

// openJournals opens the journal directory: below SYNC_DIR (the default state
// dir) through root, so no link the app put on the way is followed; a state
// dir elsewhere is configuration and opened by path.
func openJournals(root *safefs.Root, dir, journal string) (*safefs.Root, error) {
	if rel, err := filepath.Rel(dir, journal); err == nil && rel != ".." && !strings.HasPrefix(rel, "../") {
		return root.Sub(rel)
	}
	if err := os.MkdirAll(journal, 0o700); err != nil {
		return nil, err
	}
	return safefs.OpenRoot(journal)
}

// Run syncs until ctx ends, then drains within deps.Drain.
func (s *Syncer) Run(ctx context.Context) error {
	s.health.SetLiveness(time.Minute)
	root, err := safefs.OpenRoot(s.cfg.Dir)
	if err != nil {
		return fmt.Errorf("SYNC_DIR: %w", err)
	}
	defer root.Close()
	s.up.root, s.w.root = root, root
	jr, err := openJournals(root, s.cfg.Dir, s.up.journal)
	if err != nil {
		if config.IsNotWritable(err) {
			return config.NotWritable("SYNC_STATE_DIR", s.cfg.StateDir, err)
		}
		return fmt.Errorf("state directory SYNC_STATE_DIR=%s: %w", s.cfg.StateDir, err)
	}
	defer jr.Close()
	s.up.jr = jr
	s.log.Info("syncing", "dir", s.cfg.Dir, "store", s.deps.Store.String(), "settle", s.cfg.Settle, "concurrency", s.cfg.Concurrency, "max_concurrency", s.cfg.MaxConcurrency,
		"writer", s.led.writer.ID(), "exclusive", s.cfg.Exclusive)

	// Uploads outlive the signal: they end when the drain deadline passes, not
	// when SIGTERM arrives.
	workCtx, workCancel := context.WithCancel(context.WithoutCancel(ctx))
	defer workCancel()

	leaseLost, release, err := s.holdLease(ctx, workCtx)
	if err != nil {
		return err
	}
	clean := false
	defer func() { release(clean) }()

	defer s.w.close()
	if err := s.prepare(ctx); err != nil {
		return err
	}
	s.health.SetReady(nil)
	// The app may start now (native sidecar startup probe): every file it
	// writes from here on is seen.
	s.health.SetStarted()
	s.log.Info("watching", "dir", s.cfg.Dir, "watches", s.w.watches, "pending", s.q.len(), "baseline_files", s.led.files.len())

	if s.cfg.Pull {
		stop, err := s.startPull(ctx, root)
		if err != nil {
			return err
		}
		defer stop()
	}

	compCtx, stopCompacting := context.WithCancel(ctx)
	compDone := make(chan struct{})
	go func() { defer close(compDone); s.comp.run(compCtx) }()
	defer func() { stopCompacting(); <-compDone }()

	defer s.startWorkers(workCtx, workCancel)()
	err = s.loop(ctx, workCtx, workCancel, leaseLost)
	clean = err == nil
	return err
}

// startPull opens the pull directory and starts the puller; stop ends it.
// Pulling stops at SIGTERM: a draining replica only uploads.
func (s *Syncer) startPull(ctx context.Context, root *safefs.Root) (stop func(), err error) {
	tmp, err := openJournals(root, s.cfg.Dir, filepath.Join(s.cfg.StateDir, "pull"))
	if err != nil {
		return nil, fmt.Errorf("state directory SYNC_STATE_DIR=%s: %w", s.cfg.StateDir, err)
	}
	if !sameFilesystem(root, tmp) {
		tmp.Close()
		return nil, fmt.Errorf("SYNC_STATE_DIR=%s is not on the filesystem of SYNC_DIR=%s: SYNC_PULL renames its downloads into place and needs both on one (leave SYNC_STATE_DIR unset)", s.cfg.StateDir, s.cfg.Dir)
	}
	s.pullTmp, s.pulls = tmp, make(chan pullRequest)
	p := newPuller(s, tmp, s.pulls)
	pctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { defer close(done); p.run(pctx) }()
	return func() { cancel(); <-done; tmp.Close() }, nil
}

func sameFilesystem(a, b *safefs.Root) bool {
	fa, err1 := a.Stat()
	fb, err2 := b.Stat()
	if err1 != nil || err2 != nil {
		return false
	}
	sa, ok1 := fa.Sys().(*syscall.Stat_t)
	sb, ok2 := fb.Sys().(*syscall.Stat_t)
	return ok1 && ok2 && sa.Dev == sb.Dev
}

// holdLease takes the single-writer lease with SYNC_EXCLUSIVE=true (without
// it there is none: lost never fires). release(clean) gives it back: at once
// after a clean drain, otherwise if it can be done quickly.
func (s *Syncer) holdLease(ctx, workCtx context.Context) (lost <-chan error, release func(clean bool), err error) {
	if s.lease == nil {
		return nil, func(bool) {}, nil
	}
	if err := s.retryStartup(ctx, "acquire lease", s.lease.acquire); err != nil {
		var lc *LeaseConflictError
		if errors.As(err, &lc) {
			s.rec.Event(ctx, events.Warning, "LeaseConflict", lc.Error())
		}
		return nil, nil, err
	}
	lost, stopRenewing := s.lease.hold(workCtx)
	return lost, func(clean bool) {
		stopRenewing()
		within := 2 * time.Second // leaving without a clean drain: try quickly, else it expires
		if clean {
			within = 5 * time.Second
		}
		s.lease.releaseWithin(ctx, within)
	}, nil
}

// prepare is the startup: the baseline (the fold of the change log), stale
// multipart uploads, and the watches with the first walk. Files of the
// baseline the walk does not find are other writers' (or gone before this
// writer started): they are left alone, never deleted.
func (s *Syncer) prepare(ctx context.Context) error {
	if err := s.retryStartup(ctx, "load baseline (fold of the change log)", s.led.loadBaseline); err != nil {
		return err
	}
	if s.up.mp != nil {
		if err := s.retryStartup(ctx, "abort stale multipart uploads", s.up.abortStale); err != nil {
			return err
		}
	}
	poll, fsName := watchMode(s.cfg.Watch, s.cfg.Dir)
	if poll {
		s.polling = true
		s.newNotifier = newPollNotifier
		s.log.Info("poll mode: walking SYNC_DIR every SYNC_POLL_INTERVAL", "interval", s.cfg.PollInterval, "filesystem", fsName, "SYNC_WATCH", s.cfg.Watch)
	}
	if err := s.w.open(s.newNotifier); err != nil {
		return err
	}
	if err := s.rescan(time.Now(), false); err != nil {
		return err
	}
	s.led.live = true
	return nil
}

// retryStartup retries a startup step through outages until ctx ends.
func (s *Syncer) retryStartup(ctx context.Context, what string, op func(context.Context) error) error {
	s.health.SetReady(fmt.Errorf("%s", what))
	return backoff.Retry(ctx, backoff.Default, store.IsRetryable, func(attempt int, err error, wait time.Duration) {
		s.log.Warn(what+" failed, retrying", "err", err, "attempt", attempt+1, "wait", wait)
	}, op)
}

// startWorkers starts the uploaders; the function it returns stops them.
func (s *Syncer) startWorkers(ctx context.Context, cancel context.CancelFunc) (stop func()) {
	var wg sync.WaitGroup
	for range s.cfg.MaxConcurrency {
		wg.Go(func() { s.up.work(ctx, s.jobs, s.results) })
	}
	return func() {
		cancel()
		close(s.jobs)
		// Workers may be blocked handing in a result.
		go func() {
			for range s.results {
			}
		}()
		wg.Wait()
		close(s.results)
	}
}

// loop is the event loop: fsnotify events, due files, worker results,
// change-log batches and housekeeping, until the drain is done, runs out of
// time, or the lease is lost.
func (s *Syncer) loop(ctx, workCtx context.Context, workCancel context.CancelFunc, leaseLost <-chan error) error {
	due := time.NewTimer(time.Hour)
	defer due.Stop()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	var pollC <-chan time.Time
	if s.polling {
		t := time.NewTicker(s.cfg.PollInterval)
		defer t.Stop()
		pollC = t.C
	}
	signal := ctx.Done()
	var drainCtx context.Context
	drainCancel := func() {}
	defer func() { drainCancel() }()
	for {
		now := time.Now()
		s.dispatch(now)
		if s.led.due(now, s.q.draining) {
			s.led.flush(workCtx)
		}
		if s.q.draining && s.q.len() == 0 && s.led.idle() {
			return s.drained()
		}
		due.Reset(s.untilDue())
		select {
		case ev, ok := <-s.w.n.Events():
			if ok {
				s.onEvent(ev, time.Now())
			}
		case err := <-s.w.n.Errors():
			s.onWatchError(err)
		case <-due.C:
		case r := <-s.results:
			s.onResult(r, time.Now())
		case r := <-s.led.done:
			s.led.ack(r)
		case r := <-s.pulls:
			r.reply <- s.placePulled(r)
		case <-pollC:
			s.poll(time.Now())
		case err := <-leaseLost:
			return err
		case <-tick.C:
			s.housekeep(ctx, time.Now())
		case <-signal:
			signal = nil
			drainCtx, drainCancel = s.startDrain(ctx, workCancel)
		}
		if drainCtx != nil && drainCtx.Err() != nil {
			return s.leftover()
		}
	}
}

func (s *Syncer) untilDue() time.Duration {
	next := s.q.nextDue()
	if n := s.led.nextDue(); !n.IsZero() && (next.IsZero() || n.Before(next)) {
		next = n
	}
	if next.IsZero() {
		return time.Hour
	}
	return max(time.Until(next), time.Millisecond)
}

// startDrain begins the shutdown phase: every pending file goes now, settled
// or not (the app has stopped writing). Past the drain deadline the uploads
// in flight are cancelled.
func (s *Syncer) startDrain(ctx context.Context, workCancel context.CancelFunc) (context.Context, context.CancelFunc) {
	drainCtx, cancel := s.deps.Drain(ctx)
	go func() {
		<-drainCtx.Done()
		if errors.Is(drainCtx.Err(), context.DeadlineExceeded) {
			workCancel()
		}
	}()
	s.log.Info("draining", "pending", s.q.len(), "timeout", s.deps.DrainTimeout)
	s.q.drain(time.Now())
	// Events may be late: one more walk sees everything.
	if err := s.rescan(time.Now(), false); err != nil {
		s.log.Error("final rescan failed", "err", err)
	}
	return drainCtx, cancel
}

// drained ends a drain that uploaded everything and appended it to the log.
func (s *Syncer) drained() error {
	if s.led.guardBlocked {
		return errGuardHeld
	}
	s.log.Info("drained", "files", s.led.files.len())
	return nil
}

// leftover is the error of a drain that ran out of time.
func (s *Syncer) leftover() error {
	left := s.q.sorted()
	for _, p := range s.led.pendingPaths() {
		if !s.q.has(p) {
			left = append(left, p)
		}
	}
	msg := fmt.Sprintf("SYNC_SHUTDOWN_TIMEOUT (%s) passed with %d file(s) not uploaded", s.deps.DrainTimeout, len(left))
	if len(left) > 0 {
		shown := left[:min(len(left), 50)]
		msg += ": " + strings.Join(shown, ", ")
		if len(left) > len(shown) {
			msg += fmt.Sprintf(" and %d more", len(left)-len(shown))
		}
	}
	if !s.led.idle() {
		msg += "; uploads not yet in the change log are not acknowledged (a restore may miss them)"
	}
	return errors.New(msg)
}

// gone forgets rel and everything under it (a removed file or directory).
func (s *Syncer) gone(rel string) {
	// A known file is not also a directory: forget just it. Walking every key
	// for each of the N files of an `rm -rf` would cost N² on a big tree.
	tree := !s.led.has(rel) && !s.q.has(rel)
	s.led.forgetTree(rel, tree)
	s.q.forgetTree(rel, tree)
}

// rescan walks the whole tree: at start, and whenever events may have been
// lost. Files that vanished without an event are forgotten.
func (s *Syncer) rescan(now time.Time, counted bool) error {
	if counted {
		s.m.rescans.Inc()
	}
	seen := s.led.files.walkSet()
	err := s.w.scan(s.cfg.Dir, func(rel string, st fileStat) {
		seen.add(rel)
		s.q.consider(rel, st, now, false)
	})
	if err != nil {
		return err
	}
	s.led.keepOnly(seen)
	s.q.keepOnly(seen)
	return nil
}

func (s *Syncer) rescanOrRetry() {
	if err := s.rescan(time.Now(), true); err != nil {
		s.log.Error("rescan failed; retrying in 30s", "err", err)
		s.w.rescanLater(time.Now())
	}
}

func (s *Syncer) onEvent(ev fsnotify.Event, now time.Time) {
	c := s.w.change(ev)
	switch c.kind {
	case removed:
		if st, err := s.stat(c.rel); err == nil {
			// A file is there again: renamed over (the write-then-rename
			// pattern, a pull's exchange), not removed.
			s.q.consider(c.rel, st, now, false)
			return
		}
		s.gone(c.rel)
	case fileChanged:
		s.q.touch(c.rel, c.stat, now, c.immediate)
	case dirCreated:
		err := s.w.scan(c.path, func(rel string, st fileStat) { s.q.consider(rel, st, now, c.immediate) })
		if err != nil {
			s.log.Error("cannot watch new directory; rescanning every 30s until it can", "dir", c.path, "err", err)
			s.w.rescanLater(now)
		}
	}
}

func (s *Syncer) onWatchError(err error) {
	if errors.Is(err, fsnotify.ErrEventOverflow) {
		s.log.Warn("inotify queue overflowed: events were lost, rescanning the whole tree")
	} else {
		s.log.Warn("watch error, rescanning the whole tree", "err", err)
	}
	s.rescanOrRetry()
}

// dispatch checks the due files against the filesystem and hands the stable
// ones to free workers.
func (s *Syncer) dispatch(now time.Time) {
	v := s.q.dispatch(now, s.stat)
	for _, rel := range v.gone {
		s.gone(rel)
	}
	for _, f := range v.tooLarge {
		s.log.Warn("file larger than SYNC_MAX_FILE_SIZE, not uploaded", "path", f.rel, "size", f.size, "max", s.cfg.MaxFileSize)
		s.m.skipped.Inc()
	}
	s.q.handOut(s.jobs)
}

// stat is the queue's view of a file under SYNC_DIR.
func (s *Syncer) stat(rel string) (fileStat, error) {
	fi, err := s.up.root.Lstat(rel)
	if errors.Is(err, safefs.ErrLink) {
		return fileStat{}, errNotRegular // a parent is a link now: not a file of the tree
	}
	if err != nil {
		return fileStat{}, err
	}
	if !fi.Mode().IsRegular() {
		return fileStat{}, errNotRegular
	}
	return statOf(fi), nil
}

func (s *Syncer) onResult(r result, now time.Time) {
	left := s.q.len() - 1
	f := s.q.finished(r, now)
	if c := r.conflict; c != nil {
		// Reported whatever became of the upload: the other version's bytes
		// were kept under conflicts/ even when the file changed meanwhile and
		// goes up again.
		s.m.conflicts.Inc()
		s.log.Warn(c.String(), "path", c.path, "winner", c.winner, "loser", c.loser, "kept_at", c.loserKey)
		s.rec.Event(context.Background(), events.Warning, "UploadConflict", c.String())
	}
	switch f.outcome {
	case outForget:
		s.gone(r.rel)
	case outFailed:
		s.m.uploads.WithLabelValues("error").Inc()
		if f.failures == 0 {
			return // no longer pending
		}
		s.log.Error("upload failed", "path", r.rel, "err", r.err, "failures", f.failures, "retry_in", f.retryIn)
		s.rec.Event(context.Background(), events.Warning, "UploadsFailing", fmt.Sprintf("upload of %s failed: %v", r.rel, r.err))
	case outChanged:
		s.m.uploads.WithLabelValues("changed").Inc()
	case outUploaded:
		if c := r.conflict; c != nil && c.weLost {
			// Another writer's newer version stays; ours is kept aside and
			// not logged. Known as handled, so it is not sent again.
			s.led.adopt(r.file)
			return
		}
		// Counted and logged as uploaded when its batch is stored (ack).
		s.led.record(r.file)
		s.log.Debug("object written", "path", r.rel, "size", r.file.Size, "pending", left)
	}
}

// housekeep runs every second: liveness, a rescan that was asked for, and
// the queue metrics.
func (s *Syncer) housekeep(ctx context.Context, now time.Time) {
	s.health.Beat()
	s.m.concurrency.Set(float64(s.up.lim.Limit()))
	if n := s.up.retrying.Load(); n > 0 {
		s.health.SetReady(fmt.Errorf("store failing: %d upload(s) retrying", n))
	} else {
		s.health.SetReady(nil)
	}
	if s.w.rescanDue(now) {
		s.rescanOrRetry()
	}
	s.backlog(ctx, now)
}

// backlog exports the queue and says so when it grows.
func (s *Syncer) backlog(ctx context.Context, now time.Time) {
	n, bytes, age := s.q.backlog(now)
	s.m.queue.Set(float64(n))
	s.m.queueBytes.Set(float64(bytes))
	s.m.oldest.Set(age.Seconds())
	// Five seconds is five times the visibility the syncer aims at with the
	// default settle: a backlog that old means uploads are not keeping up.
	if n > s.lastBacklog && age > max(5*time.Second, 3*s.cfg.Settle) {
		msg := fmt.Sprintf("upload backlog growing: %d file(s), %d bytes, oldest pending for %s", n, bytes, age.Round(time.Second))
		s.log.Warn(msg)
		s.rec.Event(ctx, events.Warning, "BacklogGrowing", msg)
	}
	s.lastBacklog = n
}
