package logshipper

import (
	"bytes"
	"context"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/podkeeper/podkeeper/agents/health"
)

// A state dir written in the on-disk format of earlier releases (literal
// bytes, not this code's encoder) is resumed: the checkpoint's positions with
// the spooled batches applied, batches already acked or after a gap dropped.
func TestStateDirFormatResumes(t *testing.T) {
	dir := t.TempDir()
	spoolDir := filepath.Join(dir, "spool")
	os.MkdirAll(spoolDir, 0o755)
	os.WriteFile(filepath.Join(dir, checkpointName), []byte(`{"version":1,"acked_seq":5,"files":[`+
		`{"dev":1,"ino":10,"fp":"aa","fp_len":4,"offset":100,"path":"/logs/a.log"},`+
		`{"dev":1,"ino":11,"fp":"bb","fp_len":4,"offset":7,"path":"/logs/b.log"}]}`), 0o644)
	os.WriteFile(filepath.Join(dir, ".checkpoint-6.tmp"), []byte("{"), 0o644)
	frame := []byte("\x93\xa4test\xc4\x00\x81\xa4size\x01") // a PackedForward frame: [tag, entries, {size}]
	spoolFile := func(seq int, extra string) {
		head := fmt.Sprintf(`{"seq":%d,"chunk":"c%d","records":1,"line_bytes":4,%s"size":%d,"crc":%d}`, seq, seq, extra, len(frame), crc32.ChecksumIEEE(frame))
		os.WriteFile(filepath.Join(spoolDir, fmt.Sprintf("%020d.batch", seq)), append([]byte(head+"\n"), frame...), 0o644)
	}
	spoolFile(5, "") // acked; the crash came before its removal
	spoolFile(6, `"positions":[{"dev":1,"ino":10,"fp":"aa","fp_len":4,"offset":150,"path":"/logs/a.log"}],`)
	spoolFile(7, `"forget":[{"Dev":1,"Ino":11}],`)
	spoolFile(9, "") // after a gap: read again from the files instead
	os.WriteFile(filepath.Join(spoolDir, "00000000000000000010.batch.tmp"), []byte("torn"), 0o644)

	cp, acked, err := openCheckpoint(dir)
	if err != nil || acked != 5 {
		t.Fatalf("openCheckpoint: acked %d, %v", acked, err)
	}
	sp, spooled, err := openSpool(dir, 1<<20, acked, newMetrics(health.New("logshipper")).buffer)
	if err != nil {
		t.Fatal(err)
	}
	if len(spooled) != 2 || spooled[0].Seq != 6 || spooled[1].Seq != 7 || spooled[0].Chunk != "c6" {
		t.Fatalf("spooled %+v, want batches 6 and 7", spooled)
	}
	for _, b := range spooled {
		cp.project(b)
	}
	pos := cp.positions()
	if len(pos) != 1 || pos[fileID{1, 10}].Offset != 150 || pos[fileID{1, 10}].FP != "aa" {
		t.Fatalf("resume positions %+v, want a.log at 150 and b.log forgotten", pos)
	}
	left, _ := filepath.Glob(filepath.Join(spoolDir, "*"))
	if len(left) != 2 {
		t.Errorf("spool holds %v, want only batches 6 and 7", left)
	}
	if tmp, _ := filepath.Glob(filepath.Join(dir, ".checkpoint-*.tmp")); len(tmp) != 0 {
		t.Errorf("stale checkpoint temp files %v kept", tmp)
	}
	if n, recs := sp.pending(); n != 2 || recs != 2 {
		t.Errorf("pending %d batches, %d records", n, recs)
	}
}

// While the receiver fails, batches beyond the memory budget go to disk; a
// failed write is retried without queuing any batch twice, the buffer gauge
// follows the queue, and the batches come out in order with their frames.
func TestSpillRetryKeepsEachBatchOnce(t *testing.T) {
	dir := t.TempDir()
	m := newMetrics(health.New("logshipper"))
	sp, _, err := openSpool(dir, 64<<20, 0, m.buffer)
	if err != nil {
		t.Fatal(err)
	}
	sp.setFailing(true)
	good := sp.dir
	notDir := filepath.Join(dir, "not-a-dir")
	os.WriteFile(notDir, nil, 0o644)
	sp.dir = notDir
	for seq := uint64(1); seq <= 3; seq++ {
		frame := bytes.Repeat([]byte{byte(seq)}, 4<<20)
		b := &batch{batchMeta: batchMeta{Seq: seq, Records: 1, Size: len(frame), CRC: crc32.ChecksumIEEE(frame)}, frame: frame}
		if full := sp.add(b); full != nil {
			t.Fatalf("batch %d: spool full", seq)
		}
	}
	if err := sp.spill(); err == nil {
		t.Fatal("spilling into a file succeeded")
	}
	sp.dir = good
	if err := sp.spill(); err != nil {
		t.Fatal(err)
	}
	if n, recs := sp.pending(); n != 3 || recs != 3 {
		t.Fatalf("pending %d batches, %d records after a retried spill, want 3", n, recs)
	}
	if files, _ := filepath.Glob(filepath.Join(good, "*.batch")); len(files) != 3 {
		t.Fatalf("on disk %v, want 3 batches", files)
	}
	if got := testutil.ToFloat64(m.buffer); got != 12<<20 {
		t.Fatalf("buffer_bytes %v, want %d", got, 12<<20)
	}
	for seq := uint64(1); seq <= 3; seq++ {
		b, frame, err := sp.next(context.Background())
		if err != nil || b.Seq != seq || len(frame) != 4<<20 || frame[0] != byte(seq) {
			t.Fatalf("next: batch %v (%d bytes), %v; want %d", b, len(frame), err, seq)
		}
		if err := sp.remove(b); err != nil {
			t.Fatal(err)
		}
	}
	if got := testutil.ToFloat64(m.buffer); got != 0 {
		t.Fatalf("buffer_bytes %v after every batch was removed", got)
	}
	if files, _ := filepath.Glob(filepath.Join(good, "*")); len(files) != 0 {
		t.Fatalf("spool keeps %v after every batch was removed", files)
	}
}
