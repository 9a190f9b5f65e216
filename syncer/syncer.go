package syncer

import (
	"container/heap"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"maps"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/fsnotify/fsnotify"

	"github.com/podkeeper/podkeeper/agents/backoff"
	"github.com/podkeeper/podkeeper/agents/config"
	"github.com/podkeeper/podkeeper/agents/events"
	"github.com/podkeeper/podkeeper/agents/health"
	"github.com/podkeeper/podkeeper/agents/lifecycle"
	"github.com/podkeeper/podkeeper/agents/snapshot"
	"github.com/podkeeper/podkeeper/agents/store"
)

// Options are the parts of a Syncer that are not configuration: injected
// dependencies and tuning for tests and benchmarks.
type Options struct {
	Log      *slog.Logger
	Recorder events.Recorder
	// Store overrides the store STORE_URL names.
	Store store.Store
	// Health overrides the server started on SYNC_HTTP_ADDR.
	Health *health.Server
	// MultipartThreshold and PartSize tune S3 multipart uploads (defaults from
	// the store package); PartConcurrency is the parts in flight per file.
	MultipartThreshold int64
	PartSize           int64
	PartConcurrency    int
	// LeaseTTL defaults to 30s.
	LeaseTTL time.Duration

	// onUpload, when set (tests), sees every successful upload.
	onUpload func(snapshot.File)
}

// Syncer is one running syncer. Its event loop goroutine owns the pending,
// files and dirty state; workers only upload and report back.
type Syncer struct {
	cfg     *Config
	log     *slog.Logger
	rec     *limitedRecorder
	st      store.Store
	s3      store.Multiparter // nil for file:// stores
	health  *health.Server
	m       *metrics
	opts    Options
	host    string
	suffix  string
	journal string // multipart journal directory

	watcher *fsnotify.Watcher
	watches int
	// eventGate lets a test stop the loop from reading events, so the kernel
	// queue overflows as it does under a real burst.
	eventGate sync.RWMutex

	pending map[string]*pend
	dues    dueHeap                  // pending files by due time (entries may be stale)
	files   map[string]snapshot.File // uploaded and present: what a snapshot lists
	ready   []string                 // due and checked, waiting for a free worker
	skipped map[string]fileStat      // too large; not warned about again while unchanged
	dirty   bool
	// prev is the last snapshot written (or the baseline): the mass-delete
	// guard compares against it.
	prev         *snapshot.Manifest
	guardBlocked bool
	draining     bool
	renameHint   bool
	// rescanAt is set when a watch could not be added: the tree is walked
	// again then, so a directory without a watch is still covered.
	rescanAt time.Time

	jobs    chan job
	results chan result
	lease   *lease
}

type fileStat struct {
	size  int64
	mtime time.Time
	mode  fs.FileMode
}

func statOf(fi fs.FileInfo) fileStat {
	return fileStat{size: fi.Size(), mtime: fi.ModTime(), mode: fi.Mode().Perm()}
}

func (a fileStat) same(b fileStat) bool {
	return a.size == b.size && a.mtime.Equal(b.mtime) && a.mode == b.mode
}

// pend is a file waiting to be uploaded.
type pend struct {
	stat      fileStat // at the last event or check
	due       time.Time
	first     time.Time
	gen       uint64 // bumped by every event
	jobGen    uint64
	inflight  bool
	queued    bool
	failures  int
	immediate bool // appeared by rename: no settle period
	removed   bool // deleted while its upload was in flight
	// heapAt is the time of p's entry in Syncer.dues (zero: none). One entry
	// at or before due is enough: when it comes up early, it is pushed again.
	heapAt time.Time
}

// dueItem is an entry of Syncer.dues. Entries are never removed in place: one
// whose pend is gone or was scheduled anew is dropped when it comes up.
type dueItem struct {
	at  time.Time
	rel string
	p   *pend
}

// dueHeap orders pending files by due time, so that the loop's work per wake-up
// follows the files that are due, not all that are pending (a backfill of
// thousands of files made every upload result walk the whole set twice).
type dueHeap []dueItem

