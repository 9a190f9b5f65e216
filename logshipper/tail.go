package logshipper

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"time"
	"unicode/utf8"

	"github.com/fsnotify/fsnotify"

	"github.com/podkeeper/podkeeper/agents/backoff"
	"github.com/podkeeper/podkeeper/agents/events"
)

const (
	fpMax         = 256                    // bytes of a file's start that identify it with its inode
	readChunk     = 256 << 10              // one read
	perFilePass   = 4 << 20                // most bytes of one file per pass, so one busy file does not starve others
	pollEvery     = 250 * time.Millisecond // safety net for file systems where fsnotify misses writes
	rescanEvery   = 2 * time.Second        // glob rescan, the safety net for missed create events
	rotateWait    = 5 * time.Second        // a rotated file is kept this long after its last growth: writers reopen late (Fluent Bit's rotate_wait)
	multilineIdle = time.Second            // a multi-line group with no new line for this long is complete
	waitRescan    = time.Second            // rescan period while reading is paused by backpressure
)

var timeAfter = time.After

// tailFile is one open log file.
type tailFile struct {
	id       fileID
	path     string
	f        *os.File
	off      int64  // next byte to read
	buf      []byte // read bytes not yet part of a record; buf[0] is at off-len(buf)
	fp       string
	fpLen    int
	size     int64
	orphan   time.Time // when no glob path led to it any more (rotated or deleted)
	lastGrow time.Time

	group    []byte // pending multi-line record
	groupEnd int64
	groupAt  time.Time

	partID string // long line being split
	partN  int
}

type tailer struct {
	cfg *Config
	log *slog.Logger
	m   *metrics
	ev  events.Recorder
	st  *state
	enc *encoder

	resume  map[fileID]position
	files   map[fileID]*tailFile
	watcher *fsnotify.Watcher
	watched map[string]bool
	wake    chan struct{}
	rescan  chan struct{}
	scanned bool
	ready   func()
	beat    func() // liveness: the loop is not stuck (e.g. in a hung read)

	ctx        context.Context // ends only when the shutdown deadline passes
	batchStart time.Time
	positions  map[fileID]position
	forget     []fileID
	readBuf    []byte
	now        time.Time

	pauseLogged time.Time
	lastScan    time.Time
}

func newTailer(cfg *Config, log *slog.Logger, m *metrics, ev events.Recorder, st *state, enc *encoder, resume map[fileID]position) (*tailer, error) {
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return nil, fmt.Errorf("fsnotify: %w", err)
	}
	t := &tailer{cfg: cfg, log: log, m: m, ev: ev, st: st, enc: enc, resume: resume,
		files: map[fileID]*tailFile{}, watcher: w, watched: map[string]bool{},
		wake: make(chan struct{}, 1), rescan: make(chan struct{}, 1),
		positions: map[fileID]position{}, readBuf: make([]byte, readChunk), beat: func() {}}
	go t.watch()
	return t, nil
}

