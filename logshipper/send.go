package logshipper

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/podkeeper/podkeeper/agents/backoff"
	"github.com/podkeeper/podkeeper/agents/events"
)

// retryPolicy is shorter than backoff.Default's 30 s cap: a receiver coming back
// after a restart should see our logs within seconds, and a resend costs it little.
var retryPolicy = backoff.Policy{Initial: 200 * time.Millisecond, Max: 10 * time.Second}

// sender takes the spooled batches in order, delivers each until it is acked,
// then makes its checkpoint current and frees its place in the spool.
type sender struct {
	cfg *Config
	log *slog.Logger
	ev  events.Recorder
	m   *metrics
	out transport
	sp  *spool
	cp  *checkpoint
}

// run sends until the spool is closed and empty, or ctx ends.
func (s *sender) run(ctx context.Context) error {
	for {
		b, frame, err := s.sp.next(ctx)
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		s.cp.prepareAhead(s.sp.upcoming(prepareAheadBatches))
		if err := s.deliver(ctx, b, frame); err != nil {
			return err
		}
		if err := s.cp.commit(ctx, b.Seq); err != nil {
			return err
		}
		if err := s.sp.remove(b); err != nil {
			return err
		}
		s.m.batches.WithLabelValues("acked").Inc()
		s.m.records.WithLabelValues("acked").Add(float64(b.Records))
		s.m.bytes.WithLabelValues("acked").Add(float64(b.LineBytes))
	}
}

// deliver sends b until it is acked (or written, without acks), retrying
// with backoff; while it fails the spool takes batches to disk.
func (s *sender) deliver(ctx context.Context, b *batch, frame []byte) error {
	var start time.Time
	err := backoff.Retry(ctx, retryPolicy, retryable, func(attempt int, err error, wait time.Duration) {
		s.m.batches.WithLabelValues("failed").Inc()
		started := s.sp.setFailing(true)
		if started || attempt%10 == 0 {
			s.log.Warn("batch not delivered; resending", "chunk", b.Chunk, "records", b.Records, "attempt", attempt+1, "retry_in", wait.Round(time.Millisecond), "err", err)
		}
		if started {
			s.ev.Event(ctx, events.Warning, "LogsDelayed", fmt.Sprintf("log receiver %s not reachable: %v; lines are buffered in %s", s.cfg.FluentAddr, err, s.cfg.StateDir))
		}
	}, func(ctx context.Context) error {
		start = time.Now()
		s.m.records.WithLabelValues("sent").Add(float64(b.Records))
		s.m.bytes.WithLabelValues("sent").Add(float64(len(frame)))
		return s.out.send(ctx, b.Chunk, frame)
	})
	if err != nil {
		return err
	}
	s.m.ackLatency.Observe(time.Since(start).Seconds())
	if s.sp.setFailing(false) {
		s.log.Info("receiver accepts batches again", "addr", s.cfg.FluentAddr)
	}
	return nil
}