func (h dueHeap) Len() int           { return len(h) }
func (h dueHeap) Less(i, j int) bool { return h[i].at.Before(h[j].at) }
func (h dueHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *dueHeap) Push(x any)        { *h = append(*h, x.(dueItem)) }
func (h *dueHeap) Pop() any {
	old := *h
	it := old[len(old)-1]
	*h = old[:len(old)-1]
	return it
}

// schedule makes sure the loop looks at p by p.due.
func (s *Syncer) schedule(rel string, p *pend) {
	if p.inflight || p.queued || (!p.heapAt.IsZero() && !p.heapAt.After(p.due)) {
		return
	}
	p.heapAt = p.due
	heap.Push(&s.dues, dueItem{at: p.due, rel: rel, p: p})
}

// current reports whether it is the live entry of a pending file.
func (s *Syncer) current(it dueItem) bool {
	return s.pending[it.rel] == it.p && it.p.heapAt.Equal(it.at)
}

type job struct {
	rel string
	gen uint64
}

type result struct {
	rel       string
	gen       uint64
	file      snapshot.File
	stat      fileStat
	gone      bool
	changed   bool
	skipped   bool
	err       error
	bytesSent int64
}

var suffixRe = regexp.MustCompile(`[^A-Za-z0-9_.-]+`)

// New builds a syncer. It does not touch the network; Run does.
func New(ctx context.Context, cfg *Config, o Options) (*Syncer, error) {
	if o.Log == nil {
		o.Log = slog.Default()
	}
	if o.Recorder == nil {
		o.Recorder = events.Log{L: o.Log}
	}
	if o.LeaseTTL <= 0 {
		o.LeaseTTL = 30 * time.Second
	}
	if o.MultipartThreshold <= 0 {
		o.MultipartThreshold = store.DefaultMultipartThreshold
	}
	if o.PartSize <= 0 {
		o.PartSize = store.DefaultPartSize
	}
	if o.PartConcurrency <= 0 {
		o.PartConcurrency = store.DefaultPartConcurrency
	}
	s := &Syncer{cfg: cfg, log: o.Log, opts: o, pending: map[string]*pend{}, files: map[string]snapshot.File{},
		skipped: map[string]fileStat{}}
	s.rec = newLimitedRecorder(o.Recorder)
	s.st = o.Store
	if s.st == nil {
		var err error
		s.st, err = store.Open(ctx, &cfg.Store, o.Log)
		if err != nil {
			return nil, err
		}
	}
	s.s3, _ = s.st.(store.Multiparter)
	s.health = o.Health
	if s.health == nil {
		s.health = health.New("syncer")
	}
	s.m = newMetrics(s.health)
	s.host, _ = os.Hostname()
	s.suffix = strings.Trim(suffixRe.ReplaceAllString(cfg.Base.PodName, "-"), "-.")
	if len(s.suffix) > 64 {
		s.suffix = s.suffix[:64]
	}
	if s.suffix == "" {
		b := make([]byte, 4)
		_, _ = rand.Read(b)
		s.suffix = hex.EncodeToString(b)
	}
	s.journal = filepath.Join(cfg.StateDir, "multipart")
	s.jobs = make(chan job, cfg.Concurrency)
	s.results = make(chan result, cfg.Concurrency)
	return s, nil
}

// Health is the syncer's health server (tests read its address and metrics).
func (s *Syncer) Health() *health.Server { return s.health }