func signal(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

func (t *tailer) watch() {
	for {
		select {
		case ev, ok := <-t.watcher.Events:
			if !ok {
				return
			}
			if ev.Op&(fsnotify.Create|fsnotify.Rename|fsnotify.Remove) != 0 {
				signal(t.rescan)
			}
			signal(t.wake)
		case err, ok := <-t.watcher.Errors:
			if !ok {
				return
			}
			// An overflow only means lost wake-ups; the poll and rescan cover them.
			t.log.Debug("fsnotify", "err", err)
			signal(t.rescan)
		}
	}
}

// run tails until stop is closed, then reads every file to its end, emits what
// is pending, and tells the state that no more batches will come.
func (t *tailer) run(ctx context.Context, stop <-chan struct{}) error {
	t.ctx = ctx
	defer t.watcher.Close()
	defer t.st.finishReading()
	tick := time.NewTicker(pollEvery)
	defer tick.Stop()
	lastScan := time.Time{}
	for {
		select {
		case <-stop:
			return t.drain()
		default:
		}
		t.beat()
		t.now = time.Now()
		select {
		case <-t.rescan:
			t.scan()
			lastScan = t.now
		default:
			if t.now.Sub(lastScan) >= rescanEvery {
				t.scan()
				lastScan = t.now
			}
		}
		progressed := false
		for _, tf := range t.files {
			n, err := t.readFile(tf)
			if err != nil {
				return err
			}
			progressed = progressed || n > 0
		}
		if err := t.housekeeping(false); err != nil {
			return err
		}
		if progressed {
			continue
		}
		var deadline <-chan time.Time
		var timer *time.Timer
		if !t.batchStart.IsZero() {
			timer = time.NewTimer(max(time.Until(t.batchStart.Add(t.cfg.BatchWait)), 0))
			deadline = timer.C
		}
		select {
		case <-stop:
		case <-t.wake:
		case <-tick.C:
		case <-deadline:
		case <-t.rescan:
			signal(t.rescan)
		case <-ctx.Done():
			return ctx.Err()
		}
		if timer != nil {
			timer.Stop()
		}
	}
}

// housekeeping emits idle multi-line groups, lets go of rotated files that are
// done, and seals the batch when its wait is over.
func (t *tailer) housekeeping(final bool) error {
	for _, tf := range t.files {
		if tf.group != nil && (final || t.now.Sub(tf.groupAt) >= multilineIdle) {
			if err := t.flushGroup(tf); err != nil {
				return err
			}
		}
		if !tf.orphan.IsZero() && tf.off >= tf.size && t.now.Sub(later(tf.orphan, tf.lastGrow)) >= rotateWait {
			if err := t.release(tf); err != nil {
				return err
			}
		}
	}
	if !t.batchStart.IsZero() && (final || t.now.Sub(t.batchStart) >= t.cfg.BatchWait) {
		return t.seal()
	}
	return nil
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// release emits what is left of a file that is gone and closes it.
func (t *tailer) release(tf *tailFile) error {
	if err := t.flushRest(tf); err != nil {
		return err
	}
	tf.f.Close()
	delete(t.files, tf.id)
	t.forget = append(t.forget, tf.id)
	t.m.files.Set(float64(len(t.files)))
	t.log.Debug("released rotated file", "path", tf.path, "offset", tf.off)
	return nil
}

// flushRest emits a pending multi-line group and an unterminated last line.
func (t *tailer) flushRest(tf *tailFile) error {
	if err := t.flushGroup(tf); err != nil {
		return err
	}
	if len(tf.buf) > 0 || tf.partN > 0 {
		line := bytes.TrimSuffix(tf.buf, []byte{'\r'})
		if err := t.line(tf, line, tf.off); err != nil {
			return err
		}
		tf.buf = tf.buf[:0]
	}
	return nil
}

// drain is the shutdown: the app has exited, so every file is read to its end
// and everything pending becomes a record.
func (t *tailer) drain() error {
	t.now = time.Now()
	t.scan()
	for {
		total := 0
		for _, tf := range t.files {
			n, err := t.readFile(tf)
			if err != nil {
				return err
			}
			total += n
		}
		if total == 0 {
			break
		}
	}
	for _, tf := range t.files {
		if err := t.flushRest(tf); err != nil {
			return err
		}
	}
	return t.housekeeping(true)
}

func statID(fi os.FileInfo) fileID {
	st := fi.Sys().(*syscall.Stat_t)
	return fileID{Dev: uint64(st.Dev), Ino: st.Ino}
}

func (t *tailer) scan() {
	t.lastScan = t.now
	matched := map[fileID]bool{}
	for _, g := range t.cfg.Paths {
		dirs, _ := filepath.Glob(filepath.Dir(g))
		for _, d := range dirs {
			if !t.watched[d] {
				if err := t.watcher.Add(d); err == nil {
					t.watched[d] = true
				} else {
					t.log.Debug("cannot watch directory; relying on polling", "dir", d, "err", err)
				}
			}
		}
		paths, _ := filepath.Glob(g)
		for _, p := range paths {
			fi, err := os.Stat(p)
			if err != nil || !fi.Mode().IsRegular() {
				continue
			}
			id := statID(fi)
			if tf := t.files[id]; tf != nil {
				matched[id] = true
				tf.path = p
				continue
			}
			if tf := t.open(p); tf != nil {
				matched[tf.id] = true
			}
		}
	}
	for id, tf := range t.files {
		switch {
		case matched[id]:
			tf.orphan = time.Time{}
		case tf.orphan.IsZero():
			tf.orphan = t.now
			t.m.rotations.Inc()
			t.log.Debug("file rotated or removed; reading it to its end", "path", tf.path)
		}
	}
	t.m.files.Set(float64(len(t.files)))
	if !t.scanned {
		// Checkpointed files that no glob finds any more were rotated away while
		// the shipper was down: drop them with the next batch so the checkpoint
		// does not grow forever.
		for id := range t.resume {
			t.forget = append(t.forget, id)
		}
		t.scanned = true
		if t.ready != nil {
			t.ready()
		}
	}
}

func (t *tailer) open(p string) *tailFile {
	f, err := os.Open(p)
	if err != nil {
		t.log.Warn("cannot open log file; will retry", "path", p, "err", err)
		return nil
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil
	}
	id := statID(fi)
	if t.files[id] != nil { // the path moved between the stat and the open
		f.Close()
		return nil
	}
	tf := &tailFile{id: id, path: p, f: f, size: fi.Size(), lastGrow: t.now}
	t.fingerprint(tf)
	pos, known := t.resume[id]
	delete(t.resume, id)
	switch {
	case known && pos.FPLen <= int(tf.size) && t.hashPrefix(tf, pos.FPLen) == pos.FP && pos.Offset <= tf.size:
		tf.off = pos.Offset
	case known:
		t.log.Info("file changed since its checkpoint (inode reused or truncated); reading from the start", "path", p)
	case !t.scanned && t.cfg.StartAt == "end":
		tf.off = tf.size
	}
	t.files[id] = tf
	t.log.Debug("tailing", "path", p, "offset", tf.off)
	return tf
}

func (t *tailer) hashPrefix(tf *tailFile, n int) string {
	if n == 0 {
		return ""
	}
	b := make([]byte, n)
	if _, err := tf.f.ReadAt(b, 0); err != nil && err != io.EOF {
		return "!"
	}
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:12])
}

