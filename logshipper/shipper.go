package logshipper

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/podkeeper/podkeeper/agents/backoff"
	"github.com/podkeeper/podkeeper/agents/events"
	"github.com/podkeeper/podkeeper/agents/health"
)

// retryPolicy is shorter than backoff.Default's 30 s cap: a receiver coming back
// after a restart should see our logs within seconds, and a resend costs it little.
var retryPolicy = backoff.Policy{Initial: 200 * time.Millisecond, Max: 10 * time.Second}

type metrics struct {
	records, bytes *prometheus.CounterVec // stage = read|sent|acked (+ dropped for bytes)
	batches        *prometheus.CounterVec // result = acked|failed
	ackLatency     prometheus.Histogram
	buffer, files  prometheus.Gauge
	rotations      prometheus.Counter

	recordsRead, bytesRead prometheus.Counter // resolved once: they are hit per line
}

func newMetrics(h *health.Server) *metrics {
	m := &metrics{
		records:    prometheus.NewCounterVec(prometheus.CounterOpts{Name: h.Name("records_total"), Help: "Log records by stage: read from files, sent, acked by the receiver. Lost data is counted in bytes_total{stage=\"dropped\"}: a truncation that outruns the reader loses bytes whose line count is unknown."}, []string{"stage"}),
		bytes:      prometheus.NewCounterVec(prometheus.CounterOpts{Name: h.Name("bytes_total"), Help: "Bytes of log lines by stage (read, acked, dropped) and of frames sent."}, []string{"stage"}),
		batches:    prometheus.NewCounterVec(prometheus.CounterOpts{Name: h.Name("batches_total"), Help: "Batch delivery attempts by result."}, []string{"result"}),
		ackLatency: prometheus.NewHistogram(prometheus.HistogramOpts{Name: h.Name("ack_latency_seconds"), Help: "Time from writing a batch to its ack.", Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16)}),
		buffer:     prometheus.NewGauge(prometheus.GaugeOpts{Name: h.Name("buffer_bytes"), Help: "Bytes of batches spooled in the state dir and not yet acked."}),
		files:      prometheus.NewGauge(prometheus.GaugeOpts{Name: h.Name("files_watched"), Help: "Log files open for reading."}),
		rotations:  prometheus.NewCounter(prometheus.CounterOpts{Name: h.Name("rotations_total"), Help: "Rotations seen (rename, delete or copytruncate)."}),
	}
	for _, s := range []string{"read", "sent", "acked"} {
		m.records.WithLabelValues(s)
		m.bytes.WithLabelValues(s)
	}
	m.bytes.WithLabelValues("dropped")
	for _, r := range []string{"acked", "failed"} {
		m.batches.WithLabelValues(r)
	}
	m.recordsRead, m.bytesRead = m.records.WithLabelValues("read"), m.bytes.WithLabelValues("read")
	h.Registry.MustRegister(m.records, m.bytes, m.batches, m.ackLatency, m.buffer, m.files, m.rotations)
	return m
}

// Options are the seams the Kubernetes work and tests plug into.
type Options struct {
	// Labels returns the Pod's labels, added to every record (nil = none). It is
	// called once per batch, so it should be a cached read.
	Labels func() map[string]string
	// Stdout receives records with LOGSHIP_OUTPUT=stdout (default os.Stdout).
	Stdout io.Writer
	// Health is the probe/metrics server (default: a new one on LOGSHIP_HTTP_ADDR).
	Health *health.Server
}

// Shipper tails the configured files and forwards their lines.
type Shipper struct {
	cfg    *Config
	log    *slog.Logger
	ev     events.Recorder
	opts   Options
	health *health.Server
	m      *metrics
}

// New builds a shipper; Run starts it.
func New(cfg *Config, log *slog.Logger, ev events.Recorder, opts Options) *Shipper {
	if ev == nil {
		ev = events.Log{L: log}
	}
	if opts.Stdout == nil {
		opts.Stdout = os.Stdout
	}
	h := opts.Health
	if h == nil {
		h = health.New("logshipper")
	}
	return &Shipper{cfg: cfg, log: log, ev: ev, opts: opts, health: h, m: newMetrics(h)}
}

// Health returns the probe/metrics server (its Addr once Run started it).
func (s *Shipper) Health() *health.Server { return s.health }

