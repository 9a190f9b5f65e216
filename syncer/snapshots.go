package syncer

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"iter"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/podkeeper/podkeeper/agents/backoff"
	"github.com/podkeeper/podkeeper/agents/events"
	"github.com/podkeeper/podkeeper/agents/snapshot"
	"github.com/podkeeper/podkeeper/agents/store"
)

type snapResult struct {
	m   *snapshot.Manifest
	err error
}

// snapshotter owns what a snapshot lists (the files uploaded and present),
// whether that changed since the last one, the mass-delete guard and the
// retention that follows a write. The event loop goroutine owns its state; a
// write runs in the background and reports on done.
type snapshotter struct {
	st     store.Store
	log    *slog.Logger
	rec    events.Recorder
	m      *metrics
	writer snapshot.Writer
	suffix string // of snapshot IDs: this writer's, so two never collide
	cfg    *Config

	files map[string]snapshot.File // uploaded and present: what a snapshot lists
	dirty bool
	// prev is the last snapshot written (or the baseline): the mass-delete
	// guard compares against it.
	prev         *snapshot.Manifest
	guardBlocked bool
	running      bool
	done         chan snapResult
}

func newSnapshotter(cfg *Config, st store.Store, log *slog.Logger, rec events.Recorder, m *metrics, id identity) *snapshotter {
	return &snapshotter{st: st, log: log, rec: rec, m: m, cfg: cfg, suffix: id.suffix(),
		writer: snapshot.Writer{Pod: id.pod, Namespace: id.namespace, Host: id.host},
		files:  map[string]snapshot.File{}, done: make(chan snapResult, 1)}
}

// uploadedAs reports whether rel is recorded as uploaded with exactly st.
func (s *snapshotter) uploadedAs(rel string, st fileStat) bool {
	f, ok := s.files[rel]
	return ok && st.same(fileStat{size: f.Size, mtime: f.MTime, mode: fs.FileMode(f.Mode)})
}

func (s *snapshotter) has(rel string) bool {
	_, ok := s.files[rel]
	return ok
}

func (s *snapshotter) record(f snapshot.File) {
	s.files[f.Path] = f
	s.dirty = true
}

// forgetTree forgets rel, and with tree everything under it too.
func (s *snapshotter) forgetTree(rel string, tree bool) {
	if !tree {
		s.forget(rel)
		return
	}
	under := rel + "/"
	for k := range s.files {
		if strings.HasPrefix(k, under) {
			s.forget(k)
		}
	}
}

func (s *snapshotter) forget(k string) {
	if _, ok := s.files[k]; ok {
		delete(s.files, k)
		s.dirty = true
	}
}

// keepOnly forgets the files a full walk did not see.
func (s *snapshotter) keepOnly(seen map[string]bool) {
	for k := range s.files {
		if !seen[k] {
			s.forget(k)
		}
	}
}

// owed reports whether a snapshot is due: something changed, or one is held
// back by the guard.
func (s *snapshotter) owed() bool { return s.dirty || s.guardBlocked }

