package logshipper_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/podkeeper/podkeeper/test/peers"
)

// CompressedPackedForward into the real collector.
func TestGzip(t *testing.T) {
	r := peers.StartOtelFwd(t)
	dir := t.TempDir()
	w := newWriter(t, filepath.Join(dir, "app.log"), "gz", 150)
	w.write(3000)
	p := startShipper(t, append(baseEnv(t, r, dir), "FLUENT_COMPRESS=gzip")...)
	exp := w.expected()
	got := waitAll(t, r, p, exp, 60*time.Second)
	exactlyOnce(t, got, exp)
	sent := p.metric(`podkeeper_logshipper_bytes_total{stage="sent"}`)
	read := p.metric(`podkeeper_logshipper_bytes_total{stage="read"}`)
	if sent <= 0 || sent*4 > read {
		t.Errorf("sent %v frame bytes for %v bytes of lines: not compressed", sent, read)
	}
	if code := p.term(30 * time.Second); code != 0 {
		t.Fatalf("exit %d", code)
	}
}

// TLS to the npm FluentServer with a CA made for the test; a shipper trusting
// another CA refuses the receiver and delivers nothing.
func TestTLSCustomCA(t *testing.T) {
	certs := t.TempDir()
	ca, cert, key := peers.TestCA(t, certs)
	otherCA, _, _ := peers.TestCA(t, t.TempDir())
	r := peers.StartFluentServer(t, cert, key)

	dir := t.TempDir()
	w := newWriter(t, filepath.Join(dir, "app.log"), "tls", 80)
	w.write(2000)
	p := startShipper(t, append(baseEnv(t, r, dir), "FLUENT_TLS=true", "FLUENT_CA_FILE="+ca, "FLUENT_TAG=tls.ok")...)
	exp := w.expected()
	got := waitAll(t, r, p, exp, 60*time.Second)
	exactlyOnce(t, got, exp)
	recs, _ := r.Records()
	if recs[0].Tag != "tls.ok" || recs[0].Attrs["pod"] != "upload-0" {
		t.Errorf("record %+v lacks tag or pod", recs[0])
	}
	if code := p.term(30 * time.Second); code != 0 {
		t.Fatalf("exit %d", code)
	}

	dir2 := t.TempDir()
	w2 := newWriter(t, filepath.Join(dir2, "app.log"), "untrusted", 0)
	w2.write(10)
	p2 := startShipper(t, append(baseEnv(t, r, dir2), "FLUENT_TLS=true", "FLUENT_CA_FILE="+otherCA)...)
	if err := peers.WaitFor(context.Background(), 30*time.Second, func() error {
		if !strings.Contains(p2.tail(), "certificate signed by unknown authority") {
			return errors.New("no certificate error logged yet")
		}
		return nil
	}); err != nil {
		t.Fatalf("%v\n%s", err, p2.tail())
	}
	recs, _ = r.Records()
	for _, rec := range recs {
		if strings.HasPrefix(rec.Log, "untrusted") {
			t.Fatalf("a shipper that does not trust the receiver's CA delivered %q", rec.Log)
		}
	}
}

