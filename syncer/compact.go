package syncer

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"iter"
	"log/slog"
	"strings"
	"time"

	"github.com/podkeeper/podkeeper/agents/changelog"
	"github.com/podkeeper/podkeeper/agents/events"
	"github.com/podkeeper/podkeeper/agents/pack"
	"github.com/podkeeper/podkeeper/agents/snapshot"
	"github.com/podkeeper/podkeeper/agents/store"
)

// CompactionKey is the short lease of the compaction job: one writer at a
// time folds the log into a checkpoint and applies retention. Uploads never
// wait for it.
const CompactionKey = "compaction.json"

// compactionTTL is how long a compaction lease outlives its holder: a
// compactor killed mid-job delays the next one by at most this.
const compactionTTL = 2 * time.Minute

// CompactionDoc is the content of compaction.json.
type CompactionDoc struct {
	Writer  string    `json:"writer"` // namespace/pod/uid
	Expires time.Time `json:"expires"`
}

// compactor runs every SYNC_SNAPSHOT_INTERVAL in the background: under the
// compaction lease it writes a checkpoint (a v1 snapshot of the fold), keeps
// the newest SYNC_SNAPSHOT_RETAIN, drops the batches the oldest kept one
// covers and, with SYNC_DELETE, the data objects of deleted files.
type compactor struct {
	st     store.Store
	log    *slog.Logger
	rec    events.Recorder
	m      *metrics
	cfg    *Config
	writer changelog.Writer
	// margin is how old a batch must be to be folded (changelog.Margin; tests
	// shorten it).
	margin time.Duration
	now    func() time.Time
}

func (c *compactor) run(ctx context.Context) {
	if c.cfg.SnapshotInterval <= 0 {
		return
	}
	t := time.NewTicker(c.cfg.SnapshotInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if err := c.once(ctx); err != nil && ctx.Err() == nil {
			c.log.Warn("compaction failed; the next interval retries", "err", err)
		}
	}
}

// once is one compaction, when a batch is old enough to be folded and this
// writer gets the lease.
func (c *compactor) once(ctx context.Context) error {
	due, err := changelog.CheckpointDue(ctx, c.st, c.now(), c.margin)
	if err != nil || !due {
		return err
	}
	etag, ok, err := c.acquire(ctx)
	if err != nil || !ok {
		return err
	}
	defer c.release(context.WithoutCancel(ctx), etag)
	now := c.now()
	sw := snapshot.Writer{Pod: c.writer.Pod, Namespace: c.writer.Namespace}
	id, err := changelog.Checkpoint(ctx, c.st, now, c.margin, sw)
	if err != nil {
		return fmt.Errorf("checkpoint: %w", err)
	}
	if id != "" {
		c.m.snapshots.Inc()
		c.m.lastSnapshot.Set(float64(now.Add(-c.margin).Unix()))
		c.log.Info("checkpoint written", "id", id)
		c.rec.Event(ctx, events.Normal, "SnapshotWritten", "checkpoint "+id+" of the change log")
		if err := c.pack(ctx, id); err != nil && ctx.Err() == nil {
			// Packs only speed restores up: retention goes on.
			c.log.Warn("pack run failed; the next checkpoint retries", "err", err)
		}
	}
	return c.retain(ctx, now)
}

// packRunTime bounds a pack run well inside the compaction lease.
const packRunTime = 75 * time.Second