// loadBaseline makes the latest snapshot the record of what is uploaded.
func (s *snapshotter) loadBaseline(ctx context.Context) error {
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

// start builds a manifest of what is uploaded and present now and writes it
// in the background, unless a write is running, nothing changed or the
// mass-delete guard holds it back. pending are the files not uploaded yet:
// retention keeps their objects. It reports whether a write was started.
func (s *snapshotter) start(ctx context.Context, pending iter.Seq[string]) bool {
	if s.running || !s.owed() {
		return false
	}
	now := time.Now().UTC()
	m := &snapshot.Manifest{Format: snapshot.Format, ID: snapshot.NewID(now, s.suffix), Created: now, Writer: s.writer}
	m.Files = make([]snapshot.File, 0, len(s.files))
	for _, k := range slices.Sorted(maps.Keys(s.files)) {
		m.Files = append(m.Files, s.files[k])
	}
	if s.guard(ctx) {
		return false
	}
	if s.guardBlocked {
		s.log.Info("mass-delete guard cleared", "files", len(m.Files))
	}
	s.guardBlocked = false
	s.m.massDelete.Set(0)
	s.dirty = false
	present := make(map[string]bool, len(s.files))
	for k := range s.files {
		present[k] = true
	}
	for k := range pending {
		present[k] = true
	}
	s.running = true
	go func() {
		err := backoff.Retry(ctx, backoff.Default, store.IsRetryable, func(attempt int, err error, wait time.Duration) {
			s.log.Warn("snapshot write failed, retrying", "id", m.ID, "err", err, "attempt", attempt+1)
		}, func(ctx context.Context) error {
			_, err := snapshot.Write(ctx, s.st, m)
			return err
		})
		if err == nil {
			s.retain(ctx, m, present)
		}
		s.done <- snapResult{m: m, err: err}
	}()
	return true
}

// guard holds a snapshot back when it would drop more than half of the files
// of the previous one: an unmounted or wiped volume looks like that.
func (s *snapshotter) guard(ctx context.Context) (blocked bool) {
	if s.prev == nil || s.cfg.AllowMassDelete {
		return false
	}
	dropped := 0
	for _, f := range s.prev.Files {
		if _, ok := s.files[f.Path]; !ok {
			dropped++
		}
	}
	if dropped*2 <= len(s.prev.Files) {
		return false
	}
	if !s.guardBlocked {
		msg := fmt.Sprintf("snapshot held back: it would drop %d of the %d files of snapshot %s (an unmounted or wiped volume looks like this); "+
			"set SYNC_ALLOW_MASS_DELETE=true if it is intended", dropped, len(s.prev.Files), s.prev.ID)
		s.log.Error(msg)
		s.rec.Event(ctx, events.Warning, "MassDeleteBlocked", msg)
	}
	s.guardBlocked = true
	s.m.massDelete.Set(1)
	s.dirty = false // re-evaluated when the state changes again
	return true
}

func (s *snapshotter) finish(r snapResult) {
	s.running = false
	if r.err != nil {
		s.log.Error("snapshot not written", "id", r.m.ID, "err", r.err)
		s.dirty = true
		return
	}
	s.prev = r.m
	s.m.lastSnapshot.Set(float64(r.m.Created.Unix()))
	s.m.snapshots.Inc()
	s.log.Info("snapshot written", "id", r.m.ID, "files", len(r.m.Files))
	s.rec.Event(context.Background(), events.Normal, "SnapshotWritten", fmt.Sprintf("snapshot %s with %d file(s)", r.m.ID, len(r.m.Files)))
}

// retain deletes snapshots beyond SYNC_SNAPSHOT_RETAIN and, with SYNC_DELETE,
// data objects that no retained snapshot references and that are gone
// locally. Failures are logged: the next snapshot retries.
func (s *snapshotter) retain(ctx context.Context, latest *snapshot.Manifest, present map[string]bool) {
	all, err := snapshot.List(ctx, s.st)
	if err != nil {
		s.log.Warn("retention: cannot list snapshots", "err", err)
		return
	}
	if n := len(all) - s.cfg.SnapshotRetain; n > 0 {
		for _, old := range all[:n] {
			if err := s.st.Delete(ctx, old.Key); err != nil {
				s.log.Warn("retention: cannot delete snapshot", "key", old.Key, "err", err)
				return
			}
		}
		all = all[n:]
	}
	if !s.cfg.Delete {
		return
	}
	referenced, ok := s.referenced(ctx, latest, all)
	if !ok {
		return
	}
	for o, err := range s.st.List(ctx, snapshot.DataDir) {
		if err != nil {
			s.log.Warn("retention: cannot list data", "err", err)
			return
		}
		rel := strings.TrimPrefix(o.Key, snapshot.DataDir)
		// Objects about as new as the manifest may be uploads it does not know
		// yet (LastModified has one-second granularity): a later pass decides.
		if referenced[rel] || present[rel] || o.ModTime.After(latest.Created.Add(-2*time.Second)) {
			continue
		}
		if err := s.st.Delete(ctx, o.Key); err != nil {
			s.log.Warn("retention: cannot delete data object", "key", o.Key, "err", err)
			return
		}
		s.m.deleted.Inc()
		s.log.Info("deleted data object no snapshot references", "key", o.Key)
	}
}

// referenced collects the paths the retained snapshots list; ok is false when
// one cannot be read (then nothing may be deleted).
func (s *snapshotter) referenced(ctx context.Context, latest *snapshot.Manifest, all []snapshot.Info) (map[string]bool, bool) {
	referenced := map[string]bool{}
	for _, info := range all {
		m := latest
		if info.ID != latest.ID {
			var err error
			if m, err = snapshot.Load(ctx, s.st, info); err != nil {
				s.log.Warn("retention: cannot read snapshot, deleting nothing", "id", info.ID, "err", err)
				return nil, false
			}
		}
		for _, f := range m.Files {
			referenced[f.Path] = true
		}
	}
	return referenced, true
}