// byTag returns the records of one tag, in arrival order.
func byTag(t *testing.T, r *peers.LogReceiver, tag string, n int) []peers.LogRecord {
	t.Helper()
	var out []peers.LogRecord
	err := peers.WaitFor(context.Background(), 30*time.Second, func() error {
		recs, err := r.Records()
		if err != nil {
			return err
		}
		out = out[:0]
		for _, rec := range recs {
			if rec.Tag == tag {
				out = append(out, rec)
			}
		}
		if len(out) < n {
			return fmt.Errorf("%d of %d records with tag %s", len(out), n, tag)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func TestParsing(t *testing.T) {
	r := peers.StartOtelFwd(t)

	t.Run("json", func(t *testing.T) {
		dir := t.TempDir()
		os.WriteFile(filepath.Join(dir, "app.log"), []byte(
			`{"level":"info","msg":"upload done","bytes":123456789012,"ratio":0.5,"user":{"id":"u1"}}`+"\n"+
				"plain text line\n"+
				`[1,2,3]`+"\n"+
				`{"msg":"tries to override","pod":"evil"}`+"\n"), 0o644)
		p := startShipper(t, append(baseEnv(t, r, dir), "LOGSHIP_PARSE=json", "FLUENT_TAG=t.json")...)
		recs := byTag(t, r, "t.json", 4)
		if len(recs) != 4 {
			t.Fatalf("%d records", len(recs))
		}
		a := recs[0].Attrs
		if a["level"] != "info" || a["msg"] != "upload done" || a["bytes"] != int64(123456789012) || a["ratio"] != 0.5 {
			t.Errorf("JSON fields not merged: %+v", a)
		}
		if u, _ := a["user"].(map[string]any); u["id"] != "u1" {
			t.Errorf("nested object lost: %+v", a["user"])
		}
		if recs[1].Log != "plain text line" || recs[2].Log != "[1,2,3]" {
			t.Errorf("non-object lines must stay in log: %q %q", recs[1].Log, recs[2].Log)
		}
		if recs[3].Attrs["pod"] != "upload-0" {
			t.Errorf("a line overrode the pod field: %+v", recs[3].Attrs)
		}
		p.term(30 * time.Second)
	})

	t.Run("multiline", func(t *testing.T) {
		dir := t.TempDir()
		os.WriteFile(filepath.Join(dir, "app.log"), []byte(
			"2026-11-26 10:00:00 ERROR upload failed\n"+
				"java.io.IOException: boom\n"+
				"\tat Upload.run(Upload.java:42)\n"+
				"2026-11-26 10:00:01 INFO retrying\n"+
				"2026-11-26 10:00:02 INFO done\n"+
				"\tcontinued\n"), 0o644)
		p := startShipper(t, append(baseEnv(t, r, dir), `LOGSHIP_MULTILINE_START=^\d{4}-\d{2}-\d{2} `, "FLUENT_TAG=t.multi")...)
		// The last group has no following start line: it goes after the idle time.
		recs := byTag(t, r, "t.multi", 3)
		want := []string{
			"2026-11-26 10:00:00 ERROR upload failed\njava.io.IOException: boom\n\tat Upload.run(Upload.java:42)",
			"2026-11-26 10:00:01 INFO retrying",
			"2026-11-26 10:00:02 INFO done\n\tcontinued",
		}
		if len(recs) != 3 {
			t.Fatalf("%d records", len(recs))
		}
		for i, w := range want {
			if recs[i].Log != w {
				t.Errorf("record %d = %q, want %q", i, recs[i].Log, w)
			}
		}
		p.term(30 * time.Second)
	})

	t.Run("no-ack", func(t *testing.T) {
		dir := t.TempDir()
		w := newWriter(t, filepath.Join(dir, "app.log"), "noack", 40)
		w.write(500)
		p := startShipper(t, append(baseEnv(t, r, dir), "FLUENT_ACK=false", "FLUENT_TAG=t.noack")...)
		recs := byTag(t, r, "t.noack", 500)
		exactlyOnce(t, counts(recs), w.expected())
		p.term(30 * time.Second)
	})

	t.Run("long-line", func(t *testing.T) {
		dir := t.TempDir()
		long := strings.Repeat("0123456789", 250) // 2500 bytes
		os.WriteFile(filepath.Join(dir, "app.log"), []byte("before\n"+long+"\nafter\n"), 0o644)
		p := startShipper(t, append(baseEnv(t, r, dir), "LOGSHIP_MAX_LINE_BYTES=1000", "FLUENT_TAG=t.long")...)
		recs := byTag(t, r, "t.long", 5)
		if len(recs) != 5 || recs[0].Log != "before" || recs[4].Log != "after" {
			t.Fatalf("records: %+v", recs)
		}
		pieces := recs[1:4]
		sort.Slice(pieces, func(i, j int) bool {
			return pieces[i].Attrs["partial_ordinal"].(int64) < pieces[j].Attrs["partial_ordinal"].(int64)
		})
		joined := ""
		for i, pc := range pieces {
			if pc.Attrs["partial_message"] != true || pc.Attrs["partial_ordinal"] != int64(i+1) ||
				pc.Attrs["partial_last"] != (i == 2) || pc.Attrs["partial_id"] != pieces[0].Attrs["partial_id"] {
				t.Errorf("piece %d flags: %+v", i, pc.Attrs)
			}
			if len(pc.Log) > 1000 {
				t.Errorf("piece %d has %d bytes", i, len(pc.Log))
			}
			joined += pc.Log
		}
		if joined != long {
			t.Errorf("pieces do not join back to the line")
		}
		if _, ok := recs[0].Attrs["partial_message"]; ok {
			t.Errorf("a short line is flagged partial")
		}
		p.term(30 * time.Second)
	})
}

// LOGSHIP_OUTPUT=stdout needs no receiver; SIGTERM reads to the end, including
// a last line the app never terminated.
func TestStdoutOutputAndDrain(t *testing.T) {
	dir := t.TempDir()
	w := newWriter(t, filepath.Join(dir, "app.log"), "out", 10)
	w.write(100)
	env := []string{"LOGSHIP_PATHS=" + filepath.Join(dir, "*.log"), "LOGSHIP_STATE_DIR=" + t.TempDir(), "LOGSHIP_OUTPUT=stdout", "POD_NAME=p"}
	p := startShipper(t, env...)
	w.write(50)
	w.mu.Lock()
	w.bw.WriteString("the last words, no newline")
	w.bw.Flush()
	w.mu.Unlock()
	if code := p.term(30 * time.Second); code != 0 {
		t.Fatalf("exit %d\n%s", code, p.tail())
	}
	b, _ := os.ReadFile(p.logPath)
	got := map[string]int{}
	for _, l := range strings.Split(string(b), "\n") {
		if !strings.HasPrefix(l, "{") {
			continue // the agent's own log (stderr, same file here)
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatalf("stdout line %q: %v", l, err)
		}
		if m["pod"] != "p" || m["time"] == nil {
			t.Fatalf("record %v lacks pod or time", m)
		}
		got[m["log"].(string)]++
	}
	exactlyOnce(t, got, append(w.expected(), "the last words, no newline"))
}
