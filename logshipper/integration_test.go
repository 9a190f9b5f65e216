package logshipper_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/podkeeper/podkeeper/test/peers"
)

// A clean run against the real OTel Collector: every line exactly once, with
// the record fields, the tag and sub-second times; SIGTERM drains and exits 0.
func TestCleanRunExactlyOnce(t *testing.T) {
	r := peers.StartOtelFwd(t)
	dir := t.TempDir()
	a := newWriter(t, filepath.Join(dir, "a.log"), "a", 150)
	b := newWriter(t, filepath.Join(dir, "b.log"), "b", 20)
	a.write(3000) // before start: read from the beginning
	p := startShipper(t, append(baseEnv(t, r, dir), "LOGSHIP_BATCH_RECORDS=500", "FLUENT_TAG=app.upload")...)
	for _, probe := range []string{"/healthz", "/startupz"} {
		if resp, err := http.Get("http://" + p.http + probe); err != nil || resp.StatusCode != 200 {
			t.Fatalf("%s: %v %v", probe, resp, err)
		}
	}
	a.write(2000)
	b.write(2500)
	c := newWriter(t, filepath.Join(dir, "c.log"), "c", 0) // created while running: found by fsnotify
	c.write(1000)
	exp := append(append(a.expected(), b.expected()...), c.expected()...)
	waitAll(t, r, p, exp, 60*time.Second)
	// The last lines, written just before SIGTERM, are delivered by the drain.
	c.write(7)
	exp = append(exp, c.expected()[1000:]...)
	if code := p.term(30 * time.Second); code != 0 {
		t.Fatalf("exit %d after SIGTERM\n%s", code, p.tail())
	}
	got := waitAll(t, r, nil, exp, 10*time.Second)
	exactlyOnce(t, got, exp)

	recs, _ := r.Records()
	subSecond := 0
	for _, rec := range recs {
		if rec.Tag != "app.upload" || rec.Attrs["pod"] != "upload-0" || rec.Attrs["namespace"] != "files" {
			t.Fatalf("record lacks tag/pod/namespace: %+v", rec)
		}
		want := filepath.Join(dir, strings.SplitN(rec.Log, " ", 2)[0]+".log")
		if rec.Attrs["file"] != want {
			t.Fatalf("record file %v, want %s", rec.Attrs["file"], want)
		}
		if d := time.Since(rec.Time); d < 0 || d > 5*time.Minute {
			t.Fatalf("record time %v is not the read time", rec.Time)
		}
		if rec.Time.Nanosecond() != 0 {
			subSecond++
		}
	}
	if subSecond == 0 {
		t.Errorf("no record has a sub-second time")
	}
}

// SIGKILL in the middle of a steady stream, then a restart: every line at least
// once, duplicates at most one batch.
func TestKillRestartAtLeastOnce(t *testing.T) {
	r := peers.StartOtelFwd(t)
	dir := t.TempDir()
	const batch = 200
	env := append(baseEnv(t, r, dir), fmt.Sprintf("LOGSHIP_BATCH_RECORDS=%d", batch))
	w := newWriter(t, filepath.Join(dir, "app.log"), "app", 100)
	p := startShipper(t, env...)
	stop := make(chan struct{})
	done := w.steady(2*time.Millisecond, 20, stop)
	// Crash while batches are flowing and some are acked.
	if err := peers.WaitFor(context.Background(), 30*time.Second, func() error {
		if v := p.metric(`podkeeper_logshipper_records_total{stage="acked"}`); v < 3000 {
			return fmt.Errorf("acked %v", v)
		}
		return nil
	}); err != nil {
		t.Fatalf("%v\n%s", err, p.tail())
	}
	p.kill()
	w.write(500) // written while the shipper is down
	p.start()
	w.write(500)
	close(stop)
	<-done
	exp := w.expected()
	got := waitAll(t, r, p, exp, 60*time.Second)
	dups := 0
	for _, l := range exp {
		dups += got[l] - 1
	}
	t.Logf("%d lines, %d duplicates after one SIGKILL (batch = %d)", len(exp), dups, batch)
	if dups > batch {
		t.Errorf("%d duplicates after one crash, want at most one batch (%d)", dups, batch)
	}
	if code := p.term(30 * time.Second); code != 0 {
		t.Fatalf("exit %d", code)
	}
}