// pack copies the checkpoint's small files that no pack holds into packs
// and collects stale packs (agents/pack).
func (c *compactor) pack(ctx context.Context, id string) error {
	if c.cfg.PackMaxFileSize <= 0 {
		return nil
	}
	// Checkpoints are always stored gzipped under their id (snapshot.WriteCompact,
	// PutEncoded): no listing needed to find the one just written.
	info := snapshot.Info{ID: id, Key: snapshot.Key(id, true)}
	ctx, cancel := context.WithTimeout(ctx, packRunTime)
	defer cancel()
	start := c.now()
	rep, err := pack.Update(ctx, c.st, func(fn func(snapshot.File) error) error {
		return snapshot.ScanStored(ctx, c.st, info, fn)
	}, pack.Options{MaxFileSize: c.cfg.PackMaxFileSize, Concurrency: c.cfg.Concurrency, Log: c.log, Now: c.now})
	c.m.packFiles.Add(float64(rep.Files))
	c.m.packsDeleted.Add(float64(rep.Deleted))
	if err != nil {
		return err
	}
	c.m.unpacked.Set(float64(rep.Unpacked))
	if rep.Packs > 0 || rep.Deleted > 0 {
		c.log.Info("packs updated", "checkpoint", id, "packs_written", rep.Packs, "files", rep.Files, "bytes", rep.Bytes,
			"packs_deleted", rep.Deleted, "already_packed", rep.Covered, "unpacked", rep.Unpacked, "took", c.now().Sub(start).Round(time.Millisecond).String())
	}
	return nil
}

// acquire takes the compaction lease: created if absent, taken over when
// expired or our own; ok is false while another writer holds it.
func (c *compactor) acquire(ctx context.Context) (etag string, ok bool, err error) {
	doc, _ := json.Marshal(CompactionDoc{Writer: c.writer.ID(), Expires: c.now().UTC().Add(compactionTTL)})
	put := func(opts store.PutOptions) (string, error) {
		opts.ContentType = "application/json"
		info, err := c.st.Put(ctx, CompactionKey, bytes.NewReader(doc), int64(len(doc)), opts)
		return info.ETag, err
	}
	etag, err = put(store.PutOptions{IfNoneMatch: true})
	if err == nil {
		return etag, true, nil
	}
	if !errors.Is(err, store.ErrPrecondition) {
		return "", false, err
	}
	rc, info, err := c.st.Get(ctx, CompactionKey, store.GetOptions{})
	if errors.Is(err, store.ErrNotExist) {
		return "", false, nil // released meanwhile: the next interval
	}
	if err != nil {
		return "", false, err
	}
	b, err := io.ReadAll(io.LimitReader(rc, 64<<10))
	rc.Close()
	if err != nil {
		return "", false, err
	}
	var cur CompactionDoc
	if json.Unmarshal(b, &cur) == nil && cur.Writer != c.writer.ID() && c.now().Before(cur.Expires) {
		return "", false, nil
	}
	etag, err = put(store.PutOptions{IfMatch: info.ETag})
	if errors.Is(err, store.ErrPrecondition) {
		return "", false, nil // another writer took it first
	}
	return etag, err == nil, err
}

// release deletes the lease if it is still the one we wrote.
func (c *compactor) release(ctx context.Context, etag string) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	info, err := c.st.Head(ctx, CompactionKey, store.HeadOptions{})
	if err != nil || info.ETag != etag {
		return
	}
	if err := c.st.Delete(ctx, CompactionKey); err != nil {
		c.log.Warn("cannot release the compaction lease; it expires on its own", "err", err)
	}
}

// retain keeps the newest SYNC_SNAPSHOT_RETAIN snapshots, deletes the
// batches the oldest of them already folds (a point in time before it is
// out of retention anyway) and, with SYNC_DELETE, the data objects of files
// that are not live in the fold, that no kept snapshot or batch lists and
// that are older than the margin (an upload racing the deletion is newer).
func (c *compactor) retain(ctx context.Context, now time.Time) error {
	all, err := snapshot.List(ctx, c.st)
	if err != nil {
		return err
	}
	if n := len(all) - c.cfg.SnapshotRetain; n > 0 {
		for _, old := range all[:n] {
			if err := c.st.Delete(ctx, old.Key); err != nil {
				return err
			}
		}
		all = all[n:]
	}
	if len(all) == 0 {
		return nil
	}
	oldest := all[0].Created
	batches, err := changelog.List(ctx, c.st, time.Time{})
	if err != nil {
		return err
	}
	for _, b := range batches {
		if b.Time.After(oldest) {
			break
		}
		if err := c.st.Delete(ctx, b.Key); err != nil {
			return err
		}
	}
	if !c.cfg.Delete {
		return nil
	}
	return c.deleteData(ctx, all, now)
}

