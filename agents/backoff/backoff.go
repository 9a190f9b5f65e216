// Package backoff retries whole operations with capped, jittered exponential
// delays until they succeed, fail permanently, or the context ends. Agents use
// it instead of the SDK's retry budget, which gives up during long outages.
package backoff

import (
	"context"
	"math/rand/v2"
	"time"
)

// Policy shapes the delays: Initial, doubled each attempt up to Max, with full
// jitter in [d/2, d].
type Policy struct {
	Initial time.Duration
	Max     time.Duration
}

// Default suits S3 and log receivers: 200 ms up to 30 s.
var Default = Policy{Initial: 200 * time.Millisecond, Max: 30 * time.Second}

// Delay returns the wait before retry number attempt (0-based).
func (p Policy) Delay(attempt int) time.Duration {
	d := p.Initial
	for range attempt {
		d *= 2
		if d >= p.Max {
			d = p.Max
			break
		}
	}
	if d <= 1 {
		return d
	}
	half := d / 2
	return half + rand.N(half+1)
}

// Retry calls op until it returns nil, or an error for which retryable is
// false, or ctx ends (then ctx's error joins the last one). onRetry, when set,
// is told about each failure before the wait.
func Retry(ctx context.Context, p Policy, retryable func(error) bool, onRetry func(attempt int, err error, wait time.Duration), op func(context.Context) error) error {
	for attempt := 0; ; attempt++ {
		err := op(ctx)
		if err == nil || !retryable(err) {
			return err
		}
		wait := p.Delay(attempt)
		if onRetry != nil {
			onRetry(attempt, err, wait)
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return &StoppedError{Last: err, Cause: ctx.Err()}
		case <-t.C:
		}
	}
}

// StoppedError is returned when the context ended while retrying.
type StoppedError struct {
	Last  error
	Cause error
}

func (e *StoppedError) Error() string {
	return "gave up retrying (" + e.Cause.Error() + "): " + e.Last.Error()
}
func (e *StoppedError) Unwrap() []error { return []error{e.Cause, e.Last} }