// Run syncs until ctx ends, then drains within SYNC_SHUTDOWN_TIMEOUT.
func (s *Syncer) Run(ctx context.Context) (err error) {
	if s.opts.Health == nil {
		if err := s.health.Start(s.cfg.HTTPAddr, s.log); err != nil {
			return &config.Error{Errors: []config.FieldError{{Var: "SYNC_HTTP_ADDR", Value: s.cfg.HTTPAddr, Problem: err.Error()}}}
		}
		defer s.health.Close()
	}
	s.health.SetLiveness(time.Minute)
	if err := os.MkdirAll(s.journal, 0o700); err != nil {
		return fmt.Errorf("state directory SYNC_STATE_DIR=%s: %w", s.cfg.StateDir, err)
	}
	s.log.Info("syncing", "dir", s.cfg.Dir, "store", s.st.String(), "settle", s.cfg.Settle, "concurrency", s.cfg.Concurrency)

	// Uploads outlive the signal: they end when the drain deadline passes, not
	// when SIGTERM arrives.
	workCtx, workCancel := context.WithCancel(context.WithoutCancel(ctx))
	defer workCancel()

	s.lease = newLease(s)
	if err := s.retryStartup(ctx, "acquire lease", s.lease.acquire); err != nil {
		var lc *LeaseConflictError
		if errors.As(err, &lc) {
			s.rec.Event(ctx, events.Warning, "LeaseConflict", lc.Error())
		}
		return err
	}
	leaseLost := make(chan error, 1)
	leaseCtx, leaseStop := context.WithCancel(workCtx)
	leaseDone := make(chan struct{})
	go func() { defer close(leaseDone); s.lease.keep(leaseCtx, leaseLost) }()
	released := false
	defer func() {
		leaseStop()
		<-leaseDone
		if !released {
			// Leaving without a clean drain: keep the lease until it expires
			// unless we can release it quickly, so a restart of the same pod
			// takes it over anyway.
			rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
			s.lease.release(rctx)
			cancel()
		}
	}()

	if err := s.retryStartup(ctx, "load baseline snapshot", s.loadBaseline); err != nil {
		return err
	}
	if s.s3 != nil {
		if err := s.retryStartup(ctx, "abort stale multipart uploads", s.abortStale); err != nil {
			return err
		}
	}

	w, err := fsnotify.NewWatcher()
	if err != nil {
		return fmt.Errorf("fsnotify: %w", watchErr(err))
	}
	s.watcher = w
	defer w.Close()
	if err := s.rescan(time.Now(), false); err != nil {
		return err
	}
	s.health.SetReady(nil)
	s.log.Info("watching", "dir", s.cfg.Dir, "watches", s.watches, "pending", len(s.pending), "baseline_files", len(s.files))

	var wg sync.WaitGroup
	for range s.cfg.Concurrency {
		wg.Add(1)
		go func() { defer wg.Done(); s.worker(workCtx) }()
	}
	defer func() {
		workCancel()
		close(s.jobs)
		// Workers may be blocked handing in a result.
		go func() {
			for range s.results {
			}
		}()
		wg.Wait()
		close(s.results)
	}()

	err = s.loop(ctx, workCtx, workCancel, leaseLost)
	if err == nil {
		leaseStop()
		<-leaseDone
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		s.lease.release(rctx)
		cancel()
		released = true
	}
	return err
}

// retryStartup retries a startup step through outages until ctx ends.
func (s *Syncer) retryStartup(ctx context.Context, what string, op func(context.Context) error) error {
	s.health.SetReady(fmt.Errorf("%s", what))
	return backoff.Retry(ctx, backoff.Default, store.IsRetryable, func(attempt int, err error, wait time.Duration) {
		s.log.Warn(what+" failed, retrying", "err", err, "attempt", attempt+1, "wait", wait)
	}, op)
}

func (s *Syncer) loadBaseline(ctx context.Context) error {
	info, err := snapshot.Resolve(ctx, s.st, "latest")
	if errors.Is(err, snapshot.ErrNoSnapshot) {
		s.log.Info("no snapshot yet: every file is new")
		s.prev = nil
		return nil
	}
	if err != nil {
		return err
	}
	m, err := snapshot.Load(ctx, s.st, info)
	if err != nil {
		return err
	}
	s.prev = m
	for _, f := range m.Files {
		s.files[f.Path] = f
	}
	s.m.lastSnapshot.Set(float64(m.Created.Unix()))
	s.log.Info("baseline", "snapshot", m.ID, "files", len(m.Files))
	return nil
}

