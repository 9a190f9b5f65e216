package syncer

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/podkeeper/podkeeper/agents/backoff"
	"github.com/podkeeper/podkeeper/agents/changelog"
	"github.com/podkeeper/podkeeper/agents/events"
	"github.com/podkeeper/podkeeper/agents/snapshot"
	"github.com/podkeeper/podkeeper/agents/store"
)

// maxBatchFiles flushes a batch before SYNC_LOG_INTERVAL when this many
// changes wait: a backfill then costs about one log PUT per maxBatchFiles
// uploads.
const maxBatchFiles = 1000

// maxWent bounds the memory of removed files' objects (ledger.went).
const maxWent = 100_000

// appendTimeout bounds one attempt to append a batch: the attempt after it
// gets a new stamp, and a checkpoint folds only batches older than
// changelog.Margin, so a slow PUT must give up well before that.
const appendTimeout = 20 * time.Second

type appendResult struct {
	b   *changelog.Batch
	key string
	err error
}

// ledger is this writer's part of the change log: what it has uploaded and
// still has on its disk (files), the changes waiting for the next batch
// (staged) and the batch being appended (sending). An upload is acknowledged
// — counted, logged, and trusted by the queue as done — only once the batch
// that names it is stored: from then on a restore includes it. The event
// loop goroutine owns it; the append runs in the background and reports on
// done.
type ledger struct {
	st     store.Store
	log    *slog.Logger
	rec    events.Recorder
	m      *metrics
	cfg    *Config
	writer changelog.Writer

	// files are the files this writer has on its disk and knows to be in the
	// log (before the first walk: every file of the fold).
	files *fileSet
	// staged are the changes for the next batch, by path (the last wins).
	staged      map[string]changelog.Change
	stagedSince time.Time
	// sending is the batch being appended (nil: none); dropped are its paths
	// forgotten meanwhile, which its acknowledgement must not bring back.
	sending map[string]changelog.Change
	dropped map[string]bool
	// live is set after the first walk: from then on a file that goes away
	// was on this disk, and with SYNC_DELETE becomes a tombstone.
	live bool
	// guardBlocked: the staged tombstones are held back by the mass-delete
	// guard; guardStale: something changed since it judged them.
	guardBlocked bool
	guardStale   bool
	done         chan appendResult
	// lastCheckpoint is the checkpoint the baseline started from.
	lastCheckpoint string
	// went is what this writer last knew of the object of a file it saw go:
	// recreating the file is then an update of that object, not a conflict.
	went map[string]seen
}

func newLedger(cfg *Config, st store.Store, log *slog.Logger, rec events.Recorder, m *metrics, w changelog.Writer) *ledger {
	return &ledger{st: st, log: log, rec: rec, m: m, cfg: cfg, writer: w,
		files: newFileSet(nil), staged: map[string]changelog.Change{}, dropped: map[string]bool{},
		went: map[string]seen{}, done: make(chan appendResult, 1)}
}

// loadBaseline makes the fold of the log (every writer's files) the record of
// what is uploaded: a file restored from it is not uploaded again.
func (l *ledger) loadBaseline(ctx context.Context) error {
	f, err := changelog.FoldState(ctx, l.st, time.Time{})
	if err != nil {
		return err
	}
	c, err := f.State.Compact(f.Newest, f.Writer)
	if err != nil {
		return err
	}
	l.files = newFileSet(c.Files)
	l.lastCheckpoint = f.Checkpoint
	if f.Checkpoint != "" {
		l.m.lastSnapshot.Set(float64(f.From.Unix()))
	}
	if f.Checkpoint == "" && f.Batches == 0 {
		l.log.Info("empty prefix: every file is new")
		return nil
	}
	l.log.Info("baseline", "checkpoint", f.Checkpoint, "batches", f.Batches, "files", l.files.len())
	return nil
}

// change is the staged, sending or acknowledged state of rel.
func (l *ledger) change(rel string) (changelog.Change, bool) {
	if c, ok := l.staged[rel]; ok {
		return c, true
	}
	if c, ok := l.sending[rel]; ok && !l.dropped[rel] {
		return c, true
	}
	if f, ok := l.files.get(rel); ok {
		return changelog.Change{File: f}, true
	}
	return changelog.Change{}, false
}

// uploadedAs reports whether rel is uploaded (acknowledged or about to be)
// with exactly st.
func (l *ledger) uploadedAs(rel string, st fileStat) bool {
	c, ok := l.change(rel)
	return ok && !c.Deleted && st.same(fileStat{size: c.Size, mtime: c.MTime, mode: fs.FileMode(c.Mode)})
}

// seenAt is the object this writer knows at rel, for a conditional write.
func (l *ledger) seenAt(rel string) seen {
	c, ok := l.change(rel)
	if !ok || c.Deleted {
		return l.went[rel]
	}
	return seen{etag: c.ETag, sha: c.SHA256}
}