// deleteData deletes the data objects of deleted files (SYNC_DELETE). It
// streams: first the fold, merge-joined with the listing of data/ (both in
// path order), picks the candidates (not live, older than the margin), then
// each kept snapshot and batch, read one entry at a time, clears those it
// still lists. Memory is the candidates, not the files.
func (c *compactor) deleteData(ctx context.Context, kept []snapshot.Info, now time.Time) error {
	candidates, err := c.dataCandidates(ctx, now)
	if errors.Is(err, changelog.ErrUnstreamable) {
		candidates, err = c.dataCandidatesInMemory(ctx, now)
	}
	if err != nil {
		return err
	}
	if len(candidates) == 0 {
		return nil
	}
	isCandidate := make(map[string]bool, len(candidates))
	for _, rel := range candidates {
		isCandidate[rel] = true
	}
	referenced := map[string]bool{}
	for _, info := range kept {
		err := snapshot.ScanStored(ctx, c.st, info, func(f snapshot.File) error {
			if isCandidate[f.Path] {
				referenced[f.Path] = true
			}
			return nil
		})
		if err != nil {
			return fmt.Errorf("retention: cannot read snapshot %s, deleting nothing: %w", info.ID, err)
		}
	}
	infos, err := changelog.List(ctx, c.st, kept[0].Created)
	if err != nil {
		return err
	}
	for _, info := range infos {
		b, err := changelog.Load(ctx, c.st, info)
		if err != nil {
			return fmt.Errorf("retention: cannot read batch, deleting nothing: %w", err)
		}
		for _, ch := range b.Changes {
			if !ch.Deleted && isCandidate[ch.Path] {
				referenced[ch.Path] = true
			}
		}
	}
	for _, rel := range candidates {
		if referenced[rel] {
			continue
		}
		key := snapshot.DataKey(rel)
		if err := c.st.Delete(ctx, key); err != nil {
			return err
		}
		c.m.deleted.Inc()
		c.log.Info("deleted data object of a deleted file", "key", key)
	}
	return nil
}

// dataCandidates lists the data objects that are not live in the fold
// (deleted, or their tombstone already folded away by a checkpoint, or an
// upload never logged: its writer was killed before the batch; a live writer
// logs it within the margin) and older than the margin, in one pass over the
// listing of data/ and the streamed fold, both in path order.
// changelog.ErrUnstreamable: see dataCandidatesInMemory.
func (c *compactor) dataCandidates(ctx context.Context, now time.Time) ([]string, error) {
	var out []string
	next, stop := iter.Pull2(c.st.List(ctx, snapshot.DataDir))
	defer stop()
	o, lerr, more := next()
	consider := func(deadInFold bool) {
		if deadInFold && !o.ModTime.After(now.Add(-c.margin)) {
			out = append(out, strings.TrimPrefix(o.Key, snapshot.DataDir))
		}
	}
	err := changelog.ScanFold(ctx, c.st, time.Time{}, func(p string, e changelog.Entry) error {
		for ; more; o, lerr, more = next() {
			if lerr != nil {
				return lerr
			}
			rel := strings.TrimPrefix(o.Key, snapshot.DataDir)
			if rel > p {
				return nil
			}
			consider(rel < p || e.Deleted)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	for ; more; o, lerr, more = next() {
		if lerr != nil {
			return nil, lerr
		}
		consider(true)
	}
	return out, nil
}

// dataCandidatesInMemory is dataCandidates with the fold held in memory, for
// a checkpoint the streamed fold cannot read.
func (c *compactor) dataCandidatesInMemory(ctx context.Context, now time.Time) ([]string, error) {
	f, err := changelog.FoldState(ctx, c.st, time.Time{})
	if err != nil {
		return nil, err
	}
	var out []string
	for o, err := range c.st.List(ctx, snapshot.DataDir) {
		if err != nil {
			return nil, err
		}
		rel := strings.TrimPrefix(o.Key, snapshot.DataDir)
		if e, ok := f.State.Get(rel); (ok && !e.Deleted) || o.ModTime.After(now.Add(-c.margin)) {
			continue
		}
		out = append(out, rel)
	}
	return out, nil
}
