package syncer

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/podkeeper/podkeeper/agents/backoff"
	"github.com/podkeeper/podkeeper/agents/changelog"
	"github.com/podkeeper/podkeeper/agents/events"
	"github.com/podkeeper/podkeeper/agents/store"
)

// LeaseKey is the optional single-writer lease at the prefix root
// (SYNC_EXCLUSIVE=true).
const LeaseKey = "lease.json"

// LeaseDoc is the content of lease.json.
type LeaseDoc struct {
	Pod       string    `json:"pod"`
	Namespace string    `json:"namespace,omitempty"`
	UID       string    `json:"uid,omitempty"`
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
	return fmt.Sprintf("%s/%s is held by %s until %s: SYNC_EXCLUSIVE=true lets only one syncer write a prefix (a restarted container of the same Pod — namespace, name and UID — takes its lease over)",
		e.Store, LeaseKey, e.Holder.holder(), e.Holder.Expires.Format(time.RFC3339))
}

// identity names this syncer in the change log, the leases and the
// checkpoints it writes: namespace, Pod name and Pod UID (a Pod of the same
// name in another namespace, or a replacement Pod, is another writer).
type identity struct {
	pod, namespace, uid, host string
}

// newIdentity fills what the downward API did not give: the Pod name falls
// back to the hostname (which is the Pod name in Kubernetes), the UID to a
// random id of this process, so two processes never share an identity.
func newIdentity(pod, namespace, uid string) identity {
	host, _ := os.Hostname()
	if pod == "" {
		pod = host
	}
	if pod == "" {
		pod = "syncer"
	}
	if uid == "" {
		b := make([]byte, 8)
		_, _ = rand.Read(b)
		uid = "process-" + hex.EncodeToString(b)
	}
	return identity{pod: pod, namespace: namespace, uid: uid, host: host}
}

// writer is the identity as the change log names it.
func (id identity) writer() changelog.Writer {
	return changelog.Writer{Namespace: id.namespace, Pod: id.pod, UID: id.uid}
}

// same reports whether a lease document names this identity: namespace, name
// and UID, never the name alone (staging/files-0 is not prod/files-0).
func (id identity) same(d LeaseDoc) bool {
	return d.Pod == id.pod && d.Namespace == id.namespace && d.UID == id.uid
}

var suffixRe = regexp.MustCompile(`[^A-Za-z0-9_.-]+`)

// suffix is the writer's part of snapshot IDs: the pod name made safe for a
// key, or random bytes without one.
func (id identity) suffix() string {
	s := strings.Trim(suffixRe.ReplaceAllString(id.pod, "-"), "-.")
	if len(s) > 64 {
		s = s[:64]
	}
	if s == "" {
		b := make([]byte, 4)
		_, _ = rand.Read(b)
		s = hex.EncodeToString(b)
	}
	return s
}

// leaseTTL is how long a lease outlives its holder's last renewal.
const leaseTTL = 30 * time.Second

// lease is the single-writer lease on the store's prefix.
type lease struct {
	st       store.Store
	id       identity
	ttl      time.Duration
	now      func() time.Time
	log      *slog.Logger
	rec      events.Recorder
	renewals prometheus.Counter

	mu   sync.Mutex
	etag string
	doc  LeaseDoc
}

func newLease(st store.Store, id identity, log *slog.Logger, rec events.Recorder, renewals prometheus.Counter) *lease {
	return &lease{st: st, id: id, ttl: leaseTTL, now: time.Now, log: log, rec: rec, renewals: renewals}
}

func (l *lease) newDoc(acquired time.Time) LeaseDoc {
	return LeaseDoc{Pod: l.id.pod, Namespace: l.id.namespace, UID: l.id.uid, Host: l.id.host, Acquired: acquired, Expires: l.now().UTC().Add(l.ttl)}
}

func (l *lease) put(ctx context.Context, doc LeaseDoc, opts store.PutOptions) error {
	b, _ := json.Marshal(doc)
	opts.ContentType = "application/json"
	info, err := l.st.Put(ctx, LeaseKey, bytes.NewReader(b), int64(len(b)), opts)
	if err != nil {
		return err
	}
	l.mu.Lock()
	l.etag, l.doc = info.ETag, doc
	l.mu.Unlock()
	return nil
}

