package syncer

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/podkeeper/podkeeper/agents/config"
	"github.com/podkeeper/podkeeper/agents/store"
)

// The lease on its own dependencies: a store (file://), a clock the test
// moves, an identity per pod.
func TestLeaseTakeover(t *testing.T) {
	var c Config
	if err := config.Load(&c, config.Env{"STORE_URL": "file://" + t.TempDir(), "SYNC_DIR": t.TempDir()}); err != nil {
		t.Fatal(err)
	}
	st, err := store.Open(context.Background(), &c.Store, nil)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	newL := func(pod string) *lease {
		l := newLease(st, identity{pod: pod, host: "node"}, slog.New(slog.NewTextHandler(io.Discard, nil)), &recorder{},
			prometheus.NewCounter(prometheus.CounterOpts{Name: "renewals"}))
		l.now = func() time.Time { return now }
		return l
	}
	ctx := context.Background()
	a, b := newL("pod-a"), newL("pod-b")
	if err := a.acquire(ctx); err != nil {
		t.Fatal(err)
	}
	var lc *LeaseConflictError
	if err := b.acquire(ctx); !errors.As(err, &lc) || lc.Holder.Pod != "pod-a" {
		t.Fatalf("second pod: %v, want a conflict naming pod-a", err)
	}
	// A restarted pod of the same name takes its lease over at once.
	a2 := newL("pod-a")
	if err := a2.acquire(ctx); err != nil {
		t.Fatalf("same pod name: %v", err)
	}
	// Same name and UID in another namespace is another writer.
	other := newL("pod-a")
	other.id.namespace = "staging"
	if err := other.acquire(ctx); !errors.As(err, &lc) {
		t.Fatalf("staging/pod-a took default/pod-a's lease: %v", err)
	}
	// Anyone takes over an expired lease.
	now = now.Add(leaseTTL + time.Second)
	if err := b.acquire(ctx); err != nil {
		t.Fatalf("after expiry: %v", err)
	}
	// Releasing a lease that is no longer ours leaves the holder's alone.
	a2.releaseWithin(ctx, time.Second)
	if _, err := st.Head(ctx, LeaseKey, store.HeadOptions{}); err != nil {
		t.Fatalf("pod-a released pod-b's lease: %v", err)
	}
	b.releaseWithin(ctx, time.Second)
	if _, err := st.Head(ctx, LeaseKey, store.HeadOptions{}); !errors.Is(err, store.ErrNotExist) {
		t.Fatalf("lease still there after its holder released it: %v", err)
	}
}