func (t *tailer) fingerprint(tf *tailFile) {
	tf.fpLen = int(min(tf.size, fpMax))
	tf.fp = t.hashPrefix(tf, tf.fpLen)
}

// readFile reads what was appended to tf, handling copytruncate. It returns the
// bytes read.
func (t *tailer) readFile(tf *tailFile) (int, error) {
	fi, err := tf.f.Stat()
	if err != nil {
		return 0, nil
	}
	size := fi.Size()
	if size != tf.size {
		// A shrink, or a start that no longer matches, means copytruncate (or a
		// writer that truncated and wrote past our offset before we looked).
		if size < tf.off || (tf.fpLen > 0 && (int64(tf.fpLen) > size || t.hashPrefix(tf, tf.fpLen) != tf.fp)) {
			if err := t.truncated(tf, size); err != nil {
				return 0, err
			}
		}
		if size > tf.size {
			tf.lastGrow = t.now
		}
		tf.size = size
		if tf.fpLen < fpMax && int64(tf.fpLen) < size {
			t.fingerprint(tf)
		}
	}
	total := 0
	for tf.off < size && total < perFilePass {
		n, err := tf.f.ReadAt(t.readBuf[:min(int64(len(t.readBuf)), size-tf.off)], tf.off)
		if n == 0 {
			if err != nil && err != io.EOF {
				t.log.Warn("read failed; will retry", "path", tf.path, "err", err)
			}
			break
		}
		tf.off += int64(n)
		total += n
		if err := t.process(tf, t.readBuf[:n]); err != nil {
			return total, err
		}
	}
	return total, nil
}