// acquire creates the lease, or takes over one that expired or that this
// same Pod (namespace, name, UID: a restarted container) holds.
func (l *lease) acquire(ctx context.Context) error {
	for range 5 {
		now := l.now().UTC()
		err := l.put(ctx, l.newDoc(now), store.PutOptions{IfNoneMatch: true})
		if err == nil || !errors.Is(err, store.ErrPrecondition) {
			return err
		}
		rc, info, err := l.st.Get(ctx, LeaseKey, store.GetOptions{})
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
			l.log.Warn("lease object unreadable, taking it over", "err", err)
		} else if !l.id.same(cur) && now.Before(cur.Expires) {
			return &LeaseConflictError{Holder: cur, Store: l.st.String()}
		} else {
			l.log.Info("taking over lease", "holder", cur.holder(), "expired", !now.Before(cur.Expires))
		}
		err = l.put(ctx, l.newDoc(now), store.PutOptions{IfMatch: info.ETag})
		if err == nil || !errors.Is(err, store.ErrPrecondition) {
			return err
		}
	}
	return &store.Error{Op: "lease", Key: LeaseKey, Err: errors.New("lease changed under us repeatedly"), Retryable: true}
}

// hold keeps the lease in the background until stop, which waits for the
// renewals to end. Losing it to another writer is reported on lost.
func (l *lease) hold(ctx context.Context) (lost <-chan error, stop func()) {
	ch := make(chan error, 1)
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { defer close(done); l.keep(ctx, ch) }()
	return ch, sync.OnceFunc(func() { cancel(); <-done })
}

// keep renews the lease every third of its TTL until ctx ends. Losing it to
// another writer is fatal and reported on lost.
func (l *lease) keep(ctx context.Context, lost chan<- error) {
	t := time.NewTicker(l.ttl / 3)
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
		err := backoff.Retry(ctx, backoff.Policy{Initial: 200 * time.Millisecond, Max: l.ttl / 6}, store.IsRetryable, nil, func(ctx context.Context) error {
			return l.put(ctx, l.newDoc(acquired), store.PutOptions{IfMatch: etag})
		})
		switch {
		case err == nil:
			l.renewals.Inc()
		case ctx.Err() != nil:
			return
		case errors.Is(err, store.ErrPrecondition) && l.stillOurs(ctx, acquired):
			l.renewals.Inc()
		case errors.Is(err, store.ErrPrecondition):
			msg := "lease lost: another writer replaced " + LeaseKey + "; stopping so two syncers never write one prefix"
			l.rec.Event(ctx, events.Warning, "LeaseConflict", msg)
			lost <- errors.New(msg)
			return
		default:
			l.log.Warn("lease renewal failed", "err", err)
		}
	}
}

// stillOurs handles a renewal whose response was lost and whose retry then
// failed its If-Match: if the object is the one we wrote, adopt its ETag.
func (l *lease) stillOurs(ctx context.Context, acquired time.Time) bool {
	rc, info, err := l.st.Get(ctx, LeaseKey, store.GetOptions{})
	if err != nil {
		return false
	}
	defer rc.Close()
	var cur LeaseDoc
	if json.NewDecoder(io.LimitReader(rc, 64<<10)).Decode(&cur) != nil {
		return false
	}
	if !l.id.same(cur) || cur.Host != l.id.host || !cur.Acquired.Equal(acquired) {
		return false
	}
	l.mu.Lock()
	l.etag, l.doc = info.ETag, cur
	l.mu.Unlock()
	return true
}

// releaseWithin releases the lease within d, even after ctx ended.
func (l *lease) releaseWithin(ctx context.Context, d time.Duration) {
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), d)
	defer cancel()
	l.release(rctx)
}

// release deletes the lease if it is still ours.
func (l *lease) release(ctx context.Context) {
	l.mu.Lock()
	etag := l.etag
	l.mu.Unlock()
	if etag == "" {
		return
	}
	info, err := l.st.Head(ctx, LeaseKey, store.HeadOptions{})
	if err != nil || info.ETag != etag {
		if err != nil && !errors.Is(err, store.ErrNotExist) {
			l.log.Warn("cannot release lease; it expires on its own", "err", err)
		}
		return
	}
	if err := l.st.Delete(ctx, LeaseKey); err != nil {
		l.log.Warn("cannot release lease; it expires on its own", "err", err)
		return
	}
	l.mu.Lock()
	l.etag = ""
	l.mu.Unlock()
	l.log.Info("lease released")
}