// Run ships until ctx ends, then drains within LOGSHIP_SHUTDOWN_TIMEOUT: every
// file read to its end, every batch acked and checkpointed. It returns nil when
// all of that finished in time.
func (s *Shipper) Run(ctx context.Context) error {
	cfg := s.cfg
	st, resume, err := openState(cfg.StateDir, cfg.BufferMaxBytes)
	if err != nil {
		return fmt.Errorf("state dir %s: %w", cfg.StateDir, err)
	}
	if n, recs, _ := st.pending(); n > 0 {
		s.log.Info("resending batches spooled before the restart", "batches", n, "records", recs)
	}
	if s.opts.Health == nil {
		if err := s.health.Start(cfg.HTTPAddr, s.log); err != nil {
			return err
		}
		defer s.health.Close()
	}
	s.health.SetReady(errors.New("looking for log files"))
	enc := &encoder{pod: cfg.Base.PodName, namespace: cfg.Base.PodNamespace, labels: s.opts.Labels,
		parseJSON: cfg.Parse == "json", jsonOut: cfg.Output == "stdout"}
	t, err := newTailer(cfg, s.log, s.m, s.ev, st, enc, resume)
	if err != nil {
		return err
	}
	t.ready = func() { s.health.SetReady(nil) }
	t.beat = s.health.Beat
	// The read loop beats at least every second, also while backpressure
	// holds it; a minute without one is a hung read, which a restart resolves.
	s.health.SetLiveness(time.Minute)

	// work ends only when the shutdown deadline passes; ctx ending starts the drain.
	work, cancelWork := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelWork()
	go func() {
		select {
		case <-ctx.Done():
			s.log.Info("draining: reading every file to its end and delivering it", "timeout", cfg.ShutdownTimeout)
			timer := time.NewTimer(cfg.ShutdownTimeout)
			defer timer.Stop()
			select {
			case <-timer.C:
				cancelWork()
			case <-work.Done():
			}
		case <-work.Done():
		}
	}()

	readErr := make(chan error, 1)
	go func() { readErr <- t.run(work, ctx.Done()) }()

	var snd sender
	if cfg.Output == "stdout" {
		snd = stdoutSender{w: s.opts.Stdout}
	} else {
		snd = newForwarder(cfg)
	}
	defer snd.close()
	sendErr := s.sendLoop(work, st, snd)
	rerr := <-readErr
	if sendErr == nil && rerr != nil && !errors.Is(rerr, context.Canceled) {
		sendErr = rerr
	}
	if sendErr != nil {
		n, recs, _ := st.pending()
		if work.Err() != nil {
			return fmt.Errorf("shutdown timeout %s passed with %d records in %d batches not acked; they are sent at the next start from %s and the log files: %w",
				cfg.ShutdownTimeout, recs, n, cfg.StateDir, sendErr)
		}
		return sendErr
	}
	return nil
}

func (s *Shipper) sendLoop(ctx context.Context, st *state, snd sender) error {
	failing := false
	for {
		b, frame, err := st.next(ctx)
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		var start time.Time
		err = backoff.Retry(ctx, retryPolicy, retryable, func(attempt int, err error, wait time.Duration) {
			s.m.batches.WithLabelValues("failed").Inc()
			if !failing || attempt%10 == 0 {
				s.log.Warn("batch not delivered; resending", "chunk", b.Chunk, "records", b.Records, "attempt", attempt+1, "retry_in", wait.Round(time.Millisecond), "err", err)
			}
			if !failing {
				failing = true
				st.setFailing(true)
				s.ev.Event(ctx, events.Warning, "LogsDelayed", fmt.Sprintf("log receiver %s not reachable: %v; lines are buffered in %s", s.cfg.FluentAddr, err, s.cfg.StateDir))
			}
		}, func(ctx context.Context) error {
			start = time.Now()
			s.m.records.WithLabelValues("sent").Add(float64(b.Records))
			s.m.bytes.WithLabelValues("sent").Add(float64(len(frame)))
			return snd.send(ctx, b.Chunk, frame)
		})
		if err != nil {
			return err
		}
		s.m.ackLatency.Observe(time.Since(start).Seconds())
		if failing {
			failing = false
			st.setFailing(false)
			s.log.Info("receiver accepts batches again", "addr", s.cfg.FluentAddr)
		}
		if err := st.commit(ctx, b); err != nil {
			return err
		}
		s.m.batches.WithLabelValues("acked").Inc()
		s.m.records.WithLabelValues("acked").Add(float64(b.Records))
		s.m.bytes.WithLabelValues("acked").Add(float64(b.LineBytes))
		_, _, buffered := st.pending()
		s.m.buffer.Set(float64(buffered))
	}
}