// abortStale aborts multipart uploads under data/ that no journal of ours
// will resume (an earlier writer's leftovers, or a journal lost with the
// emptyDir), and the uploads of journals whose file is gone. On MinIO, whose
// listing of multipart uploads needs an exact key, leftovers without a journal
// stay until the bucket's lifecycle rule (AbortIncompleteMultipartUpload)
// removes them.
func (s *Syncer) abortStale(ctx context.Context) error {
	keep := map[string]bool{}
	entries, _ := os.ReadDir(s.journal)
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), ".json") {
			continue
		}
		p := filepath.Join(s.journal, e.Name())
		j, err := store.LoadJournal(p)
		if err != nil {
			s.log.Warn("dropping unreadable multipart journal", "file", p, "err", err)
			os.Remove(p)
			continue
		}
		rel := strings.TrimPrefix(j.Key, snapshot.DataDir)
		if _, err := os.Lstat(s.abs(rel)); err != nil {
			// Abort by the journal's own id: listing cannot be relied on to
			// find it (MinIO lists multipart uploads only by exact key).
			s.log.Info("aborting multipart upload of a file that is gone", "key", j.Key)
			if err := s.s3.AbortMultipart(ctx, j.Key, j.UploadID); err != nil {
				return err
			}
			os.Remove(p)
			continue
		}
		keep[j.UploadID] = true
	}
	ups, err := s.s3.ListMultipartUploads(ctx, snapshot.DataDir)
	if err != nil {
		return err
	}
	for _, u := range ups {
		if keep[u.UploadID] {
			continue
		}
		s.log.Info("aborting stale multipart upload", "key", u.Key, "initiated", u.Initiated)
		if err := s.s3.AbortMultipart(ctx, u.Key, u.UploadID); err != nil {
			return err
		}
	}
	return nil
}

func (s *Syncer) abs(rel string) string { return filepath.Join(s.cfg.Dir, filepath.FromSlash(rel)) }

// rel maps an absolute path under SYNC_DIR to its '/'-separated relative
// path; ok is false for the directory itself, paths outside it and the state
// directories.
func (s *Syncer) rel(abs string) (string, bool) {
	r, err := filepath.Rel(s.cfg.Dir, abs)
	if err != nil || r == "." || strings.HasPrefix(r, "..") {
		return "", false
	}
	r = filepath.ToSlash(r)
	if r == StateDirName || strings.HasPrefix(r, StateDirName+"/") || s.isStateDir(abs) {
		return "", false
	}
	return r, true
}

func (s *Syncer) isStateDir(abs string) bool {
	sd := s.cfg.StateDir
	return abs == sd || strings.HasPrefix(abs, sd+string(filepath.Separator))
}

// excluded reports whether rel matches SYNC_EXCLUDE by full relative path or
// by base name.
func (s *Syncer) excluded(rel string) bool {
	base := path.Base(rel)
	for _, p := range s.cfg.Exclude {
		if ok, _ := path.Match(p, rel); ok {
			return true
		}
		if ok, _ := path.Match(p, base); ok {
			return true
		}
	}
	return false
}

// watchErr names the sysctl to raise when inotify runs out of watches or
// instances: the default limits are easy to hit on a node with many Pods.
func watchErr(err error) error {
	if errors.Is(err, fsErrNoSpace) || errors.Is(err, fsErrTooManyInstances) {
		return fmt.Errorf("%w: the inotify limit is reached; raise fs.inotify.max_user_watches (and fs.inotify.max_user_instances) on the node, e.g. sysctl -w fs.inotify.max_user_watches=524288", err)
	}
	return err
}

// addWatch watches dir. It is called before dir's entries are read, so a file
// created in between is seen by the scan or by an event, never by neither.
func (s *Syncer) addWatch(dir string) error {
	if err := s.watcher.Add(dir); err != nil {
		return watchErr(err)
	}
	s.watches++
	s.m.watches.Set(float64(s.watches))
	return nil
}

