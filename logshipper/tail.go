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
	"path"
	"strconv"
	"syscall"
	"time"
	"unicode/utf8"

	"github.com/fsnotify/fsnotify"
	"golang.org/x/sys/unix"

	"github.com/podkeeper/podkeeper/agents/events"
	"github.com/podkeeper/podkeeper/agents/safefs"
)

const (
	fpMax         = 256                    // bytes of a file's start that identify it with its inode
	readChunk     = 256 << 10              // one read
	perFilePass   = 4 << 20                // most bytes of one file per pass, so one busy file does not starve others
	pollEvery     = 250 * time.Millisecond // safety net for file systems where fsnotify misses writes
	rescanEvery   = 2 * time.Second        // glob rescan, the safety net for missed create events
	rotateWait    = 5 * time.Second        // a rotated file is kept this long after its last growth: writers reopen late (Fluent Bit's rotate_wait)
	multilineIdle = time.Second            // a multi-line group with no new line for this long is complete
)

// tailFile is one open log file.
type tailFile struct {
	id       fileID
	path     string
	g        *globRoot // the glob that found it
	rel      string    // its path below g's base
	f        *os.File
	off      int64  // next byte to read
	buf      []byte // read bytes not yet part of a record; buf[0] is at off-len(buf)
	fp       string
	fpLen    int
	size     int64
	orphan   time.Time // when no glob path led to it any more (rotated or deleted)
	lastGrow time.Time
	copy     *os.File // after a copytruncate: the copy, read on from off before the file starts over

	group    []byte // pending multi-line record
	groupEnd int64
	groupAt  time.Time

	partID string // long line being split
	partN  int
}

// entry is what the tailer read: a record and where its file stands once the
// record is delivered, or (forget) a file closed for good, to drop from the
// checkpoint.
type entry struct {
	rec    record
	pos    position
	forget bool
}

// tailer turns files into entries: it finds the files, follows rotations and
// truncations, and splits what it reads into records. What it reads waits in
// out until take.
type tailer struct {
	cfg *Config
	log *slog.Logger
	m   *metrics
	ev  events.Recorder

	resume   map[fileID]position
	roots    []*globRoot
	skipped  map[string]bool // paths refused and reported (reason + path)
	files    map[fileID]*tailFile
	watcher  *fsnotify.Watcher
	watched  map[string]bool
	wake     chan struct{} // something changed in a watched directory
	rescan   chan struct{} // ... and it may be a new or renamed file
	scanned  bool
	now      time.Time // of the current pass: record times, rotation and idle clocks
	lastScan time.Time
	readBuf  []byte

	out   []entry
	arena []byte // the lines of out: what was read is overwritten by the next read
}

func newTailer(cfg *Config, log *slog.Logger, m *metrics, ev events.Recorder, resume map[fileID]position) (*tailer, error) {
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return nil, fmt.Errorf("fsnotify: %w", err)
	}
	t := &tailer{cfg: cfg, log: log, m: m, ev: ev, resume: resume,
		files: map[fileID]*tailFile{}, watcher: w, watched: map[string]bool{},
		roots: newGlobRoots(cfg.Paths), skipped: map[string]bool{},
		wake: make(chan struct{}, 1), rescan: make(chan struct{}, 1), readBuf: make([]byte, readChunk)}
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
			signal(t.wake)
		}
	}
}

func (t *tailer) close() {
	t.watcher.Close()
	for _, g := range t.roots {
		g.drop()
	}
}

// changed is signalled when something moved in a watched directory.
func (t *tailer) changed() <-chan struct{} { return t.wake }

// list returns the open files. A snapshot: a scan while the reader waits for
// room may open more.
func (t *tailer) list() []*tailFile {
	out := make([]*tailFile, 0, len(t.files))
	for _, tf := range t.files {
		out = append(out, tf)
	}
	return out
}

// begin starts a pass and returns its time.
func (t *tailer) begin() time.Time {
	t.now = time.Now()
	return t.now
}

// take returns what was read since the last take. The entries and their lines
// are valid until the tailer reads again.
func (t *tailer) take() []entry {
	out := t.out
	t.out, t.arena = t.out[:0], t.arena[:0]
	return out
}

