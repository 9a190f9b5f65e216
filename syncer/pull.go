package syncer

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"maps"
	"path"
	"slices"
	"strings"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/podkeeper/podkeeper/agents/backoff"
	"github.com/podkeeper/podkeeper/agents/changelog"
	"github.com/podkeeper/podkeeper/agents/codec"
	"github.com/podkeeper/podkeeper/agents/events"
	"github.com/podkeeper/podkeeper/agents/safefs"
	"github.com/podkeeper/podkeeper/agents/snapshot"
	"github.com/podkeeper/podkeeper/agents/store"
)

// pullTempPrefix names the puller's temp files in its state directory.
const pullTempPrefix = ".pull-"

// puller is SYNC_PULL: it keeps a live fold of the change log and brings
// every path whose winner is another writer's into SYNC_DIR. It downloads
// and verifies in the background into temp files of the state dir; the
// decision against what is on disk and the rename into place are the event
// loop's (placePulled), which owns the ledger: a pulled file is recorded as
// in the log before the watcher can see it, so it is never uploaded back.
type puller struct {
	cfg  *Config
	st   store.Store
	log  *slog.Logger
	rec  events.Recorder
	m    pullMetrics
	me   string       // this writer's id: its own changes are never pulled
	tmp  *safefs.Root // the state dir's pull/ directory, same filesystem as SYNC_DIR
	root *safefs.Root // SYNC_DIR, for the cheap "already here" check

	state  *changelog.State
	follow *changelog.Follower
	// retry are paths whose pull failed; they are tried again at the next look.
	retry map[string]bool
	// held is what SYNC_PULL_MAX_BYTES is judged against: bytes of the live
	// files counted (own ones always, pulled ones while under the limit).
	held    int64
	counted map[string]int64
	limited bool

	requests chan<- pullRequest
}

// pullRequest asks the event loop to put a downloaded file (tmp, in the pull
// directory) or a deletion in place.
type pullRequest struct {
	e     changelog.Entry
	tmp   string
	reply chan pullOutcome
}

type pullOutcome int

const (
	pulledIn   pullOutcome = iota // placed, replaced or removed
	pullSame                      // the disk already had it
	pullKept                      // the local version wins (or is the app's pending change)
	pullAppWon                    // the app changed the path meanwhile: its version stays
	pullFailed
)

func newPuller(s *Syncer, tmp *safefs.Root, requests chan<- pullRequest) *puller {
	return &puller{cfg: s.cfg, st: s.deps.Store, log: s.log.With("stage", "pull"), rec: s.rec, m: s.m.pull,
		me: s.led.writer.ID(), tmp: tmp, root: s.up.root, retry: map[string]bool{}, counted: map[string]int64{},
		requests: requests}
}

// run folds the log, converges SYNC_DIR to it, then follows the log every
// SYNC_PULL_INTERVAL until ctx ends.
func (p *puller) run(ctx context.Context) {
	p.clearTemps()
	err := backoff.Retry(ctx, backoff.Default, store.IsRetryable, func(attempt int, err error, wait time.Duration) {
		p.log.Warn("pull: folding the change log failed, retrying", "err", err, "attempt", attempt+1, "wait", wait)
	}, func(ctx context.Context) error {
		f, err := changelog.FoldState(ctx, p.st, time.Time{})
		if err != nil {
			return err
		}
		p.state, p.follow = f.State, changelog.NewFollower(p.st, f)
		return nil
	})
	if err != nil {
		if ctx.Err() == nil {
			p.log.Error("pull: cannot fold the change log; not pulling", "err", err)
		}
		return
	}
	var paths []string
	for path := range p.state.All() {
		paths = append(paths, path)
		p.count(path)
	}
	p.log.Info("pull: converging", "paths", len(paths))
	p.converge(ctx, paths)
	t := time.NewTimer(p.cfg.PullInterval)
	defer t.Stop()
	var busy time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if p.look(ctx) {
			busy = time.Now()
		}
		t.Reset(p.nextLook(busy))
	}
}

// busyFor and busyDivisor: while other writers are appending (a look found
// batches within busyFor), the log is looked at busyDivisor times as often,
// so a replica follows a busy fleet closer than SYNC_PULL_INTERVAL; an idle
// fleet costs one LIST per interval.
const (
	busyFor     = 10 * time.Second
	busyDivisor = 4
)