// scanTree watches and walks root. Files that differ from what is uploaded
// become pending; with immediate they skip the settle period (a tree moved in
// is complete). It returns the files seen.
func (s *Syncer) scanTree(root string, now time.Time, immediate bool, seen map[string]bool) error {
	return filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil // removed while we walk: its events tell the rest
			}
			if p == root && p == s.cfg.Dir {
				return err
			}
			s.log.Warn("cannot read", "path", p, "err", err)
			return nil
		}
		if d.IsDir() {
			if p != s.cfg.Dir {
				if _, ok := s.rel(p); !ok {
					return filepath.SkipDir
				}
			}
			if err := s.addWatch(p); err != nil {
				if p == s.cfg.Dir || errors.Is(err, fsErrNoSpace) {
					return err
				}
				s.log.Warn("cannot watch", "dir", p, "err", err)
			}
			return nil
		}
		rel, ok := s.rel(p)
		if !ok || !d.Type().IsRegular() || s.excluded(rel) {
			return nil
		}
		fi, err := d.Info()
		if err != nil {
			return nil
		}
		if seen != nil {
			seen[rel] = true
		}
		s.consider(rel, statOf(fi), now, immediate)
		return nil
	})
}

// consider makes rel pending unless what is uploaded already matches st.
func (s *Syncer) consider(rel string, st fileStat, now time.Time, immediate bool) {
	if f, ok := s.files[rel]; ok && st.same(fileStat{size: f.Size, mtime: f.MTime, mode: fs.FileMode(f.Mode)}) {
		if p := s.pending[rel]; p != nil && !p.inflight {
			delete(s.pending, rel)
		}
		return
	}
	s.touch(rel, st, now, immediate)
}

// touch records a change of rel.
func (s *Syncer) touch(rel string, st fileStat, now time.Time, immediate bool) {
	p := s.pending[rel]
	if p == nil {
		p = &pend{first: now}
		s.pending[rel] = p
	}
	p.gen++
	p.stat = st
	p.immediate = immediate
	p.removed = false
	if immediate || s.draining {
		p.due = now
	} else {
		p.due = now.Add(s.cfg.Settle)
	}
	s.schedule(rel, p)
}

// finishedBefore reports whether the inode changed metadata (rename, link,
// chmod, utimes) after its last data write: writes set ctime and mtime to the
// same instant, so ctime > mtime at the moment a file appears means it was
// moved or linked in complete rather than created to be written. A rename in
// the same clock tick as the last write is not detected here (the file then
// waits SYNC_SETTLE), and later Write events still restart the settle time.
func finishedBefore(fi fs.FileInfo) bool {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return false
	}
	ctime := time.Unix(st.Ctim.Sec, st.Ctim.Nsec)
	return ctime.After(fi.ModTime())
}

// gone forgets rel and everything under it (a removed file or directory).
func (s *Syncer) gone(rel string) {
	_, uploaded := s.files[rel]
	_, skipped := s.skipped[rel]
	if uploaded || skipped || s.pending[rel] != nil {
		// A known file is not also a directory: forget just it. Walking every
		// key for each of the N files of an `rm -rf` would cost N² on a big tree.
		s.forget(rel)
		return
	}
	under := rel + "/"
	for _, m := range []func(func(string) bool){maps.Keys(s.files), maps.Keys(s.pending), maps.Keys(s.skipped)} {
		for k := range m {
			if strings.HasPrefix(k, under) {
				s.forget(k)
			}
		}
	}
}

// forget drops one file from what is uploaded, pending and skipped; an upload
// in flight is only marked, its result then forgets it.
func (s *Syncer) forget(k string) {
	if _, ok := s.files[k]; ok {
		delete(s.files, k)
		s.dirty = true
	}
	if p := s.pending[k]; p != nil {
		if p.inflight {
			p.removed = true
		} else {
			delete(s.pending, k)
		}
	}
	delete(s.skipped, k)
}

// rescan walks the whole tree: at start, and whenever events may have been
// lost. Files that vanished without an event are forgotten.
func (s *Syncer) rescan(now time.Time, counted bool) error {
	if counted {
		s.m.rescans.Inc()
	}
	seen := map[string]bool{}
	if err := s.scanTree(s.cfg.Dir, now, false, seen); err != nil {
		return err
	}
	for k := range s.files {
		if !seen[k] {
			delete(s.files, k)
			s.dirty = true
		}
	}
	for k, p := range s.pending {
		if !seen[k] && !p.inflight {
			delete(s.pending, k)
		}
	}
	return nil
}

