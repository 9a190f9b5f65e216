package syncer

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/podkeeper/podkeeper/agents/backoff"
	"github.com/podkeeper/podkeeper/agents/events"
	"github.com/podkeeper/podkeeper/agents/store"
)

// LeaseKey is the single-writer lease at the prefix root.
const LeaseKey = "lease.json"

// LeaseDoc is the content of lease.json.
type LeaseDoc struct {
	Pod       string    `json:"pod"`
	Namespace string    `json:"namespace,omitempty"`
	Host      string    `json:"host"`
	Acquired  time.Time `json:"acquired"`
	Expires   time.Time `json:"expires"`
}

func (d LeaseDoc) holder() string {
	name := d.Pod
	if name == "" {
		name = "(no POD_NAME)"
	}
	if d.Namespace != "" {
		name = d.Namespace + "/" + name
	}
	return fmt.Sprintf("pod %s on host %s", name, d.Host)
}

// LeaseConflictError is returned when another live syncer holds the prefix.
type LeaseConflictError struct {
	Holder LeaseDoc
	Store  string
}

func (e *LeaseConflictError) Error() string {
	return fmt.Sprintf("%s/%s is held by %s until %s: only one syncer may write a prefix (a restarted pod with the same POD_NAME takes its lease over)",
		e.Store, LeaseKey, e.Holder.holder(), e.Holder.Expires.Format(time.RFC3339))
}

type lease struct {
	s    *Syncer
	mu   sync.Mutex
	etag string
	doc  LeaseDoc
}

func newLease(s *Syncer) *lease { return &lease{s: s} }

func (l *lease) newDoc(acquired time.Time) LeaseDoc {
	now := time.Now().UTC()
	return LeaseDoc{Pod: l.s.cfg.Base.PodName, Namespace: l.s.cfg.Base.PodNamespace, Host: l.s.host, Acquired: acquired, Expires: now.Add(l.s.opts.LeaseTTL)}
}

func (l *lease) put(ctx context.Context, doc LeaseDoc, opts store.PutOptions) error {
	b, _ := json.Marshal(doc)
	opts.ContentType = "application/json"
	info, err := l.s.st.Put(ctx, LeaseKey, bytes.NewReader(b), int64(len(b)), opts)
	if err != nil {
		return err
	}
	l.mu.Lock()
	l.etag, l.doc = info.ETag, doc
	l.mu.Unlock()
	return nil
}

// acquire creates the lease, or takes over one that expired or that a pod of
// the same name holds.
func (l *lease) acquire(ctx context.Context) error {
	for range 5 {
		now := time.Now().UTC()
		err := l.put(ctx, l.newDoc(now), store.PutOptions{IfNoneMatch: true})
		if err == nil || !errors.Is(err, store.ErrPrecondition) {
			return err
		}
		rc, info, err := l.s.st.Get(ctx, LeaseKey, store.GetOptions{})
		if errors.Is(err, store.ErrNotExist) {
			continue // released meanwhile
		}
		if err != nil {
			return err
		}
		b, err := io.ReadAll(io.LimitReader(rc, 64<<10))
		rc.Close()
		if err != nil {
			return &store.Error{Op: "get", Key: LeaseKey, Err: err, Retryable: true}
		}
		var cur LeaseDoc
		if err := json.Unmarshal(b, &cur); err != nil {
			l.s.log.Warn("lease object unreadable, taking it over", "err", err)
		} else if !(cur.Pod != "" && cur.Pod == l.s.cfg.Base.PodName) && now.Before(cur.Expires) {
			return &LeaseConflictError{Holder: cur, Store: l.s.st.String()}
		} else {
			l.s.log.Info("taking over lease", "holder", cur.holder(), "expired", !now.Before(cur.Expires))
		}
		err = l.put(ctx, l.newDoc(now), store.PutOptions{IfMatch: info.ETag})
		if err == nil || !errors.Is(err, store.ErrPrecondition) {
			return err
		}
	}
	return &store.Error{Op: "lease", Key: LeaseKey, Err: errors.New("lease changed under us repeatedly"), Retryable: true}
}

// keep renews the lease every third of its TTL until ctx ends. Losing it to
// another writer is fatal and reported on lost.
func (l *lease) keep(ctx context.Context, lost chan<- error) {
	t := time.NewTicker(l.s.opts.LeaseTTL / 3)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		l.mu.Lock()
		etag, acquired := l.etag, l.doc.Acquired
		l.mu.Unlock()
		err := backoff.Retry(ctx, backoff.Policy{Initial: 200 * time.Millisecond, Max: l.s.opts.LeaseTTL / 6}, store.IsRetryable, nil, func(ctx context.Context) error {
			return l.put(ctx, l.newDoc(acquired), store.PutOptions{IfMatch: etag})
		})
		switch {
		case err == nil:
			l.s.m.leaseRenewals.Inc()
		case ctx.Err() != nil:
			return
		case errors.Is(err, store.ErrPrecondition) && l.stillOurs(ctx, acquired):
			l.s.m.leaseRenewals.Inc()
		case errors.Is(err, store.ErrPrecondition):
			msg := "lease lost: another writer replaced " + LeaseKey + "; stopping so two syncers never write one prefix"
			l.s.rec.Event(ctx, events.Warning, "LeaseConflict", msg)
			lost <- errors.New(msg)
			return
		default:
			l.s.log.Warn("lease renewal failed", "err", err)
		}
	}
}

// stillOurs handles a renewal whose response was lost and whose retry then
// failed its If-Match: if the object is the one we wrote, adopt its ETag.
func (l *lease) stillOurs(ctx context.Context, acquired time.Time) bool {
	rc, info, err := l.s.st.Get(ctx, LeaseKey, store.GetOptions{})
	if err != nil {
		return false
	}
	defer rc.Close()
	var cur LeaseDoc
	if json.NewDecoder(io.LimitReader(rc, 64<<10)).Decode(&cur) != nil {
		return false
	}
	if cur.Pod != l.s.cfg.Base.PodName || cur.Host != l.s.host || !cur.Acquired.Equal(acquired) {
		return false
	}
	l.mu.Lock()
	l.etag, l.doc = info.ETag, cur
	l.mu.Unlock()
	return true
}

// release deletes the lease if it is still ours.
func (l *lease) release(ctx context.Context) {
	l.mu.Lock()
	etag := l.etag
	l.mu.Unlock()
	if etag == "" {
		return
	}
	info, err := l.s.st.Head(ctx, LeaseKey, store.HeadOptions{})
	if err != nil || info.ETag != etag {
		if err != nil && !errors.Is(err, store.ErrNotExist) {
			l.s.log.Warn("cannot release lease; it expires on its own", "err", err)
		}
		return
	}
	if err := l.s.st.Delete(ctx, LeaseKey); err != nil {
		l.s.log.Warn("cannot release lease; it expires on its own", "err", err)
		return
	}
	l.mu.Lock()
	l.etag = ""
	l.mu.Unlock()
	l.s.log.Info("lease released")
}