// truncated handles copytruncate: the lines between our offset and the
// truncation are in the copy the rotator made next to the file, so that copy
// is found by its first bytes and read from our offset before starting over.
func (t *tailer) truncated(tf *tailFile, size int64) error {
	t.m.rotations.Inc()
	lost := tf.size - tf.off
	if cp := t.findCopy(tf); cp != nil {
		t.log.Debug("copytruncate: finishing from the copy", "path", tf.path, "copy", cp.Name(), "offset", tf.off)
		for {
			n, _ := cp.ReadAt(t.readBuf, tf.off)
			if n == 0 {
				break
			}
			tf.off += int64(n)
			if err := t.process(tf, t.readBuf[:n]); err != nil {
				cp.Close()
				return err
			}
		}
		cp.Close()
		lost = 0
	}
	if err := t.flushRest(tf); err != nil {
		return err
	}
	if lost > 0 {
		t.m.bytes.WithLabelValues("dropped").Add(float64(lost))
		msg := fmt.Sprintf("%s was truncated before %d bytes of it were read and no copy was found; those lines are lost", tf.path, lost)
		t.log.Warn("lines lost to truncation", "path", tf.path, "bytes", lost)
		t.ev.Event(t.ctx, events.Warning, "LogsDropped", msg)
	}
	tf.off, tf.size, tf.buf, tf.partN = 0, 0, tf.buf[:0], 0
	t.fingerprint(tf)
	return nil
}

func (t *tailer) findCopy(tf *tailFile) *os.File {
	dir := filepath.Dir(tf.path)
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil
	}
	var best *os.File
	var bestTime time.Time
	for _, e := range entries {
		fi, err := e.Info()
		if err != nil || !fi.Mode().IsRegular() || fi.Size() < tf.off || statID(fi) == tf.id || t.files[statID(fi)] != nil {
			continue
		}
		if t.now.Sub(fi.ModTime()) > time.Hour || fi.ModTime().Before(bestTime) {
			continue
		}
		f, err := os.Open(filepath.Join(dir, e.Name()))
		if err != nil {
			continue
		}
		probe := &tailFile{f: f}
		if tf.fpLen > 0 && t.hashPrefix(probe, tf.fpLen) == tf.fp {
			if best != nil {
				best.Close()
			}
			best, bestTime = f, fi.ModTime()
			continue
		}
		f.Close()
	}
	return best
}

// process splits new bytes into lines and lines into records.
func (t *tailer) process(tf *tailFile, data []byte) error {
	tf.buf = append(tf.buf, data...)
	base := tf.off - int64(len(tf.buf))
	start := 0
	for {
		i := bytes.IndexByte(tf.buf[start:], '\n')
		if i < 0 {
			break
		}
		line := bytes.TrimSuffix(tf.buf[start:start+i], []byte{'\r'})
		lineStart := base + int64(start)
		start += i + 1
		for len(line) > t.cfg.MaxLineBytes {
			cut := runeCut(line, t.cfg.MaxLineBytes)
			if err := t.piece(tf, line[:cut], lineStart, lineStart+int64(cut)); err != nil {
				return err
			}
			line, lineStart = line[cut:], lineStart+int64(cut)
		}
		if err := t.line(tf, line, base+int64(start)); err != nil {
			return err
		}
	}
	// An unfinished line that is already too long is split now, so memory stays
	// bounded by LOGSHIP_MAX_LINE_BYTES whatever the app writes.
	for len(tf.buf)-start >= t.cfg.MaxLineBytes {
		cut := runeCut(tf.buf[start:], t.cfg.MaxLineBytes)
		at := base + int64(start)
		start += cut
		if err := t.piece(tf, tf.buf[start-cut:start], at, base+int64(start)); err != nil {
			return err
		}
	}
	tf.buf = append(tf.buf[:0], tf.buf[start:]...)
	return nil
}

// runeCut returns where to cut b at most max bytes in without splitting a
// UTF-8 character.
func runeCut(b []byte, max int) int {
	cut := max
	for k := 0; k < utf8.UTFMax && cut > 1 && cut < len(b) && !utf8.RuneStart(b[cut]); k++ {
		cut--
	}
	return cut
}

// piece emits a non-final piece of a long line starting at file offset at.
func (t *tailer) piece(tf *tailFile, p []byte, at, end int64) error {
	if tf.partN == 0 {
		if err := t.flushGroup(tf); err != nil {
			return err
		}
		tf.partID = strconv.FormatUint(tf.id.Ino, 16) + "-" + strconv.FormatInt(at, 10)
	}
	tf.partN++
	return t.emit(tf, p, end, &partial{id: tf.partID, ordinal: tf.partN})
}

