package syncer

import (
	"context"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/podkeeper/podkeeper/agents/events"
	"github.com/podkeeper/podkeeper/agents/health"
)

type metrics struct {
	uploads       *prometheus.CounterVec
	bytes         *prometheus.CounterVec
	retries       prometheus.Counter
	parts         prometheus.Counter
	skipped       prometheus.Counter
	rescans       prometheus.Counter
	snapshots     prometheus.Counter
	deleted       prometheus.Counter
	leaseRenewals prometheus.Counter
	batches       prometheus.Counter
	deletions     prometheus.Counter
	conflicts     prometheus.Counter
	queue         prometheus.Gauge
	queueBytes    prometheus.Gauge
	oldest        prometheus.Gauge
	lastSnapshot  prometheus.Gauge
	watches       prometheus.Gauge
	massDelete    prometheus.Gauge
	concurrency   prometheus.Gauge
	pull          pullMetrics
	packFiles     prometheus.Counter
	packsDeleted  prometheus.Counter
	unpacked      prometheus.Gauge
}

// pullMetrics are SYNC_PULL's: how far behind the log this replica is and
// what it brought down.
type pullMetrics struct {
	files     prometheus.Counter
	bytes     prometheus.Counter
	deletions prometheus.Counter
	conflicts prometheus.Counter
	errors    prometheus.Counter
	looks     prometheus.Counter
	lag       prometheus.Gauge
	limited   prometheus.Gauge
}

func newMetrics(h *health.Server) *metrics {
	c := func(name, help string) prometheus.Counter {
		return prometheus.NewCounter(prometheus.CounterOpts{Name: h.Name(name), Help: help})
	}
	g := func(name, help string) prometheus.Gauge {
		return prometheus.NewGauge(prometheus.GaugeOpts{Name: h.Name(name), Help: help})
	}
	m := &metrics{
		uploads:       prometheus.NewCounterVec(prometheus.CounterOpts{Name: h.Name("uploads_total"), Help: "Uploads by result (ok, error, changed = the file changed during the upload and goes again)."}, []string{"result"}),
		bytes:         prometheus.NewCounterVec(prometheus.CounterOpts{Name: h.Name("upload_bytes_total"), Help: "Bytes of finished uploads by result."}, []string{"result"}),
		packFiles:     c("pack_files_total", "Files the compactor copied into packs (SYNC_PACK_MAX_FILE_SIZE)."),
		packsDeleted:  c("packs_deleted_total", "Packs the compactor deleted: mostly stale (rewritten), without a live file, or left without an index."),
		unpacked:      g("unpacked_files", "Small files of the newest checkpoint in no pack after the last pack run (restore fetches them one by one)."),
		retries:       c("upload_retries_total", "Upload attempts that failed with a transient error and were retried."),
		parts:         c("multipart_parts_total", "Multipart parts uploaded (parts reused after a restart are not counted)."),
		skipped:       c("skipped_too_large_total", "Files not uploaded because they exceed SYNC_MAX_FILE_SIZE."),
		rescans:       c("rescans_total", "Full rescans after lost events (inotify overflow, watch errors)."),
		snapshots:     c("snapshots_total", "Checkpoints (snapshots folding the change log) written."),
		deleted:       c("deleted_objects_total", "Data objects deleted by retention (SYNC_DELETE=true)."),
		leaseRenewals: c("lease_renewals_total", "Lease renewals (SYNC_EXCLUSIVE=true)."),
		batches:       c("log_batches_total", "Batches appended to the change log (each acknowledges the uploads and deletions in it)."),
		deletions:     c("deletions_total", "Deletions recorded in the change log as tombstones (SYNC_DELETE=true)."),
		conflicts:     c("conflicts_total", "Write conflicts: another writer had put different content at a path; the loser's bytes are kept under conflicts/."),
		queue:         g("queue_files", "Files waiting to be uploaded (settling, queued or in flight)."),
		queueBytes:    g("queue_bytes", "Bytes of the files waiting to be uploaded."),
		oldest:        g("oldest_pending_seconds", "Age of the oldest file waiting to be uploaded."),
		lastSnapshot:  g("last_snapshot_timestamp_seconds", "Creation time of the newest checkpoint written or loaded."),
		watches:       g("watches", "Directories watched."),
		massDelete:    g("mass_delete_blocked", "1 while deletions are held back by the mass-delete guard."),
		concurrency:   g("upload_concurrency", "Uploads allowed in flight now (adaptive, SYNC_CONCURRENCY to SYNC_MAX_CONCURRENCY)."),
	}
	m.pull = pullMetrics{
		files:     c("pull_files_total", "Files of other writers brought into SYNC_DIR (SYNC_PULL)."),
		bytes:     c("pull_bytes_total", "Bytes of the files pulled."),
		deletions: c("pull_deletions_total", "Files removed from SYNC_DIR because another writer's deletion won (SYNC_PULL with SYNC_DELETE)."),
		conflicts: c("pull_conflicts_total", "Local versions that lost to a pulled one by the rule and were kept as .sync-conflict- files."),
		errors:    c("pull_errors_total", "Pulls that failed (download, verification, placement); retried at the next look."),
		looks:     c("pull_looks_total", "Looks at the change log (one LIST each, plus a GET per new batch)."),
		lag:       g("pull_lag_seconds", "Age of the newest change-log batch applied to SYNC_DIR (grows while nothing is written anywhere)."),
		limited:   g("pull_limited", "1 while new files are not pulled because of SYNC_PULL_MAX_BYTES."),
	}
	h.Registry.MustRegister(m.pull.files, m.pull.bytes, m.pull.deletions, m.pull.conflicts, m.pull.errors, m.pull.looks, m.pull.lag, m.pull.limited)
	h.Registry.MustRegister(m.uploads, m.bytes, m.retries, m.parts, m.skipped, m.rescans, m.snapshots, m.deleted,
		m.leaseRenewals, m.batches, m.deletions, m.conflicts, m.queue, m.queueBytes, m.oldest, m.lastSnapshot, m.watches, m.massDelete, m.concurrency,
		m.packFiles, m.packsDeleted, m.unpacked)
	for _, r := range []string{"ok", "error", "changed"} {
		m.uploads.WithLabelValues(r)
	}
	m.bytes.WithLabelValues("ok")
	return m
}

// limitedRecorder passes at most one event per reason per interval, so a
// failing loop does not flood the Pod's events or the log.
type limitedRecorder struct {
	next     events.Recorder
	interval time.Duration
	mu       sync.Mutex
	last     map[string]time.Time
}

func newLimitedRecorder(r events.Recorder) *limitedRecorder {
	return &limitedRecorder{next: r, interval: 30 * time.Second, last: map[string]time.Time{}}
}

func (l *limitedRecorder) Event(ctx context.Context, t events.Type, reason, message string) {
	l.mu.Lock()
	now := time.Now()
	if last, ok := l.last[reason]; ok && now.Sub(last) < l.interval {
		l.mu.Unlock()
		return
	}
	l.last[reason] = now
	l.mu.Unlock()
	l.next.Event(ctx, t, reason, message)
}