// adopt marks a file whose write lost a conflict as handled: not uploaded
// again while unchanged, and its next change is judged as a conflict again
// (no ETag or hash of a version this writer had).
func (l *ledger) adopt(f snapshot.File) {
	f.ETag, f.SHA256, f.VersionID = "", "", ""
	l.files.set(f)
}

// pulled records a file SYNC_PULL put on this disk: it is in the log (by
// another writer), so the watcher's look at it finds it uploaded. A change of
// this writer's for the path still waiting for its batch lost to it by the
// rule and is not sent.
func (l *ledger) pulled(f snapshot.File) {
	l.files.set(f)
	delete(l.staged, f.Path)
	delete(l.went, f.Path)
	if _, ok := l.sending[f.Path]; ok {
		l.dropped[f.Path] = true
	}
}

// drop forgets a file SYNC_PULL removed because another writer's deletion
// won: no tombstone of this writer's follows (it is in the log already).
func (l *ledger) drop(rel string) {
	l.files.delete(rel)
	delete(l.staged, rel)
	if _, ok := l.sending[rel]; ok {
		l.dropped[rel] = true
	}
}

// has reports whether rel is known as a file of this writer.
func (l *ledger) has(rel string) bool {
	c, ok := l.change(rel)
	return ok && !c.Deleted
}

func (l *ledger) stage(c changelog.Change, now time.Time) {
	if len(l.staged) == 0 {
		l.stagedSince = now
	}
	l.staged[c.Path] = c
	l.guardStale = true
	if !c.Deleted {
		delete(l.went, c.Path)
	}
}

// record stages an upload for the next batch.
func (l *ledger) record(f snapshot.File) { l.stage(changelog.Change{File: f}, time.Now()) }

// forgetTree forgets rel, and with tree everything under it too.
func (l *ledger) forgetTree(rel string, tree bool) {
	if !tree {
		l.forget(rel)
		return
	}
	under := rel + "/"
	var keys []string
	for k := range l.files.paths(under) {
		keys = append(keys, k)
	}
	for _, m := range []map[string]changelog.Change{l.staged, l.sending} {
		for k := range m {
			if strings.HasPrefix(k, under) {
				keys = append(keys, k)
			}
		}
	}
	for _, k := range keys {
		l.forget(k)
	}
}

// forget is a file gone from this disk. Once live, with SYNC_DELETE, a file
// this writer had becomes a tombstone; otherwise the log keeps what was
// uploaded (union semantics: a writer never removes what others have).
func (l *ledger) forget(k string) {
	if c, ok := l.change(k); ok && !c.Deleted && c.ETag != "" {
		if len(l.went) >= maxWent {
			clear(l.went) // bounded memory; a recreated file then reports a conflict whose bytes are kept
		}
		l.went[k] = seen{etag: c.ETag, sha: c.SHA256}
	}
	_, had := l.files.get(k)
	if c, ok := l.staged[k]; ok && !c.Deleted {
		had = true
	}
	if c, ok := l.sending[k]; ok && !c.Deleted {
		had = true
		l.dropped[k] = true
	}
	l.files.delete(k)
	if !had {
		return
	}
	if l.live && l.cfg.Delete {
		l.stage(changelog.Change{File: snapshot.File{Path: k, MTime: time.Now().UTC()}, Deleted: true}, time.Now())
	}
}

// keepOnly forgets the files a full walk did not see.
// It goes through the baseline without listing it first: a walk of an
// empty directory must not copy a million paths.
func (l *ledger) keepOnly(seen *walkSet) {
	for k := range l.files.unseen(seen) {
		l.forget(k)
	}
	for k, c := range l.staged {
		if !seen.has(k) && !c.Deleted {
			l.forget(k)
		}
	}
}

// missing lists the files of this writer a walk did not see.
func (l *ledger) missing(seen *walkSet) []string {
	var gone []string
	for k := range l.files.unseen(seen) {
		gone = append(gone, k)
	}
	for k, c := range l.staged {
		if !seen.has(k) && !c.Deleted {
			gone = append(gone, k)
		}
	}
	return gone
}

// tombstones counts the staged deletions.
func (l *ledger) tombstones() int {
	n := 0
	for _, c := range l.staged {
		if c.Deleted {
			n++
		}
	}
	return n
}

// due reports whether a batch should be appended now: changes waited
// SYNC_LOG_INTERVAL, or there are many, or the syncer is draining.
func (l *ledger) due(now time.Time, draining bool) bool {
	if l.sending != nil || len(l.staged) == 0 {
		return false
	}
	if l.guardBlocked && !l.guardStale && len(l.staged) == l.tombstones() {
		return false // only held-back deletions, and nothing changed
	}
	return draining || len(l.staged) >= maxBatchFiles || now.Sub(l.stagedSince) >= l.cfg.LogInterval
}

// nextDue is when due may turn true without another event (zero: never).
func (l *ledger) nextDue() time.Time {
	if l.sending != nil || len(l.staged) == 0 {
		return time.Time{}
	}
	return l.stagedSince.Add(l.cfg.LogInterval)
}