func (p *puller) nextLook(busy time.Time) time.Duration {
	if !busy.IsZero() && time.Since(busy) < busyFor {
		return max(p.cfg.PullInterval/busyDivisor, 50*time.Millisecond)
	}
	return p.cfg.PullInterval
}

// look reads the new batches and converges the paths whose winner changed,
// plus those that failed before. It reports whether other writers appended.
func (p *puller) look(ctx context.Context) (active bool) {
	p.m.looks.Inc()
	batches, bad, err := p.follow.Next(ctx)
	for _, e := range bad {
		p.log.Error("pull: skipping a change-log batch that cannot be read", "err", e)
	}
	if err != nil {
		if ctx.Err() == nil {
			p.log.Warn("pull: reading the change log failed; trying again at the next look", "err", err)
		}
		return false
	}
	if n := p.follow.Newest(); !n.IsZero() {
		p.m.lag.Set(time.Since(n).Seconds())
	}
	changed := map[string]bool{}
	for path := range p.retry {
		changed[path] = true
	}
	clear(p.retry)
	for _, b := range batches {
		active = active || b.Writer.ID() != p.me
		for _, c := range b.Changes {
			before, had := p.state.Get(c.Path)
			p.state.Apply(&changelog.Batch{Writer: b.Writer, Changes: []changelog.Change{c}})
			if after, _ := p.state.Get(c.Path); !had || !sameEntry(after, before) {
				changed[c.Path] = true
			}
		}
	}
	if len(changed) == 0 {
		return active
	}
	paths := slices.Sorted(maps.Keys(changed))
	for _, path := range paths {
		p.count(path)
	}
	p.converge(ctx, paths)
	return active
}

// converge pulls paths, SYNC_CONCURRENCY at a time.
func (p *puller) converge(ctx context.Context, paths []string) {
	var g errgroup.Group
	g.SetLimit(p.cfg.Concurrency)
	failed := make([]bool, len(paths))
	for i, path := range paths {
		e, _ := p.state.Get(path)
		if !p.wanted(e) {
			continue
		}
		g.Go(func() error {
			failed[i] = !p.pullOne(ctx, e)
			return nil
		})
	}
	g.Wait()
	for i, f := range failed {
		if f && ctx.Err() == nil {
			p.retry[paths[i]] = true
		}
	}
}

// wanted reports whether e is another writer's change this replica takes.
func (p *puller) wanted(e changelog.Entry) bool {
	switch {
	case e.Writer == p.me:
		return false // its own write or deletion: never pulled back
	case e.Deleted:
		return p.cfg.Delete
	case p.cfg.PullMaxBytes > 0 && p.counted[e.Path] < 0:
		return false // over SYNC_PULL_MAX_BYTES
	}
	return !p.excluded(e.Path)
}

// excluded: what this syncer would not upload, it does not pull either.
func (p *puller) excluded(path string) bool { return excluded(p.cfg.Exclude, true, path) }

func sameEntry(a, b changelog.Entry) bool {
	return a.Writer == b.Writer && a.Deleted == b.Deleted && a.SHA256 == b.SHA256 && a.Size == b.Size &&
		a.MTime.Equal(b.MTime) && a.Mode == b.Mode && a.ETag == b.ETag && a.VersionID == b.VersionID
}

// count keeps held up to date for path's current winner; a new file of
// another writer that would pass SYNC_PULL_MAX_BYTES is marked (-1) and not
// pulled.
func (p *puller) count(path string) {
	if p.cfg.PullMaxBytes <= 0 {
		return
	}
	e, _ := p.state.Get(path)
	old, had := p.counted[path]
	if had && old > 0 {
		p.held -= old
	}
	delete(p.counted, path)
	if e.Deleted {
		return
	}
	if e.Writer != p.me && (!had || old < 0) && p.held+e.Size > p.cfg.PullMaxBytes {
		p.counted[path] = -1
		if !p.limited {
			msg := fmt.Sprintf("SYNC_PULL_MAX_BYTES (%d) reached: new files of other writers are not pulled (first: %s, %d bytes); uploads go on", p.cfg.PullMaxBytes, path, e.Size)
			p.log.Warn(msg)
			p.rec.Event(context.Background(), events.Warning, "PullLimitReached", msg)
		}
		p.limited = true
		p.m.limited.Set(1)
		return
	}
	p.counted[path] = e.Size
	p.held += e.Size
}