func (s *Syncer) handleEvent(ev fsnotify.Event, now time.Time) {
	hint := s.renameHint
	s.renameHint = ev.Op == fsnotify.Rename
	rel, ok := s.rel(ev.Name)
	if !ok {
		return
	}
	if ev.Has(fsnotify.Remove) || ev.Has(fsnotify.Rename) {
		s.gone(rel)
		// A directory's watch; files have none and Remove then fails.
		if s.watcher.Remove(ev.Name) == nil {
			s.watches--
			s.m.watches.Set(float64(s.watches))
		}
		return
	}
	fi, err := os.Lstat(ev.Name)
	if err != nil {
		return // already gone again; its Remove event follows
	}
	if fi.IsDir() {
		if ev.Has(fsnotify.Create) {
			// A directory renamed into the tree is complete; one just made is
			// about to be filled and its files settle as usual.
			if err := s.scanTree(ev.Name, now, hint || finishedBefore(fi), nil); err != nil {
				s.log.Error("cannot watch new directory; rescanning every 30s until it can", "dir", ev.Name, "err", err)
				s.rescanAt = now.Add(30 * time.Second)
			}
		}
		return
	}
	if !fi.Mode().IsRegular() || s.excluded(rel) {
		return
	}
	// MOVED_FROM followed by MOVED_TO is a rename inside the tree (the
	// write-then-rename pattern): the file is complete now. fsnotify reports a
	// rename from outside the tree as a plain Create; finishedBefore tells it
	// from a file just opened for writing.
	s.touch(rel, statOf(fi), now, ev.Has(fsnotify.Create) && (hint || finishedBefore(fi)))
}

// loop is the event loop: fsnotify events, due files, worker results,
// snapshots, metrics; then the drain.
func (s *Syncer) loop(ctx, workCtx context.Context, workCancel context.CancelFunc, leaseLost <-chan error) error {
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	var snapC <-chan time.Time
	if s.cfg.SnapshotInterval > 0 {
		t := time.NewTicker(s.cfg.SnapshotInterval)
		defer t.Stop()
		snapC = t.C
	}
	snapDone := make(chan snapResult, 1)
	snapRunning := false
	var drainCtx context.Context
	var drainCancel context.CancelFunc
	defer func() {
		if drainCancel != nil {
			drainCancel()
		}
	}()
	var lastBacklog int
	done := ctx.Done()
	events := s.watcher.Events
	var overdue bool

	for {
		now := time.Now()
		s.dispatch(now)
		if s.draining && len(s.pending) == 0 && !snapRunning {
			break
		}
		next := s.nextDue()
		if !next.IsZero() {
			timer.Reset(max(next.Sub(time.Now()), time.Millisecond))
		} else {
			timer.Reset(time.Hour)
		}
		s.eventGate.RLock()
		select {
		case ev, ok := <-events:
			if ok {
				s.handleEvent(ev, time.Now())
			}
		case err := <-s.watcher.Errors:
			if errors.Is(err, fsnotify.ErrEventOverflow) {
				s.log.Warn("inotify queue overflowed: events were lost, rescanning the whole tree")
			} else {
				s.log.Warn("watch error, rescanning the whole tree", "err", err)
			}
			if err := s.rescan(time.Now(), true); err != nil {
				s.log.Error("rescan failed; retrying in 30s", "err", err)
				s.rescanAt = time.Now().Add(30 * time.Second)
			}
		case <-timer.C:
		case r := <-s.results:
			s.handleResult(r, time.Now())
		case <-snapC:
			if !snapRunning && !s.draining {
				snapRunning = s.startSnapshot(workCtx, snapDone, false)
			}
		case r := <-snapDone:
			snapRunning = false
			s.finishSnapshot(r)
		case err := <-leaseLost:
			s.eventGate.RUnlock()
			return err
		case <-tick.C:
			s.health.Beat()
			if !s.rescanAt.IsZero() && time.Now().After(s.rescanAt) {
				s.rescanAt = time.Time{}
				if err := s.rescan(time.Now(), true); err != nil {
					s.log.Error("rescan failed; retrying in 30s", "err", err)
					s.rescanAt = time.Now().Add(30 * time.Second)
				}
			}
			lastBacklog = s.backlog(ctx, time.Now(), lastBacklog)
		case <-done:
			done = nil
			s.draining = true
			drainCtx, drainCancel = lifecycle.DrainContext(ctx, s.cfg.ShutdownTimeout)
			go func() {
				<-drainCtx.Done()
				if errors.Is(drainCtx.Err(), context.DeadlineExceeded) {
					workCancel()
				}
			}()
			s.log.Info("draining", "pending", len(s.pending), "timeout", s.cfg.ShutdownTimeout)
			// Events may be late: one more walk sees everything, and every pending
			// file goes now, settled or not (the app has stopped writing).
			if err := s.rescan(time.Now(), false); err != nil {
				s.log.Error("final rescan failed", "err", err)
			}
			for rel, p := range s.pending {
				p.due = time.Now()
				s.schedule(rel, p)
			}
		}
		s.eventGate.RUnlock()
		if drainCtx != nil && drainCtx.Err() != nil {
			overdue = true
			break
		}
	}
	if overdue {
		return s.leftover()
	}
	// The final snapshot, after the drain.
	if s.dirty || s.guardBlocked {
		ok := s.startSnapshot(drainCtx, snapDone, true)
		if ok {
			select {
			case r := <-snapDone:
				s.finishSnapshot(r)
				if r.err != nil {
					if drainCtx.Err() != nil {
						return s.leftover()
					}
					return fmt.Errorf("final snapshot: %w", r.err)
				}
			case <-drainCtx.Done():
				return s.leftover()
			}
		}
		if s.guardBlocked {
			return errors.New("final snapshot held back by the mass-delete guard (more than half of the files are gone; set SYNC_ALLOW_MASS_DELETE=true if that is intended)")
		}
	}
	s.log.Info("drained", "files", len(s.files))
	return nil
}