// Rotation by rename + create under a steady writer, one rotated file deleted
// at once: nothing lost, nothing twice.
func TestRenameRotation(t *testing.T) {
	r := peers.StartOtelFwd(t)
	dir := t.TempDir()
	path := filepath.Join(dir, "app.log")
	w := newWriter(t, path, "app", 120)
	p := startShipper(t, baseEnv(t, r, dir)...)
	stop := make(chan struct{})
	done := w.steady(time.Millisecond, 10, stop)
	for i := 1; i <= 4; i++ {
		target := w.written() + 3000
		if err := peers.WaitFor(context.Background(), 30*time.Second, func() error {
			if w.written() < target {
				return errors.New("writer behind")
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		w.mu.Lock()
		rotated := fmt.Sprintf("%s.%d", path, i)
		if err := os.Rename(path, rotated); err != nil {
			t.Fatal(err)
		}
		// The app writes a few more lines to the old descriptor before it reopens.
		for range 5 {
			w.bw.WriteString(lineText(w.name, w.n, w.pad) + "\n")
			w.n++
		}
		w.reopen(t)
		if i%2 == 0 {
			os.Remove(rotated) // deleted right after rotation: still fully delivered
		}
		w.mu.Unlock()
	}
	close(stop)
	<-done
	exp := w.expected()
	got := waitAll(t, r, p, exp, 60*time.Second)
	exactlyOnce(t, got, exp)
	if v := p.metric("podkeeper_logshipper_rotations_total"); v < 4 {
		t.Errorf("rotations_total = %v, want >= 4", v)
	}
	if code := p.term(30 * time.Second); code != 0 {
		t.Fatalf("exit %d", code)
	}
}

// copytruncate under a steady writer: the lines between the last read and the
// truncation are taken from the copy, so none is lost.
func TestCopyTruncate(t *testing.T) {
	r := peers.StartOtelFwd(t)
	dir := t.TempDir()
	path := filepath.Join(dir, "app.log")
	w := newWriter(t, path, "app", 120)
	p := startShipper(t, baseEnv(t, r, dir)...)
	stop := make(chan struct{})
	done := w.steady(time.Millisecond, 10, stop)
	for i := 1; i <= 3; i++ {
		target := w.written() + 4000
		if err := peers.WaitFor(context.Background(), 30*time.Second, func() error {
			if w.written() < target {
				return errors.New("writer behind")
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		// logrotate's copytruncate, with the writer held so no line falls between
		// the copy and the truncate (that window loses lines for every reader).
		w.mu.Lock()
		// A burst just before the rotation, so the shipper is likely behind
		// when the file is cut (TestCopyTruncateReadsTheCopy pins that case).
		for range 3000 {
			w.bw.WriteString(lineText(w.name, w.n, w.pad) + "\n")
			w.n++
		}
		w.bw.Flush()
		data, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(fmt.Sprintf("%s.%d", path, i), data, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(path, 0); err != nil {
			t.Fatal(err)
		}
		w.mu.Unlock()
	}
	close(stop)
	<-done
	exp := w.expected()
	got := waitAll(t, r, p, exp, 60*time.Second)
	exactlyOnce(t, got, exp)
	logb, _ := os.ReadFile(p.logPath)
	t.Logf("%d lines, %d of 3 truncations finished from the copy", len(exp), strings.Count(string(logb), "finishing from the copy"))
	if code := p.term(30 * time.Second); code != 0 {
		t.Fatalf("exit %d", code)
	}
}

// The receiver is down for 10 s while lines are written: they wait in the
// bounded spool (reading pauses at its limit) and all arrive after it is back.
func TestReceiverOutage(t *testing.T) {
	r := peers.StartOtelFwd(t)
	dir := t.TempDir()
	const maxBuf = 256 << 10
	env := append(baseEnv(t, r, dir), "LOGSHIP_BATCH_BYTES=32768", fmt.Sprintf("LOGSHIP_BUFFER_MAX_BYTES=%d", maxBuf))
	w := newWriter(t, filepath.Join(dir, "app.log"), "app", 150)
	p := startShipper(t, env...)
	w.write(1000)
	waitAll(t, r, p, w.expected(), 30*time.Second)

	r.Terminate()
	stop := make(chan struct{})
	done := w.steady(2*time.Millisecond, 10, stop)
	outage := time.After(10 * time.Second)
	maxSeen := 0.0
	tick := time.NewTicker(100 * time.Millisecond)
wait:
	for {
		select {
		case <-outage:
			break wait
		case <-tick.C:
			maxSeen = max(maxSeen, p.metric("podkeeper_logshipper_buffer_bytes"))
		}
	}
	tick.Stop()
	close(stop)
	<-done
	read := p.metric(`podkeeper_logshipper_records_total{stage="read"}`)
	if maxSeen <= 0 {
		t.Errorf("buffer_bytes never rose during the outage")
	}
	if maxSeen > maxBuf {
		t.Errorf("buffer grew to %v bytes, limit %d", maxSeen, maxBuf)
	}
	if read >= float64(w.written()) {
		t.Errorf("read %v of %d lines during the outage: backpressure did not pause reading", read, w.written())
	}
	t.Logf("outage: %d lines written, %v read, buffer peak %v bytes", w.written(), read, maxSeen)

	r.Restart(t)
	w.write(100)
	exp := w.expected()
	got := waitAll(t, r, p, exp, 90*time.Second)
	// A batch in flight when the receiver went down may have been stored
	// without its ack reaching us: at most that one batch twice.
	atMostDup(t, got, exp, 1000)
	if code := p.term(30 * time.Second); code != 0 {
		t.Fatalf("exit %d", code)
	}
}

// Lines spooled while the receiver is down survive a SIGKILL of the shipper
// even when their log file is gone by the restart: they are sent from the
// spool, not read again.
func TestSpoolSurvivesCrash(t *testing.T) {
	r := peers.StartOtelFwd(t)
	r.Terminate()
	dir := t.TempDir()
	env := baseEnv(t, r, dir)
	state := strings.TrimPrefix(env[1], "LOGSHIP_STATE_DIR=")
	path := filepath.Join(dir, "app.log")
	w := newWriter(t, path, "spool", 150)
	p := startShipper(t, env...)
	w.write(60000) // ~10 MiB: beyond what waits in memory, so it goes to the spool
	if err := peers.WaitFor(context.Background(), 60*time.Second, func() error {
		n := spooledRecords(t, filepath.Join(state, "spool"))
		if n < 60000 {
			return fmt.Errorf("%d of 60000 records spooled", n)
		}
		return nil
	}); err != nil {
		t.Fatalf("%v\n%s", err, p.tail())
	}
	p.kill()
	exp := w.expected()
	os.Remove(path)
	r.Restart(t)
	p.start()
	got := waitAll(t, r, p, exp, 90*time.Second)
	exactlyOnce(t, got, exp)
	if code := p.term(30 * time.Second); code != 0 {
		t.Fatalf("exit %d", code)
	}
}

// spooledRecords sums the record counts in the spool's batch headers.
func spooledRecords(t *testing.T, dir string) int {
	entries, _ := os.ReadDir(dir)
	n := 0
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), ".batch") {
			continue
		}
		f, err := os.Open(filepath.Join(dir, e.Name()))
		if err != nil {
			continue
		}
		var head struct {
			Records int `json:"records"`
		}
		json.NewDecoder(f).Decode(&head)
		f.Close()
		n += head.Records
	}
	return n
}