// pullOne brings e into SYNC_DIR: a deletion or a verified download goes to
// the event loop, which decides against the disk and puts it in place.
// false: it failed and is retried at the next look.
func (p *puller) pullOne(ctx context.Context, e changelog.Entry) bool {
	if !e.Deleted && p.onDisk(e.File) {
		return true
	}
	req := pullRequest{e: e, reply: make(chan pullOutcome, 1)}
	if !e.Deleted {
		name, err := p.download(ctx, e.File)
		if err != nil {
			if ctx.Err() == nil {
				p.m.errors.Inc()
				p.log.Warn("pull failed; trying again at the next look", "path", e.Path, "err", err)
			}
			return false
		}
		req.tmp = name
		defer p.tmp.Remove(name) // gone already when placed
	}
	select {
	case p.requests <- req:
	case <-ctx.Done():
		return false
	}
	var out pullOutcome
	select {
	case out = <-req.reply:
	case <-ctx.Done():
		return false
	}
	if out == pulledIn && !e.Deleted {
		p.m.files.Inc()
		p.m.bytes.Add(float64(e.Size))
	}
	return out != pullFailed
}

// onDisk: the file is there as the log has it (restore put it there, or an
// earlier pull did); nothing to download.
func (p *puller) onDisk(f snapshot.File) bool {
	fi, err := p.root.Lstat(f.Path)
	return err == nil && fi.Mode().IsRegular() && statOf(fi).same(fileStat{size: f.Size, mtime: f.MTime, mode: fs.FileMode(f.Mode)})
}

// download fetches f's object into a temp file of the pull directory,
// decoded when it is stored encoded (SYNC_COMPRESS of its writer), checked
// against the log's size and sha256, with the log's mode and mtime.
// The object may have been replaced by a newer version since (a bucket
// without versioning): the check fails, and the newer version's batch brings
// the path back.
func (p *puller) download(ctx context.Context, f snapshot.File) (string, error) {
	rc, _, err := p.st.Get(ctx, snapshot.DataKey(f.Path), store.GetOptions{VersionID: f.VersionID})
	if err != nil {
		return "", err
	}
	defer rc.Close()
	tf, name, err := p.tmp.CreateTemp(pullTempPrefix)
	if err != nil {
		return "", err
	}
	ok := false
	defer func() {
		tf.Close()
		if !ok {
			p.tmp.Remove(name)
		}
	}()
	body, err := codec.DecodeSized(f.Encoding, rc, f.Size)
	if err != nil {
		return "", err
	}
	defer body.Close()
	h := sha256.New()
	buf := copyBufs.Get().(*[]byte)
	n, err := io.CopyBuffer(io.MultiWriter(tf, h), io.LimitReader(body, f.Size+1), *buf)
	copyBufs.Put(buf)
	if err != nil {
		return "", err
	}
	if sum := hex.EncodeToString(h.Sum(nil)); n != f.Size || sum != f.SHA256 {
		return "", fmt.Errorf("object %s is not the version the change log names (%d bytes sha256 %.12s, want %d bytes %.12s): replaced since, a newer batch will follow",
			snapshot.DataKey(f.Path), n, sum, f.Size, f.SHA256)
	}
	if err := safefs.SetMeta(tf, fs.FileMode(f.Mode), f.MTime); err != nil {
		return "", err
	}
	if err := tf.Sync(); err != nil {
		return "", err
	}
	ok = true
	return name, nil
}

// clearTemps removes what a killed run left in the pull directory.
func (p *puller) clearTemps() {
	d, err := p.tmp.OpenDir(".")
	if err != nil {
		return
	}
	names, _ := d.Readdirnames(-1)
	d.Close()
	for _, n := range names {
		p.tmp.Remove(n)
	}
}

// conflictName is where a local version that lost to a pulled one is kept,
// next to it, in Syncthing's form: name.sync-conflict-DATE-TIME-WRITER.ext.
func conflictName(base string, now time.Time, writer string) string {
	ext := path.Ext(base)
	if ext == base {
		ext = "" // a dot file: ".env" has no extension
	}
	base = strings.TrimSuffix(base, ext)
	h := sha256.Sum256([]byte(writer))
	return fmt.Sprintf("%s%s%s-%s%s", base, conflictMarker, now.UTC().Format("20060102-150405"), hex.EncodeToString(h[:4]), ext)
}