// leftover is the error of a drain that ran out of time.
func (s *Syncer) leftover() error {
	left := slices.Sorted(func(yield func(string) bool) {
		for k := range s.pending {
			if !yield(k) {
				return
			}
		}
	})
	msg := fmt.Sprintf("SYNC_SHUTDOWN_TIMEOUT (%s) passed with %d file(s) not uploaded", s.cfg.ShutdownTimeout, len(left))
	if len(left) > 0 {
		shown := left[:min(len(left), 50)]
		msg += ": " + strings.Join(shown, ", ")
		if len(left) > len(shown) {
			msg += fmt.Sprintf(" and %d more", len(left)-len(shown))
		}
	}
	if s.dirty {
		msg += "; the final snapshot was not written"
	}
	return errors.New(msg)
}

func (s *Syncer) nextDue() time.Time {
	var next time.Time
	if len(s.ready) > 0 {
		return time.Time{} // a worker's result wakes the loop
	}
	for len(s.dues) > 0 && !s.current(s.dues[0]) {
		heap.Pop(&s.dues)
	}
	if len(s.dues) > 0 {
		next = s.dues[0].at
	}
	return next
}

// dispatch checks due files and hands them to free workers.
func (s *Syncer) dispatch(now time.Time) {
	for len(s.dues) > 0 && !s.dues[0].at.After(now) {
		it := heap.Pop(&s.dues).(dueItem)
		if !s.current(it) {
			continue
		}
		rel, p := it.rel, it.p
		p.heapAt = time.Time{}
		if p.inflight || p.queued {
			continue // its result schedules it again
		}
		if p.due.After(now) {
			s.schedule(rel, p)
			continue
		}
		fi, err := os.Lstat(s.abs(rel))
		if err != nil || !fi.Mode().IsRegular() {
			delete(s.pending, rel)
			if err != nil && errors.Is(err, fs.ErrNotExist) {
				s.gone(rel)
			}
			continue
		}
		st := statOf(fi)
		if !st.same(p.stat) && !p.immediate && !s.draining {
			// Written without an event (mmap) or an event is still queued: not
			// stable yet.
			p.stat, p.due = st, now.Add(s.cfg.Settle)
			s.schedule(rel, p)
			continue
		}
		p.stat = st
		if f, ok := s.files[rel]; ok && st.same(fileStat{size: f.Size, mtime: f.MTime, mode: fs.FileMode(f.Mode)}) {
			delete(s.pending, rel)
			continue
		}
		if s.cfg.MaxFileSize > 0 && st.size > s.cfg.MaxFileSize {
			if old, ok := s.skipped[rel]; !ok || !old.same(st) {
				s.log.Warn("file larger than SYNC_MAX_FILE_SIZE, not uploaded", "path", rel, "size", st.size, "max", s.cfg.MaxFileSize)
				s.m.skipped.Inc()
				s.skipped[rel] = st
			}
			delete(s.pending, rel)
			continue
		}
		p.queued = true
		s.ready = append(s.ready, rel)
	}
	for len(s.ready) > 0 {
		rel := s.ready[0]
		p := s.pending[rel]
		if p == nil || !p.queued {
			s.ready = s.ready[1:]
			continue
		}
		select {
		case s.jobs <- job{rel: rel, gen: p.gen}:
			s.ready = s.ready[1:]
			p.queued, p.inflight, p.jobGen = false, true, p.gen
		default:
			return
		}
	}
	s.ready = nil
}