// housekeeping emits idle multi-line groups (all of them when final) and lets
// go of rotated files that are done.
func (t *tailer) housekeeping(final bool) {
	for _, tf := range t.files {
		if tf.group != nil && (final || t.now.Sub(tf.groupAt) >= multilineIdle) {
			t.flushGroup(tf)
		}
		if tf.copy == nil && !tf.orphan.IsZero() && tf.off >= tf.size && t.now.Sub(later(tf.orphan, tf.lastGrow)) >= rotateWait {
			t.release(tf)
		}
	}
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// release emits what is left of a file that is gone and closes it.
func (t *tailer) release(tf *tailFile) {
	t.flushRest(tf)
	tf.f.Close()
	delete(t.files, tf.id)
	t.out = append(t.out, entry{pos: position{Dev: tf.id.Dev, Ino: tf.id.Ino}, forget: true})
	t.countFiles()
	t.log.Debug("released rotated file", "path", tf.path, "offset", tf.off)
}

// flushRest emits a pending multi-line group and an unterminated last line.
func (t *tailer) flushRest(tf *tailFile) {
	t.flushGroup(tf)
	if len(tf.buf) > 0 || tf.partN > 0 {
		t.line(tf, bytes.TrimSuffix(tf.buf, []byte{'\r'}), tf.off)
		tf.buf = tf.buf[:0]
	}
}

// flushAll is for the shutdown: the app has exited, so what is pending in
// every file becomes a record.
func (t *tailer) flushAll() {
	for _, tf := range t.files {
		t.flushRest(tf)
	}
}

func (t *tailer) countFiles() { t.m.files.Set(float64(len(t.files))) }

func statID(fi os.FileInfo) fileID {
	st := fi.Sys().(*syscall.Stat_t)
	return fileID{Dev: uint64(st.Dev), Ino: st.Ino}
}

// start finds the files for the first time (LOGSHIP_START_AT applies to
// those without a checkpoint). Checkpointed files that no glob finds any more
// were rotated away while the shipper was down: they are emitted as forget
// entries so the checkpoint does not grow forever.
func (t *tailer) start() {
	t.scan()
	for _, p := range t.resume {
		t.out = append(t.out, entry{pos: p, forget: true})
	}
	t.scanned = true
}

// scanIfDue rescans when fsnotify saw a file appear or move, or rescanEvery
// passed (the safety net for missed events).
func (t *tailer) scanIfDue() {
	select {
	case <-t.rescan:
	default:
		if t.now.Sub(t.lastScan) < rescanEvery {
			return
		}
	}
	t.scan()
}

// scan opens the files the globs match and marks those they no longer match
// as rotated.
func (t *tailer) scan() {
	t.lastScan = t.now
	matched := map[fileID]bool{}
	for _, g := range t.roots {
		r := t.openRoot(g)
		if r == nil {
			continue
		}
		for _, f := range t.match(g, r, t.watchDir) {
			if tf := t.files[f.id]; tf != nil {
				matched[f.id] = true
				tf.path, tf.g, tf.rel = g.path(f.rel), g, f.rel
				continue
			}
			if tf := t.open(g, r, f.rel); tf != nil {
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
	t.countFiles()
}

// watchDir watches d, a directory a glob can match files in that the scan
// just opened without following a link. fsnotify watches by path: a link
// swapped in at that moment only brings wake-ups, never a read.
func (t *tailer) watchDir(d string) {
	if t.watched[d] {
		return
	}
	if err := t.watcher.Add(d); err != nil {
		t.log.Debug("cannot watch directory; relying on polling", "dir", d, "err", err)
		return
	}
	t.watched[d] = true
}

func (t *tailer) open(g *globRoot, r *safefs.Root, rel string) *tailFile {
	p := g.path(rel)
	f := t.openFile(g, r, rel)
	if f == nil {
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
	tf := &tailFile{id: id, path: p, g: g, rel: rel, f: f, size: fi.Size(), lastGrow: t.now}
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

// read reads the next chunk of tf (of its copy first, while a copytruncate
// is being finished) and returns the bytes read.
func (t *tailer) read(ctx context.Context, tf *tailFile) int {
	if tf.copy == nil && !t.refresh(ctx, tf) {
		return 0
	}
	if tf.copy != nil {
		return t.readCopy(ctx, tf)
	}
	if tf.off >= tf.size {
		return 0
	}
	n, err := tf.f.ReadAt(t.readBuf[:min(int64(len(t.readBuf)), tf.size-tf.off)], tf.off)
	if n == 0 {
		if err != nil && err != io.EOF {
			t.log.Warn("read failed; will retry", "path", tf.path, "err", err)
		}
		return 0
	}
	tf.off += int64(n)
	t.process(tf, t.readBuf[:n])
	return n
}

// refresh takes in tf's new size, handling copytruncate; false when tf cannot
// be looked at now.
func (t *tailer) refresh(ctx context.Context, tf *tailFile) bool {
	fi, err := tf.f.Stat()
	if err != nil {
		return false
	}
	size := fi.Size()
	if size == tf.size {
		return true
	}
	// A shrink, or a start that no longer matches, means copytruncate (or a
	// writer that truncated and wrote past our offset before we looked).
	if size < tf.off || (tf.fpLen > 0 && (int64(tf.fpLen) > size || t.hashPrefix(tf, tf.fpLen) != tf.fp)) {
		if t.truncated(ctx, tf) {
			return true // the new size counts once the copy is read
		}
	}
	if size > tf.size {
		tf.lastGrow = t.now
	}
	tf.size = size
	if tf.fpLen < fpMax && int64(tf.fpLen) < size {
		t.fingerprint(tf)
	}
	return true
}

// truncated handles copytruncate: the lines between our offset and the
// truncation are in the copy the rotator made next to the file, so that copy
// is found by its first bytes and read on from our offset (true) before the
// file starts over. Without a copy the unread bytes are lost, which is
// counted and reported.
func (t *tailer) truncated(ctx context.Context, tf *tailFile) bool {
	t.m.rotations.Inc()
	if c := t.findCopy(tf); c != nil {
		t.log.Debug("copytruncate: finishing from the copy", "path", tf.path, "copy", c.Name(), "offset", tf.off)
		tf.copy = c
		return true
	}
	if lost := tf.size - tf.off; lost > 0 {
		t.m.bytes.WithLabelValues("dropped").Add(float64(lost))
		msg := fmt.Sprintf("%s was truncated before %d bytes of it were read and no copy was found; those lines are lost", tf.path, lost)
		t.log.Warn("lines lost to truncation", "path", tf.path, "bytes", lost)
		t.ev.Event(ctx, events.Warning, "LogsDropped", msg)
	}
	t.startOver(tf)
	return false
}

// readCopy reads on in the copy of a truncated file; at its end the file
// starts over and is read from its first byte.
func (t *tailer) readCopy(ctx context.Context, tf *tailFile) int {
	if n, _ := tf.copy.ReadAt(t.readBuf, tf.off); n > 0 {
		tf.off += int64(n)
		t.process(tf, t.readBuf[:n])
		return n
	}
	tf.copy.Close()
	tf.copy = nil
	t.startOver(tf)
	return t.read(ctx, tf)
}

// startOver makes tf a new file, after what was pending of the old content
// was emitted.
func (t *tailer) startOver(tf *tailFile) {
	t.flushRest(tf)
	tf.off, tf.size, tf.buf, tf.partN = 0, 0, tf.buf[:0], 0
	t.fingerprint(tf)
}

// findCopy looks for the copy of a truncated file next to it, through the
// glob's root: links and FIFOs are never candidates.
func (t *tailer) findCopy(tf *tailFile) *os.File {
	if tf.g == nil {
		return nil
	}
	r := t.openRoot(tf.g)
	if r == nil {
		return nil
	}
	dir := path.Dir(tf.rel)
	d, err := r.OpenDir(dir)
	if err != nil {
		return nil
	}
	defer d.Close()
	names, err := d.Readdirnames(-1)
	if err != nil {
		return nil
	}
	var best *os.File
	var bestTime time.Time
	for _, name := range names {
		var st unix.Stat_t
		if unix.Fstatat(int(d.Fd()), name, &st, unix.AT_SYMLINK_NOFOLLOW) != nil || st.Mode&unix.S_IFMT != unix.S_IFREG {
			continue
		}
		id := fileID{Dev: uint64(st.Dev), Ino: st.Ino}
		mtime := time.Unix(st.Mtim.Unix())
		if st.Size < tf.off || id == tf.id || t.files[id] != nil {
			continue
		}
		if t.now.Sub(mtime) > time.Hour || mtime.Before(bestTime) {
			continue
		}
		f, err := r.Open(path.Join(dir, name))
		if err != nil {
			continue
		}
		probe := &tailFile{f: f}
		if tf.fpLen > 0 && t.hashPrefix(probe, tf.fpLen) == tf.fp {
			if best != nil {
				best.Close()
			}
			best, bestTime = f, mtime
			continue
		}
		f.Close()
	}
	return best
}

// process splits new bytes into lines and lines into records.
func (t *tailer) process(tf *tailFile, data []byte) {
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
			t.piece(tf, line[:cut], lineStart, lineStart+int64(cut))
			line, lineStart = line[cut:], lineStart+int64(cut)
		}
		t.line(tf, line, base+int64(start))
	}
	// An unfinished line that is already too long is split now, so memory stays
	// bounded by LOGSHIP_MAX_LINE_BYTES whatever the app writes.
	for len(tf.buf)-start >= t.cfg.MaxLineBytes {
		cut := runeCut(tf.buf[start:], t.cfg.MaxLineBytes)
		at := base + int64(start)
		start += cut
		t.piece(tf, tf.buf[start-cut:start], at, base+int64(start))
	}
	tf.buf = append(tf.buf[:0], tf.buf[start:]...)
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
func (t *tailer) piece(tf *tailFile, p []byte, at, end int64) {
	if tf.partN == 0 {
		t.flushGroup(tf)
		tf.partID = strconv.FormatUint(tf.id.Ino, 16) + "-" + strconv.FormatInt(at, 10)
	}
	tf.partN++
	t.emit(tf, p, end, &partial{id: tf.partID, ordinal: tf.partN})
}

// line handles one complete line ending at file offset end.
func (t *tailer) line(tf *tailFile, line []byte, end int64) {
	if tf.partN > 0 {
		tf.partN++
		p := &partial{id: tf.partID, ordinal: tf.partN, last: true}
		tf.partN = 0
		t.emit(tf, line, end, p)
		return
	}
	re := t.cfg.multiline
	if re == nil {
		t.emit(tf, line, end, nil)
		return
	}
	if re.Match(line) || tf.group == nil || len(tf.group)+1+len(line) > t.cfg.MaxLineBytes {
		t.flushGroup(tf)
		if !re.Match(line) {
			// A continuation with nothing to continue (the start was before our
			// checkpoint, or the group hit the size limit): a record of its own.
			t.emit(tf, line, end, nil)
			return
		}
		tf.group = append(tf.group[:0:0], line...)
	} else {
		tf.group = append(append(tf.group, '\n'), line...)
	}
	tf.groupEnd, tf.groupAt = end, t.now
}

func (t *tailer) flushGroup(tf *tailFile) {
	if tf.group == nil {
		return
	}
	g := tf.group
	tf.group = nil
	t.emit(tf, g, tf.groupEnd, nil)
}

// emit adds a record ending at file offset end to out. Its line is copied:
// the file's buffer moves on before the record is taken.
func (t *tailer) emit(tf *tailFile, line []byte, end int64, p *partial) {
	at := len(t.arena)
	t.arena = append(t.arena, line...)
	t.out = append(t.out, entry{
		rec: record{t: t.now, line: t.arena[at:len(t.arena):len(t.arena)], file: tf.path, partial: p},
		pos: position{Dev: tf.id.Dev, Ino: tf.id.Ino, FP: tf.fp, FPLen: tf.fpLen, Offset: end, Path: tf.path},
	})
}