// conflictMarker is in every conflict file's name: they are never uploaded
// (or pulled).
const conflictMarker = ".sync-conflict-"

// placePulled is the event loop's half of a pull: judge the path on disk
// against what this writer knows of it, then place, replace or remove.
// Local content the log does not have yet (the app's pending write) is
// judged by the rule against the pulled version; if it loses it is kept as
// a conflict file beside it, never overwritten.
func (s *Syncer) placePulled(r pullRequest) pullOutcome {
	e, rel := r.e, r.e.Path
	fi, err := s.up.root.Lstat(rel)
	exists := err == nil
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		s.log.Warn("pull: cannot look at the path; not pulled", "path", rel, "err", err)
		return pullFailed
	}
	if exists && !fi.Mode().IsRegular() {
		s.log.Warn("pull: something other than a regular file is in the way; not pulled", "path", rel, "mode", fi.Mode().String())
		return pullKept
	}
	known, hasKnown := s.led.change(rel)
	clean := hasKnown && !known.Deleted && exists && statOf(fi).same(fileStat{size: known.Size, mtime: known.MTime, mode: fs.FileMode(known.Mode)})
	if e.Deleted {
		return s.removePulled(e, fi, exists, clean)
	}
	if exists && statOf(fi).same(fileStat{size: e.Size, mtime: e.MTime, mode: fs.FileMode(e.Mode)}) {
		s.led.pulled(e.File)
		return pullSame
	}
	local := changelog.Entry{Change: changelog.Change{File: snapshot.File{Path: rel}}, Writer: s.led.writer.ID()}
	switch {
	case exists:
		local.MTime = fi.ModTime()
	case hasKnown && !known.Deleted:
		local.MTime = known.MTime // removed by the app; its deletion is not in the log yet
	}
	if (exists || hasKnown) && !e.Beats(local) {
		return pullKept
	}
	if !exists {
		err = s.up.root.Place(s.pullTmp, r.tmp, rel)
	} else {
		keep := ""
		if !clean {
			keep = conflictName(fi.Name(), time.Now(), s.led.writer.ID())
		}
		err = s.up.root.Replace(s.pullTmp, r.tmp, rel, safefs.ExpectOf(fi), keep)
		if err == nil && keep != "" {
			s.m.pull.conflicts.Inc()
			msg := fmt.Sprintf("pull conflict on %s: %s's version (mtime %s) wins by the rule over this replica's local one (mtime %s), kept as %s",
				rel, e.Writer, e.MTime.Format(time.RFC3339Nano), local.MTime.Format(time.RFC3339Nano), keep)
			s.log.Warn(msg)
			s.rec.Event(context.Background(), events.Warning, "PullConflict", msg)
		}
	}
	switch {
	case errors.Is(err, fs.ErrExist) || errors.Is(err, safefs.ErrChanged):
		return pullAppWon
	case err != nil:
		s.log.Warn("pull: cannot put the file in place", "path", rel, "err", err)
		return pullFailed
	}
	s.led.pulled(e.File)
	s.log.Debug("pulled", "path", rel, "size", e.Size, "writer", e.Writer)
	return pulledIn
}

// removePulled applies another writer's winning deletion: only a file this
// writer knows as in the log, unchanged since (the app's newer write stays
// and is uploaded).
func (s *Syncer) removePulled(e changelog.Entry, fi fs.FileInfo, exists, clean bool) pullOutcome {
	if !exists {
		s.led.drop(e.Path)
		return pullSame
	}
	if !clean {
		return pullKept
	}
	if err := s.up.root.RemoveFile(e.Path, safefs.ExpectOf(fi)); err != nil {
		if errors.Is(err, safefs.ErrChanged) {
			return pullAppWon
		}
		s.log.Warn("pull: cannot remove a deleted file", "path", e.Path, "err", err)
		return pullFailed
	}
	s.led.drop(e.Path)
	s.q.forget(e.Path)
	s.m.pull.deletions.Inc()
	return pulledIn
}