func (s *Syncer) handleResult(r result, now time.Time) {
	p := s.pending[r.rel]
	if p != nil {
		p.inflight = false
	}
	// Whatever stays pending (a retry, a change during the upload) needs an
	// entry in dues again: it had none while in flight.
	defer func() {
		if p := s.pending[r.rel]; p != nil {
			s.schedule(r.rel, p)
		}
	}()
	switch {
	case r.gone || (p != nil && p.removed):
		delete(s.pending, r.rel)
		s.gone(r.rel)
	case r.skipped:
		delete(s.pending, r.rel)
	case r.err != nil:
		s.m.uploads.WithLabelValues("error").Inc()
		if p == nil {
			return
		}
		p.failures++
		// A permanent error (denied, bad request) on one file must not stop
		// the others: it is retried, only slower.
		wait := min(time.Minute<<min(p.failures-1, 4), 10*time.Minute)
		p.due = now.Add(wait)
		s.log.Error("upload failed", "path", r.rel, "err", r.err, "failures", p.failures, "retry_in", wait)
		s.rec.Event(context.Background(), events.Warning, "UploadsFailing", fmt.Sprintf("upload of %s failed: %v", r.rel, r.err))
	case r.changed:
		s.m.uploads.WithLabelValues("changed").Inc()
		if p == nil {
			p = &pend{first: now}
			s.pending[r.rel] = p
		}
		p.stat, p.due = r.stat, now.Add(s.cfg.Settle)
		if s.draining {
			p.due = now
		}
	default:
		s.m.uploads.WithLabelValues("ok").Inc()
		s.m.bytes.WithLabelValues("ok").Add(float64(r.bytesSent))
		s.files[r.rel] = r.file
		s.dirty = true
		s.log.Debug("uploaded", "path", r.rel, "size", r.file.Size, "pending", len(s.pending)-1)
		if p != nil && p.gen == r.gen {
			delete(s.pending, r.rel)
		}
		if s.opts.onUpload != nil {
			s.opts.onUpload(r.file)
		}
	}
}

// backlog exports the queue and says so when it grows.
func (s *Syncer) backlog(ctx context.Context, now time.Time, last int) int {
	var bytes int64
	var oldest time.Time
	for _, p := range s.pending {
		bytes += p.stat.size
		if oldest.IsZero() || p.first.Before(oldest) {
			oldest = p.first
		}
	}
	age := time.Duration(0)
	if !oldest.IsZero() {
		age = now.Sub(oldest)
	}
	s.m.queue.Set(float64(len(s.pending)))
	s.m.queueBytes.Set(float64(bytes))
	s.m.oldest.Set(age.Seconds())
	// Five seconds is five times the visibility the syncer aims at with the
	// default settle: a backlog that old means uploads are not keeping up.
	if n := len(s.pending); n > last && age > max(5*time.Second, 3*s.cfg.Settle) {
		msg := fmt.Sprintf("upload backlog growing: %d file(s), %d bytes, oldest pending for %s", n, bytes, age.Round(time.Second))
		s.log.Warn(msg)
		s.rec.Event(ctx, events.Warning, "BacklogGrowing", msg)
	}
	return len(s.pending)
}