// idle reports whether nothing waits for the log but deletions the guard
// holds back.
func (l *ledger) idle() bool {
	return l.sending == nil && (len(l.staged) == 0 || (l.guardBlocked && len(l.staged) == l.tombstones()))
}

// guard holds the staged deletions back when they would remove more than
// half of the files this writer had (what an unmounted or wiped volume looks
// like): each writer is judged against its own files, never the union.
func (l *ledger) guard(ctx context.Context) (blocked bool) {
	l.guardStale = false
	dead := l.tombstones()
	if dead == 0 || l.cfg.AllowMassDelete {
		return l.clearGuard(dead)
	}
	had := l.files.len() + len(l.staged) + len(l.sending)
	if dead*2 <= had {
		return l.clearGuard(dead)
	}
	if !l.guardBlocked {
		msg := fmt.Sprintf("deletions held back: %d of the %d files this writer had are gone (an unmounted or wiped volume looks like this); "+
			"set SYNC_ALLOW_MASS_DELETE=true if it is intended", dead, had)
		l.log.Error(msg)
		l.rec.Event(ctx, events.Warning, "MassDeleteBlocked", msg)
	}
	l.guardBlocked = true
	l.m.massDelete.Set(1)
	return true
}

func (l *ledger) clearGuard(dead int) bool {
	if l.guardBlocked {
		l.log.Info("mass-delete guard cleared", "deletions", dead)
	}
	l.guardBlocked = false
	l.m.massDelete.Set(0)
	return false
}

// flush appends the staged changes as one batch in the background (the
// deletions stay staged while the guard holds them back).
func (l *ledger) flush(ctx context.Context) {
	blocked := l.guard(ctx)
	send := map[string]changelog.Change{}
	for k, c := range l.staged {
		if c.Deleted && blocked {
			continue
		}
		send[k] = c
		delete(l.staged, k)
	}
	if len(send) == 0 {
		return
	}
	if len(l.staged) > 0 {
		l.stagedSince = time.Now()
	}
	l.sending = send
	b := &changelog.Batch{Writer: l.writer, Changes: make([]changelog.Change, 0, len(send))}
	for _, k := range slices.Sorted(maps.Keys(send)) {
		b.Changes = append(b.Changes, send[k])
	}
	go func() {
		var key string
		err := backoff.Retry(ctx, backoff.Default, store.IsRetryable, func(attempt int, err error, wait time.Duration) {
			l.log.Warn("change log append failed, retrying", "changes", len(b.Changes), "err", err, "attempt", attempt+1, "wait", wait)
			if attempt >= 2 {
				l.rec.Event(ctx, events.Warning, "UploadsFailing", "appending to the change log is failing and being retried: "+err.Error())
			}
		}, func(ctx context.Context) error {
			// Each attempt is a new batch stamped now: a checkpoint trusts
			// that a batch lands within changelog.Margin of its stamp. An
			// earlier attempt that did land is a harmless duplicate.
			actx, cancel := context.WithTimeout(ctx, appendTimeout)
			defer cancel()
			b.Time = time.Now().UTC()
			var err error
			key, err = changelog.Append(actx, l.st, b)
			if err != nil && actx.Err() != nil && ctx.Err() == nil {
				return &store.Error{Op: "append", Key: key, Err: err, Retryable: true}
			}
			return err
		})
		l.done <- appendResult{b: b, key: key, err: err}
	}()
}

// ack applies an append's result: on success every upload in it is
// acknowledged (counted and logged) and every deletion done; on failure the
// changes go back to staged, unless newer ones replaced them.
func (l *ledger) ack(r appendResult) {
	sent, dropped := l.sending, l.dropped
	l.sending, l.dropped = nil, map[string]bool{}
	if r.err != nil {
		l.log.Error("change log append failed; the changes stay pending", "changes", len(sent), "err", r.err)
		for k, c := range sent {
			// A newer change (a tombstone staged when the file went away
			// meanwhile, or a newer upload) replaces it.
			if _, newer := l.staged[k]; !newer {
				l.stage(c, time.Now())
			}
		}
		return
	}
	for _, c := range r.b.Changes {
		if c.Deleted {
			l.m.deletions.Inc()
			l.log.Debug("deletion logged", "path", c.Path)
			continue
		}
		l.m.uploads.WithLabelValues("ok").Inc()
		l.m.bytes.WithLabelValues("ok").Add(float64(c.Size))
		if _, newer := l.staged[c.Path]; !newer && !dropped[c.Path] {
			l.files.set(c.File)
		}
		l.log.Debug("uploaded", "path", c.Path, "size", c.Size, "batch", r.key)
	}
	l.m.batches.Inc()
}

// pendingPaths are the paths not yet in the log, for a drain's leftover.
func (l *ledger) pendingPaths() []string {
	var out []string
	for _, m := range []map[string]changelog.Change{l.staged, l.sending} {
		for k := range m {
			out = append(out, k)
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

var errGuardHeld = errors.New("deletions held back by the mass-delete guard (more than half of this writer's files are gone; set SYNC_ALLOW_MASS_DELETE=true if that is intended)")