// line handles one complete line ending at file offset end.
func (t *tailer) line(tf *tailFile, line []byte, end int64) error {
	if tf.partN > 0 {
		tf.partN++
		p := &partial{id: tf.partID, ordinal: tf.partN, last: true}
		tf.partN = 0
		return t.emit(tf, line, end, p)
	}
	re := t.cfg.multiline
	if re == nil {
		return t.emit(tf, line, end, nil)
	}
	if re.Match(line) || tf.group == nil || len(tf.group)+1+len(line) > t.cfg.MaxLineBytes {
		if err := t.flushGroup(tf); err != nil {
			return err
		}
		if !re.Match(line) {
			// A continuation with nothing to continue (the start was before our
			// checkpoint, or the group hit the size limit): a record of its own.
			return t.emit(tf, line, end, nil)
		}
		tf.group = append(tf.group[:0:0], line...)
	} else {
		tf.group = append(append(tf.group, '\n'), line...)
	}
	tf.groupEnd, tf.groupAt = end, t.now
	return nil
}

func (t *tailer) flushGroup(tf *tailFile) error {
	if tf.group == nil {
		return nil
	}
	g := tf.group
	tf.group = nil
	return t.emit(tf, g, tf.groupEnd, nil)
}

// emit adds a record ending at file offset end to the batch.
func (t *tailer) emit(tf *tailFile, line []byte, end int64, p *partial) error {
	t.enc.add(&record{t: t.now, line: line, file: tf.path, partial: p})
	t.m.recordsRead.Inc()
	t.m.bytesRead.Add(float64(len(line)))
	t.positions[tf.id] = position{Dev: tf.id.Dev, Ino: tf.id.Ino, FP: tf.fp, FPLen: tf.fpLen, Offset: end, Path: tf.path}
	if t.batchStart.IsZero() {
		t.batchStart = t.now
	}
	if t.enc.records >= t.cfg.BatchRecords || t.enc.lineBytes >= t.cfg.BatchBytes {
		return t.seal()
	}
	return nil
}

// seal turns the records so far into a batch and spools it, waiting while the
// spool is full (backpressure: reading pauses, files stay open).
func (t *tailer) seal() error {
	if t.enc.empty() {
		return nil
	}
	b := &batch{batchMeta: batchMeta{Seq: t.st.seq(), Records: t.enc.records, LineBytes: t.enc.lineBytes, Forget: t.forget}}
	if t.cfg.Output == "forward" && t.cfg.FluentAck {
		b.Chunk = newChunkID()
	}
	for _, p := range t.positions {
		b.Positions = append(b.Positions, p)
	}
	frame, err := t.enc.frame(t.cfg.FluentTag, b.Chunk, t.cfg.FluentCompress == "gzip")
	if err != nil {
		return err
	}
	b.frame = frame
	t.positions, t.forget, t.batchStart = map[fileID]position{}, nil, time.Time{}
	paused := false
	err = backoff.Retry(t.ctx, backoff.Policy{Initial: 100 * time.Millisecond, Max: 5 * time.Second},
		func(err error) bool { return t.ctx.Err() == nil },
		func(_ int, err error, _ time.Duration) { t.log.Warn("cannot spool batch; retrying", "err", err) },
		func(ctx context.Context) error {
			return t.st.add(ctx, b, func() {
				if !paused && time.Since(t.pauseLogged) > time.Minute {
					// Once a minute: during an outage every batch waits here.
					t.pauseLogged = time.Now()
					t.log.Info("buffer full: reading paused until the receiver catches up", "max_bytes", t.cfg.BufferMaxBytes)
				}
				paused = true
				t.beat() // waiting for the receiver is not being stuck
				// Every commit wakes this wait: rescan at the usual pace only.
				if now := time.Now(); now.Sub(t.lastScan) >= rescanEvery {
					t.now = now
					t.scan()
				}
			})
		})
	if paused {
		t.log.Debug("reading resumed")
	}
	_, _, buffered := t.st.pending()
	t.m.buffer.Set(float64(buffered))
	return err
}
