package adaptive

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/podkeeper/podkeeper/agents/store"
)

// simulate drives l with a fluid model of a store: each request takes rtt,
// and the whole system completes at most capRate requests per second (0: no
// cap). It returns the highest limit seen and the final rate.
func simulate(l *Limiter, t0 time.Time, d, rtt time.Duration, capRate float64, each func(now time.Time)) (peak int, rate float64) {
	const dt = time.Millisecond
	acc := 0.0
	for now := t0; now.Before(t0.Add(d)); now = now.Add(dt) {
		lim := l.Limit()
		peak = max(peak, lim)
		rate = float64(lim) / rtt.Seconds()
		if capRate > 0 {
			rate = min(rate, capRate)
		}
		acc += rate * dt.Seconds()
		for ; acc >= 1; acc-- {
			l.Done(now)
		}
		if each != nil {
			each(now)
		}
	}
	return peak, rate
}

func TestLimiterGrowsWhileThroughputGrows(t *testing.T) {
	t0 := time.Unix(0, 0)
	// Latency-bound (20 ms round trips, a server with room): the rate grows
	// with every step, so the limit climbs to the bound and not past it.
	l := New(16, 128, t0)
	peak, rate := simulate(l, t0, 5*time.Second, 20*time.Millisecond, 0, nil)
	if l.Limit() != 128 || peak != 128 {
		t.Errorf("latency-bound: limit %d, peak %d, want the bound 128", l.Limit(), peak)
	}
	if rate < 6000 {
		t.Errorf("latency-bound: final rate %.0f/s, want 128/20ms", rate)
	}

	// Server-bound at 1500 requests/s = 30 in flight at 20 ms: growing past
	// that gains nothing, so the limit stops soon after.
	l = New(16, 256, t0)
	peak, rate = simulate(l, t0, 5*time.Second, 20*time.Millisecond, 1500, nil)
	if rate < 1500 {
		t.Errorf("server-bound: rate %.0f, want the cap", rate)
	}
	if peak > 80 || l.Limit() < 30 {
		t.Errorf("server-bound: limit %d (peak %d), want it to settle between 30 and 80", l.Limit(), peak)
	}
}

func TestLimiterUndoesAStepThatBuysNothing(t *testing.T) {
	// Already at the server's bound (800/s = 16 at 20 ms, e.g. loopback on a
	// busy CPU): probes find nothing, so the limit stays at the start.
	t0 := time.Unix(0, 0)
	l := New(16, 128, t0)
	peak, _ := simulate(l, t0, 10*time.Second, 20*time.Millisecond, 800, nil)
	if l.Limit() != 16 || peak > 24 {
		t.Errorf("limit %d (peak %d), want 16 after probes of at most one step", l.Limit(), peak)
	}
}

func TestLimiterRespectsBound(t *testing.T) {
	t0 := time.Unix(0, 0)
	l := New(16, 16, t0)
	if peak, _ := simulate(l, t0, 2*time.Second, 20*time.Millisecond, 0, nil); peak != 16 || l.Limit() != 16 {
		t.Errorf("max = start: limit %d, peak %d, want fixed 16", l.Limit(), peak)
	}
	// A bound below the start is the start (RESTORE_CONCURRENCY wins).
	if l := New(32, 8, t0); l.Limit() != 32 || l.max != 32 {
		t.Errorf("bound below start: limit %d max %d", l.Limit(), l.max)
	}
	if l := New(0, 0, t0); l.Limit() != 1 {
		t.Errorf("start 0: limit %d, want 1", l.Limit())
	}
}

func TestLimiterBacksOffOnSlowDown(t *testing.T) {
	t0 := time.Unix(0, 0)
	l := New(16, 128, t0)
	simulate(l, t0, 3*time.Second, 20*time.Millisecond, 0, nil)
	if l.Limit() != 128 {
		t.Fatalf("limit %d before the back-off", l.Limit())
	}
	now := t0.Add(3 * time.Second)
	l.Throttled(now)
	if l.Limit() != 64 {
		t.Fatalf("after SlowDown: limit %d, want 64", l.Limit())
	}
	// The other in-flight requests of the same burst fail too: one halving.
	l.Throttled(now.Add(10 * time.Millisecond))
	if l.Limit() != 64 {
		t.Errorf("second SlowDown within holdFor: limit %d, want 64", l.Limit())
	}
	l.Throttled(now.Add(holdFor + time.Millisecond))
	if l.Limit() != 32 {
		t.Errorf("SlowDown after holdFor: limit %d, want 32", l.Limit())
	}
	for range 10 {
		l.Throttled(now.Add(time.Hour))
		now = now.Add(time.Hour)
	}
	if l.Limit() != 1 {
		t.Errorf("repeated SlowDown: limit %d, want the floor 1", l.Limit())
	}

	// A server that throttles above 40 in flight (S3's per-prefix request
	// rate): the limit oscillates below and around it, never running away.
	t1 := now.Add(time.Hour)
	l = New(16, 256, t1)
	peak, _ := simulate(l, t1, 20*time.Second, 20*time.Millisecond, 0, func(now time.Time) {
		if l.Limit() > 40 {
			l.Throttled(now)
		}
	})
	if peak > 40+40/4+1 || l.Limit() > 51 || l.Limit() < 10 {
		t.Errorf("throttling server: limit %d, peak %d", l.Limit(), peak)
	}
}

func TestLimiterSlots(t *testing.T) {
	l := New(4, 4, time.Now())
	var in, peak atomic.Int32
	var issued atomic.Bool
	var wg sync.WaitGroup
	for range 50 {
		if err := l.Acquire(context.Background()); err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer l.Release()
			n := in.Add(1)
			for {
				p := peak.Load()
				if n <= p || peak.CompareAndSwap(p, n) {
					break
				}
			}
			// Hold the slot until the limit is reached (or nothing more
			// comes): a Release then is what lets the next Acquire through.
			for in.Load() < 4 && !issued.Load() {
				runtime.Gosched()
			}
			in.Add(-1)
		}()
	}
	issued.Store(true)
	wg.Wait()
	if p := peak.Load(); p != 4 {
		t.Errorf("peak in flight %d, want the limit, 4", p)
	}
	// A cancelled wait returns.
	for range 4 {
		l.Acquire(context.Background())
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := l.Acquire(ctx); !errors.Is(err, context.Canceled) {
		t.Errorf("acquire on a full limiter with a cancelled context: %v", err)
	}
}

type statusErr int

func (e statusErr) Error() string       { return fmt.Sprintf("status %d", int(e)) }
func (e statusErr) HTTPStatusCode() int { return int(e) }

type codeErr string

func (e codeErr) Error() string     { return string(e) }
func (e codeErr) ErrorCode() string { return string(e) }

func TestIsThrottle(t *testing.T) {
	wrap := func(err error) error { return &store.Error{Op: "get", Key: "k", Err: err, Retryable: true} }
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{wrap(statusErr(503)), true},
		{wrap(statusErr(429)), true},
		{wrap(codeErr("SlowDown")), true},
		{wrap(os.ErrDeadlineExceeded), true}, // a net.Error with Timeout()
		{wrap(statusErr(500)), false},
		{wrap(errors.New("connection reset")), false},
		{nil, false},
	} {
		if got := IsThrottle(tc.err); got != tc.want {
			t.Errorf("IsThrottle(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}
