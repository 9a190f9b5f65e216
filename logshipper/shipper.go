package logshipper

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/podkeeper/podkeeper/agents/health"
	"github.com/podkeeper/podkeeper/agents/lifecycle"
)

type metrics struct {
	records, bytes *prometheus.CounterVec // stage = read|sent|acked (+ dropped for bytes)
	batches        *prometheus.CounterVec // result = acked|failed
	ackLatency     prometheus.Histogram
	buffer, files  prometheus.Gauge
	rotations      prometheus.Counter
	skipped        *prometheus.CounterVec // reason = symlink|not_regular

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
		skipped:    prometheus.NewCounterVec(prometheus.CounterOpts{Name: h.Name("files_skipped_total"), Help: "Paths below the log directories never read, by reason: symlink (a link, never followed) or not_regular (FIFO, device, socket). Counted once per path."}, []string{"reason"}),
	}
	for _, s := range []string{"read", "sent", "acked"} {
		m.records.WithLabelValues(s)
		m.bytes.WithLabelValues(s)
	}
	m.bytes.WithLabelValues("dropped")
	m.skipped.WithLabelValues(skipLink)
	m.skipped.WithLabelValues(skipNotRegular)
	for _, r := range []string{"acked", "failed"} {
		m.batches.WithLabelValues(r)
	}
	m.recordsRead, m.bytesRead = m.records.WithLabelValues("read"), m.bytes.WithLabelValues("read")
	h.Registry.MustRegister(m.records, m.bytes, m.batches, m.ackLatency, m.buffer, m.files, m.rotations, m.skipped)
	return m
}

// Shipper tails the configured files and forwards their lines.
type Shipper struct {
	cfg  *Config
	deps lifecycle.Deps
	m    *metrics
}

// New builds a shipper from deps (Log, Events and Health are required; Labels
// may be nil); Run starts it. The health server is started by whoever built
// deps.
func New(cfg *Config, deps lifecycle.Deps) *Shipper {
	return &Shipper{cfg: cfg, deps: deps, m: newMetrics(deps.Health)}
}

// Run ships until ctx ends, then drains within deps.Drain: every file read to
// its end, every batch acked and checkpointed. It returns nil when all of that
// finished in time.
func (s *Shipper) Run(ctx context.Context) error {
	s.deps.Health.SetReady(errors.New("looking for log files"))
	rd, snd, err := s.open()
	if err != nil {
		return err
	}
	defer snd.out.close()
	// The read loop beats at least every second, also while backpressure
	// holds it; a minute without one is a hung read, which a restart resolves.
	s.deps.Health.SetLiveness(time.Minute)

	work, cancelWork := s.workContext(ctx)
	defer cancelWork()
	readErr := make(chan error, 1)
	go func() { readErr <- rd.run(work, ctx.Done()) }()
	sendErr := snd.run(work)
	timedOut := work.Err() != nil
	if sendErr != nil {
		cancelWork() // the reader may be waiting for room that no ack will make
	}
	if rerr := <-readErr; sendErr == nil && rerr != nil && !errors.Is(rerr, context.Canceled) {
		sendErr, timedOut = rerr, work.Err() != nil
	}
	if sendErr != nil && timedOut {
		n, recs := rd.sp.pending()
		return fmt.Errorf("shutdown timeout %s passed with %d records in %d batches not acked; they are sent at the next start from %s and the log files: %w",
			s.deps.DrainTimeout, recs, n, s.cfg.StateDir, sendErr)
	}
	return sendErr
}

// workContext returns the context of the stages: it outlives ctx by the drain
// (reading every file to its end and delivering it) and ends with deps.Drain.
func (s *Shipper) workContext(ctx context.Context) (context.Context, context.CancelFunc) {
	work, cancel := context.WithCancel(context.WithoutCancel(ctx))
	stop := context.AfterFunc(ctx, func() {
		s.deps.Log.Info("draining: reading every file to its end and delivering it", "timeout", s.deps.DrainTimeout)
		drain, cancelDrain := s.deps.Drain(ctx)
		defer cancelDrain()
		select {
		case <-drain.Done():
			cancel()
		case <-work.Done():
		}
	})
	return work, func() { stop(); cancel() }
}

// open loads the checkpoint and the spool and wires the stages: the reader
// (tailer -> batcher -> spool) and the sender (spool -> receiver -> checkpoint).
func (s *Shipper) open() (*reader, *sender, error) {
	cfg, log := s.cfg, s.deps.Log
	cp, acked, err := openCheckpoint(cfg.StateDir)
	if err != nil {
		return nil, nil, fmt.Errorf("state dir %s: %w", cfg.StateDir, err)
	}
	sp, spooled, err := openSpool(cfg.StateDir, cfg.BufferMaxBytes, acked, s.m.buffer)
	if err != nil {
		return nil, nil, fmt.Errorf("state dir %s: %w", cfg.StateDir, err)
	}
	records := 0
	for _, b := range spooled {
		cp.project(b)
		records += b.Records
	}
	if len(spooled) > 0 {
		log.Info("resending batches spooled before the restart", "batches", len(spooled), "records", records)
	}
	// Reading goes on after what is spooled: the checkpoint with the spooled
	// batches applied.
	tail, err := newTailer(cfg, log, s.m, s.deps.Events, cp.positions())
	if err != nil {
		return nil, nil, err
	}
	enc := &encoder{pod: cfg.Base.PodName, namespace: cfg.Base.PodNamespace, labels: s.deps.Labels,
		parseJSON: cfg.Parse == "json", jsonOut: cfg.Output == "stdout"}
	rd := &reader{log: log, health: s.deps.Health, tail: tail, cp: cp, sp: sp, maxBuf: cfg.BufferMaxBytes,
		bat: newBatcher(cfg, s.m, enc, acked+1+uint64(len(spooled)))}
	snd := &sender{cfg: cfg, log: log, ev: s.deps.Events, m: s.m, out: newTransport(cfg), sp: sp, cp: cp}
	return rd, snd, nil
}
