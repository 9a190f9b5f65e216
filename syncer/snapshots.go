package syncer

import (
	"context"
	"fmt"
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

// startSnapshot builds a manifest of what is uploaded and present now and
// writes it in the background. The mass-delete guard runs here: a manifest
// that drops more than half of the previous one is held back. It reports
// whether a write was started.
func (s *Syncer) startSnapshot(ctx context.Context, done chan<- snapResult, final bool) bool {
	if !s.dirty && !s.guardBlocked {
		return false
	}
	now := time.Now().UTC()
	m := &snapshot.Manifest{Format: snapshot.Format, ID: snapshot.NewID(now, s.suffix), Created: now,
		Writer: snapshot.Writer{Pod: s.cfg.Base.PodName, Namespace: s.cfg.Base.PodNamespace, Host: s.host}}
	m.Files = make([]snapshot.File, 0, len(s.files))
	for _, k := range slices.Sorted(maps.Keys(s.files)) {
		m.Files = append(m.Files, s.files[k])
	}
	if s.prev != nil && !s.cfg.AllowMassDelete {
		dropped := 0
		for _, f := range s.prev.Files {
			if _, ok := s.files[f.Path]; !ok {
				dropped++
			}
		}
		if dropped*2 > len(s.prev.Files) {
			if !s.guardBlocked {
				msg := fmt.Sprintf("snapshot held back: it would drop %d of the %d files of snapshot %s (an unmounted or wiped volume looks like this); "+
					"set SYNC_ALLOW_MASS_DELETE=true if it is intended", dropped, len(s.prev.Files), s.prev.ID)
				s.log.Error(msg)
				s.rec.Event(ctx, events.Warning, "MassDeleteBlocked", msg)
			}
			s.guardBlocked = true
			s.m.massDelete.Set(1)
			s.dirty = false // re-evaluated when the state changes again
			return false
		}
	}
	if s.guardBlocked {
		s.log.Info("mass-delete guard cleared", "files", len(m.Files))
	}
	s.guardBlocked = false
	s.m.massDelete.Set(0)
	s.dirty = false
	present := make(map[string]bool, len(s.files)+len(s.pending))
	for k := range s.files {
		present[k] = true
	}
	for k := range s.pending {
		present[k] = true
	}
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
		done <- snapResult{m: m, err: err}
	}()
	return true
}

func (s *Syncer) finishSnapshot(r snapResult) {
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
func (s *Syncer) retain(ctx context.Context, latest *snapshot.Manifest, present map[string]bool) {
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
	referenced := map[string]bool{}
	for _, info := range all {
		m := latest
		if info.ID != latest.ID {
			if m, err = snapshot.Load(ctx, s.st, info); err != nil {
				s.log.Warn("retention: cannot read snapshot, deleting nothing", "id", info.ID, "err", err)
				return
			}
		}
		for _, f := range m.Files {
			referenced[f.Path] = true
		}
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
