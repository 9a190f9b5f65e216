package backoff

import (
	"context"
	"errors"
	"testing"
	"time"
)

func TestDelayCappedAndJittered(t *testing.T) {
	p := Policy{Initial: 100 * time.Millisecond, Max: time.Second}
	for attempt, want := range []time.Duration{100, 200, 400, 800, 1000, 1000, 1000} {
		want *= time.Millisecond
		for range 50 {
			d := p.Delay(attempt)
			if d < want/2 || d > want {
				t.Fatalf("attempt %d: delay %s outside [%s, %s]", attempt, d, want/2, want)
			}
		}
	}
	if d := p.Delay(1000); d > time.Second {
		t.Fatalf("no overflow at large attempts: %s", d)
	}
}

func TestRetry(t *testing.T) {
	transient := errors.New("transient")
	permanent := errors.New("permanent")
	isT := func(err error) bool { return errors.Is(err, transient) }
	p := Policy{Initial: time.Microsecond, Max: time.Microsecond}
	n := 0
	err := Retry(context.Background(), p, isT, nil, func(context.Context) error {
		if n++; n < 5 {
			return transient
		}
		return nil
	})
	if err != nil || n != 5 {
		t.Fatalf("err=%v after %d calls", err, n)
	}
	n = 0
	err = Retry(context.Background(), p, isT, nil, func(context.Context) error { n++; return permanent })
	if !errors.Is(err, permanent) || n != 1 {
		t.Fatalf("permanent: err=%v after %d calls", err, n)
	}
	ctx, cancel := context.WithCancel(context.Background())
	retries := 0
	err = Retry(ctx, p, isT, func(int, error, time.Duration) {
		if retries++; retries == 3 {
			cancel()
		}
	}, func(context.Context) error { return transient })
	if !errors.Is(err, context.Canceled) || !errors.Is(err, transient) {
		t.Fatalf("cancelled: %v", err)
	}
}
