package logshipper

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/podkeeper/podkeeper/agents/events"
	"github.com/podkeeper/podkeeper/agents/health"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// testTailer is a tailer whose records go through a batcher that never seals
// (so they land as JSON lines in enc.buf), driven step by step (no goroutines,
// no timing).
type testTailer struct {
	*tailer
	bat *batcher
}

func newTestTailer(t *testing.T, dir string, resume map[fileID]position) (*testTailer, *encoder) {
	t.Helper()
	cfg := &Config{Paths: []string{filepath.Join(dir, "*.log")}, BatchRecords: 1 << 30, BatchBytes: 1 << 30,
		MaxLineBytes: 1 << 20, StartAt: "beginning", Output: "stdout", BufferMaxBytes: 1 << 30}
	enc := &encoder{jsonOut: true}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	m := newMetrics(health.New("logshipper"))
	tl, err := newTailer(cfg, log, m, events.Nop{}, resume)
	if err != nil {
		t.Fatal(err)
	}
	tl.begin()
	t.Cleanup(tl.close)
	return &testTailer{tailer: tl, bat: newBatcher(cfg, m, enc, 1)}, enc
}

func logsOf(t *testing.T, enc *encoder) []string {
	var out []string
	for _, l := range strings.Split(strings.TrimSpace(string(enc.buf)), "\n") {
		if l == "" {
			continue
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatal(err)
		}
		out = append(out, m["log"].(string))
	}
	return out
}

func appendLines(t *testing.T, path string, from, to int) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for i := from; i < to; i++ {
		fmt.Fprintf(f, "line %05d of the application log\n", i)
	}
}

// readAll reads every file to its end and batches what was read.
func readAll(t *testing.T, tl *testTailer) {
	for _, tf := range tl.files {
		for tl.read(context.Background(), tf) > 0 {
		}
	}
	entries := tl.take()
	for i := range entries {
		if b, err := tl.bat.add(&entries[i]); b != nil || err != nil {
			t.Fatalf("batch sealed (%v): the test batcher never seals", err)
		}
	}
}

// copytruncate while lines are still unread: they are taken from the copy.
func TestCopyTruncateReadsTheCopy(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "app.log")
	appendLines(t, path, 0, 100)
	tl, enc := newTestTailer(t, dir, nil)
	tl.scan()
	readAll(t, tl)
	appendLines(t, path, 100, 150) // not read yet
	data, _ := os.ReadFile(path)
	os.WriteFile(path+".1", data, 0o644)
	os.Truncate(path, 0)
	appendLines(t, path, 150, 160)
	readAll(t, tl)
	got := logsOf(t, enc)
	if len(got) != 160 {
		t.Fatalf("got %d lines, want 160", len(got))
	}
	for i, l := range got {
		if want := fmt.Sprintf("line %05d of the application log", i); l != want {
			t.Fatalf("line %d = %q, want %q", i, l, want)
		}
	}
}

// A checkpoint for the same inode but other content (inode reuse) is ignored.
func TestInodeReuseIsNotResumed(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "app.log")
	appendLines(t, path, 0, 10)
	fi, _ := os.Stat(path)
	id := statID(fi)
	stale := position{Dev: id.Dev, Ino: id.Ino, FP: "0123456789abcdef01234567", FPLen: 64, Offset: 200, Path: path}
	tl, enc := newTestTailer(t, dir, map[fileID]position{id: stale})
	tl.scan()
	readAll(t, tl)
	if got := logsOf(t, enc); len(got) != 10 {
		t.Fatalf("got %d lines, want all 10 (the checkpoint belongs to another file)", len(got))
	}

	// The same file with its real fingerprint resumes where it was.
	tf := tl.files[id]
	good := position{Dev: id.Dev, Ino: id.Ino, FP: tf.fp, FPLen: tf.fpLen, Offset: tf.off, Path: path}
	appendLines(t, path, 10, 12)
	tl2, enc2 := newTestTailer(t, dir, map[fileID]position{id: good})
	tl2.scan()
	readAll(t, tl2)
	if got := logsOf(t, enc2); len(got) != 2 || got[0] != "line 00010 of the application log" {
		t.Fatalf("resumed to %q, want lines 10 and 11", got)
	}
}

// A line longer than the limit becomes flagged pieces that join back to it.
func TestLongLineSplitPieces(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "app.log")
	long := strings.Repeat("é", 700) // 1400 bytes of 2-byte characters
	os.WriteFile(path, []byte("short\n"+long+"\nafter\n"), 0o644)
	tl, enc := newTestTailer(t, dir, nil)
	tl.cfg.MaxLineBytes = 501
	tl.scan()
	readAll(t, tl)
	got := logsOf(t, enc)
	if len(got) != 5 || got[0] != "short" || got[4] != "after" || got[1]+got[2]+got[3] != long {
		t.Fatalf("pieces %d: %q", len(got), got)
	}
	for _, p := range got[1:4] {
		if len(p) > 501 || !strings.HasPrefix(p, "é") {
			t.Fatalf("piece of %d bytes splits a character or exceeds the limit", len(p))
		}
	}
}

type recorded struct{ typ, reason, msg string }

type recorder struct{ got []recorded }

func (r *recorder) Event(_ context.Context, t events.Type, reason, msg string) {
	r.got = append(r.got, recorded{string(t), reason, msg})
}

// A file truncated before it was read, with no copy next to it: the loss is
// counted and reported, never silent.
func TestTruncationLossIsReported(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "app.log")
	appendLines(t, path, 0, 10)
	tl, enc := newTestTailer(t, dir, nil)
	rec := &recorder{}
	tl.ev = rec
	tl.scan()
	readAll(t, tl)
	appendLines(t, path, 10, 20)
	tf := tl.files[statID(mustStat(t, path))]
	fi := mustStat(t, path)
	tf.size = fi.Size() // seen but not read yet
	unread := tf.size - tf.off
	os.Truncate(path, 0)
	appendLines(t, path, 100, 101)
	readAll(t, tl)
	if len(rec.got) != 1 || rec.got[0].reason != "LogsDropped" || rec.got[0].typ != "Warning" {
		t.Fatalf("events %+v, want one LogsDropped warning", rec.got)
	}
	if got := testutil.ToFloat64(tl.m.bytes.WithLabelValues("dropped")); got != float64(unread) || unread <= 0 {
		t.Fatalf("bytes_total{stage=dropped} = %v, want the %d unread bytes", got, unread)
	}
	got := logsOf(t, enc)
	if len(got) != 11 || got[10] != "line 00100 of the application log" {
		t.Fatalf("lines after the truncation: %q", got)
	}
}

func mustStat(t *testing.T, p string) os.FileInfo {
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	return fi
}

// Pod labels from lifecycle.Deps.Labels are on every record.
func TestLabelsOnRecords(t *testing.T) {
	dir := t.TempDir()
	appendLines(t, filepath.Join(dir, "app.log"), 0, 3)
	tl, enc := newTestTailer(t, dir, nil)
	enc.pod = "upload-0"
	enc.labels = func() map[string]string { return map[string]string{"app": "upload", "tier": "web"} }
	tl.scan()
	readAll(t, tl)
	for _, l := range strings.Split(strings.TrimSpace(string(enc.buf)), "\n") {
		var m struct {
			Pod    string            `json:"pod"`
			Labels map[string]string `json:"labels"`
		}
		json.Unmarshal([]byte(l), &m)
		if m.Pod != "upload-0" || m.Labels["app"] != "upload" || m.Labels["tier"] != "web" {
			t.Fatalf("record %s lacks pod labels", l)
		}
	}
}
