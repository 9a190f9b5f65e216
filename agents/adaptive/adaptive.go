// Package adaptive is the adaptive concurrency of small transfers (restore's
// downloads, the syncer's uploads). A small object costs about one round
// trip, so a fixed number of parallel requests caps a transfer at
// concurrency / RTT objects per second, however fast the bucket is.
package adaptive

import (
	"context"
	"errors"
	"net"
	"sync"
	"time"
)

// Limiter starts at a configured concurrency and measures the completion
// rate over windows of a few times the limit:
//
//   - probing: while each growth step buys at least growthGain of its
//     proportional gain in files/s, the limit grows by half (a quarter after a
//     back-off), up to max;
//   - steady: when the rate stops growing the last step is undone (it bought
//     nothing but memory and load on the server), and the limit is probed
//     again every probeEvery windows (the server or network may have become
//     faster);
//   - a throttling signal (503 SlowDown, 429, a timeout) halves the limit, at
//     most once per holdFor, and the next probe grows gently.
//
// Its decisions take the time as an argument, so they are tested without a
// network or a clock.
type Limiter struct {
	mu       sync.Mutex
	limit    int
	max      int
	inflight int
	wake     chan struct{} // closed when a slot frees or the limit grows

	probing    bool
	gentle     bool // after a back-off: grow by a quarter, not by half
	winStart   time.Time
	winDone    int
	prevRate   float64
	prevLimit  int // the limit before the last growth step
	steadyWins int
	holdUntil  time.Time
}

const (
	growthGain = 0.3 // a step must buy at least 30% of its proportional gain (50% more downloads: 15% more files/s)
	probeEvery = 8   // steady windows between two probes
	holdFor    = time.Second
	minWindow  = 8 // completions
)

func New(start, upper int, now time.Time) *Limiter {
	start = max(1, start)
	upper = max(start, upper)
	return &Limiter{limit: start, max: upper, wake: make(chan struct{}), probing: upper > start, winStart: now}
}

// Acquire waits for a free slot.
func (l *Limiter) Acquire(ctx context.Context) error {
	for {
		l.mu.Lock()
		if l.inflight < l.limit {
			l.inflight++
			l.mu.Unlock()
			return nil
		}
		ch := l.wake
		l.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// Release frees a slot.
func (l *Limiter) Release() {
	l.mu.Lock()
	l.inflight--
	l.signal()
	l.mu.Unlock()
}

func (l *Limiter) signal() {
	close(l.wake)
	l.wake = make(chan struct{})
}

// Limit is the current limit.
func (l *Limiter) Limit() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.limit
}

// Done records one completed download at now.
func (l *Limiter) Done(now time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.winDone++
	if l.winDone < max(minWindow, 2*l.limit) {
		return
	}
	el := now.Sub(l.winStart).Seconds()
	if el <= 0 {
		return
	}
	rate := float64(l.winDone) / el
	l.winStart, l.winDone = now, 0
	switch {
	case now.Before(l.holdUntil):
		// Just backed off: this window says nothing about the new limit yet.
		l.prevRate = rate
	case l.probing:
		need := 1.0
		if l.prevLimit > 0 {
			need += growthGain * (float64(l.limit)/float64(l.prevLimit) - 1)
		}
		if l.prevRate == 0 || rate >= l.prevRate*need {
			l.prevRate = rate
			step := l.limit / 2
			if l.gentle {
				step = l.limit / 4
			}
			if n := min(l.max, l.limit+max(1, step)); n != l.limit {
				l.prevLimit, l.limit = l.limit, n
				l.signal()
			} else {
				l.probing, l.steadyWins = false, 0
			}
		} else {
			l.probing, l.steadyWins = false, 0
			l.prevRate = max(l.prevRate, rate)
			if l.prevLimit > 0 {
				l.limit, l.prevLimit = l.prevLimit, 0
			}
		}
	default:
		l.prevRate = rate
		if l.steadyWins++; l.steadyWins >= probeEvery && l.limit < l.max {
			// Probe again from the current rate.
			l.probing = true
		}
	}
}

// Throttled records a throttling signal at now: the limit halves, at most
// once per holdFor (a burst of in-flight requests fails together).
func (l *Limiter) Throttled(now time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if now.Before(l.holdUntil) {
		return
	}
	l.limit, l.prevLimit = max(1, l.limit/2), 0
	l.holdUntil = now.Add(holdFor)
	l.probing, l.gentle, l.steadyWins = false, true, 0
	l.winStart, l.winDone = now, 0
}

// IsThrottle reports whether err says the server is overloaded or the request
// timed out: 503 (S3's SlowDown), 429, an error code naming throttling, or a
// network timeout.
func IsThrottle(err error) bool {
	var sc interface{ HTTPStatusCode() int }
	if errors.As(err, &sc) {
		if s := sc.HTTPStatusCode(); s == 503 || s == 429 {
			return true
		}
	}
	var ae interface{ ErrorCode() string }
	if errors.As(err, &ae) {
		switch ae.ErrorCode() {
		case "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "TooManyRequests":
			return true
		}
	}
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
