package logshipper

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

// fileID names an open file for as long as it is open: the kernel cannot reuse
// an inode that a descriptor still holds.
type fileID struct{ Dev, Ino uint64 }

// position is how far a file's lines have been turned into records. FP is a hash
// of the file's first FPLen bytes: after a restart it tells a reused inode from
// the file the checkpoint was written for.
type position struct {
	Dev    uint64 `json:"dev"`
	Ino    uint64 `json:"ino"`
	FP     string `json:"fp"`
	FPLen  int    `json:"fp_len"`
	Offset int64  `json:"offset"`
	Path   string `json:"path"`
}

func (p position) id() fileID { return fileID{p.Dev, p.Ino} }

// batchMeta is the header of a spooled batch.
type batchMeta struct {
	Seq       uint64     `json:"seq"`
	Chunk     string     `json:"chunk"`
	Records   int        `json:"records"`
	LineBytes int        `json:"line_bytes"`
	Positions []position `json:"positions,omitempty"`
	Forget    []fileID   `json:"forget,omitempty"` // files closed for good: drop them from the checkpoint
	Size      int        `json:"size"`             // frame bytes
	CRC       uint32     `json:"crc"`
}

// batch is one frame ready to send, spooled in the state dir until acked.
type batch struct {
	batchMeta
	frame   []byte // nil when only on disk (memory stays bounded while the receiver is down)
	spooled bool   // written to the spool

	cp          map[fileID]position // the checkpoint once this batch is acked
	prepared    chan prepared       // its temp file, written and fsynced
	prepStarted bool
}

type checkpointFile struct {
	Version  int        `json:"version"`
	AckedSeq uint64     `json:"acked_seq"`
	Files    []position `json:"files"`
}

// state owns the checkpoint and the spool of unacknowledged batches. The reader
// adds batches (blocking when the spool is full: backpressure), the sender takes
// them in order and commits each after its ack.
type state struct {
	dir, spool string
	max        int64

	mu         sync.Mutex
	changed    chan struct{} // closed and replaced on every change
	queue      []*batch
	sent       int // batches of queue handed to the sender
	bytes      int64
	nextSeq    uint64
	acked      uint64
	files      map[fileID]position // acked positions
	projected  map[fileID]position // positions once every queued batch is acked
	syncSlots  chan struct{}       // concurrent checkpoint fsyncs
	readerDone bool
	failing    bool // the sender is retrying: batches go to the spool
}

const checkpointName = "checkpoint.json"

// Batches wait in memory up to inMemoryBytes (enough to keep the sender busy
// while the reader runs ahead); beyond it (only while the receiver fails) they
// are spooled, and all but the next inMemoryBatches are read back from the
// spool when their turn comes.
const (
	inMemoryBytes   = 8 << 20
	inMemoryBatches = 4
)

// openState loads the checkpoint and the spool. resume is where reading goes on
// for each known file: the checkpoint overlaid with the batches still spooled.
func openState(dir string, max int64) (st *state, resume map[fileID]position, err error) {
	st = &state{dir: dir, spool: filepath.Join(dir, "spool"), max: max, changed: make(chan struct{}),
		files: map[fileID]position{}, projected: map[fileID]position{}, syncSlots: make(chan struct{}, 4)}
	if err := os.MkdirAll(st.spool, 0o755); err != nil {
		return nil, nil, err
	}
	if old, _ := filepath.Glob(filepath.Join(dir, ".checkpoint-*.tmp")); len(old) > 0 {
		for _, o := range old {
			os.Remove(o) // prepared for a batch whose ack never came
		}
	}
	b, err := os.ReadFile(filepath.Join(dir, checkpointName))
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return nil, nil, err
	default:
		var cp checkpointFile
		if err := json.Unmarshal(b, &cp); err != nil {
			return nil, nil, fmt.Errorf("checkpoint %s is corrupt (%v); move it away to start over", filepath.Join(dir, checkpointName), err)
		}
		st.acked = cp.AckedSeq
		for _, p := range cp.Files {
			st.files[p.id()] = p
		}
	}
	resume = map[fileID]position{}
	for id, p := range st.files {
		resume[id] = p
		st.projected[id] = p
	}
	st.nextSeq = st.acked + 1
	entries, err := os.ReadDir(st.spool)
	if err != nil {
		return nil, nil, err
	}
	var seqs []uint64
	for _, e := range entries {
		name := e.Name()
		if strings.HasSuffix(name, ".tmp") {
			os.Remove(filepath.Join(st.spool, name))
			continue
		}
		seq, err := strconv.ParseUint(strings.TrimSuffix(name, ".batch"), 10, 64)
		if err != nil || !strings.HasSuffix(name, ".batch") {
			continue
		}
		seqs = append(seqs, seq)
	}
	sort.Slice(seqs, func(i, j int) bool { return seqs[i] < seqs[j] })
	broken := false
	for _, seq := range seqs {
		path := st.batchPath(seq)
		if seq <= st.acked {
			os.Remove(path) // acked, the process died before deleting it
			continue
		}
		if broken {
			os.Remove(path)
			continue
		}
		b, err := readBatch(path, false)
		if err != nil || b.Seq != seq || seq != st.nextSeq {
			// A gap or a torn file: everything from here on is read again from the
			// log files instead (duplicates rather than a hole).
			broken = true
			os.Remove(path)
			continue
		}
		b.spooled = true
		st.project(b)
		st.queue = append(st.queue, b)
		st.bytes += int64(b.Size)
		st.nextSeq = seq + 1
		for _, p := range b.Positions {
			resume[p.id()] = p
		}
		for _, id := range b.Forget {
			delete(resume, id)
		}
	}
	return st, resume, nil
}

func (st *state) batchPath(seq uint64) string {
	return filepath.Join(st.spool, fmt.Sprintf("%020d.batch", seq))
}

func readBatch(path string, withFrame bool) (*batch, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	r := bufio.NewReader(f)
	head, err := r.ReadBytes('\n')
	if err != nil {
		return nil, err
	}
	b := &batch{}
	if err := json.Unmarshal(head, &b.batchMeta); err != nil {
		return nil, err
	}
	frame := make([]byte, b.Size)
	if _, err := io.ReadFull(r, frame); err != nil {
		return nil, err
	}
	if crc32.ChecksumIEEE(frame) != b.CRC {
		return nil, fmt.Errorf("spooled batch %s: checksum mismatch", path)
	}
	if withFrame {
		b.frame = frame
	}
	return b, nil
}

// notify wakes every waiter; callers hold mu.
func (st *state) notify() {
	close(st.changed)
	st.changed = make(chan struct{})
}

// seq reserves the next batch number.
func (st *state) seq() uint64 {
	st.mu.Lock()
	defer st.mu.Unlock()
	s := st.nextSeq
	st.nextSeq++
	return s
}

// add queues b, first waiting while the buffer is full. whileWaiting runs now
// and then during the wait (the reader keeps discovering files so a rotation
// during backpressure does not lose one).
//
// While the receiver accepts batches, they stay in memory only (up to
// inMemoryBytes, then the reader waits: the log files are the buffer) and after
// a crash are read again from the checkpoint. While it fails, more than
// inMemoryBytes may wait: then every waiting batch is written to the spool,
// oldest first, so the spool always holds a contiguous run of batches from the oldest
// unacked one on: resume positions stay exact, and the lines survive their
// files being rotated away. Spool files are written without fsync: they
// survive a crash of the process; the state dir is an emptyDir, which does not
// outlive the node anyway.
func (st *state) add(ctx context.Context, b *batch, whileWaiting func()) error {
	b.CRC = crc32.ChecksumIEEE(b.frame)
	b.Size = len(b.frame)
	for {
		st.mu.Lock()
		full := st.bytes > 0 && st.bytes+int64(b.Size) > st.max
		// A receiver that is up but slower than the reader gets backpressure at
		// the memory budget (the log files are the buffer); only one that fails
		// makes batches go to the spool.
		full = full || (!st.failing && st.waiting() > 0 && st.waiting()+int64(b.Size) > inMemoryBytes)
		ch := st.changed
		st.mu.Unlock()
		if !full {
			break
		}
		if whileWaiting != nil {
			whileWaiting()
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-ch:
		case <-timeAfter(waitRescan):
		}
	}
	st.mu.Lock()
	st.project(b)
	st.queue = append(st.queue, b)
	st.bytes += int64(b.Size)
	st.prepareAhead()
	var toSpool []*batch
	if st.waiting() > inMemoryBytes {
		for _, q := range st.queue {
			if !q.spooled && q.frame != nil {
				toSpool = append(toSpool, q)
			}
		}
	}
	st.notify()
	st.mu.Unlock()
	for _, q := range toSpool {
		st.mu.Lock()
		frame, acked := q.frame, q.Seq <= st.acked
		st.mu.Unlock()
		if acked {
			continue
		}
		head, err := json.Marshal(q.batchMeta)
		if err != nil {
			return err
		}
		if err := writeFile(st.batchPath(q.Seq), false, head, []byte{'\n'}, frame); err != nil {
			return fmt.Errorf("spool batch: %w", err)
		}
		st.mu.Lock()
		q.spooled = true
		if q.Seq <= st.acked {
			os.Remove(st.batchPath(q.Seq)) // acked while being written
		}
		st.mu.Unlock()
	}
	st.mu.Lock()
	for i := st.sent + inMemoryBatches; i < len(st.queue); i++ {
		if st.queue[i].spooled {
			st.queue[i].frame = nil // read back when its turn comes
		}
	}
	st.mu.Unlock()
	return nil
}

// waiting is the size of the batches not handed to the sender; callers hold mu.
func (st *state) waiting() int64 {
	n := int64(0)
	for _, q := range st.queue[st.sent:] {
		n += int64(q.Size)
	}
	return n
}

// setFailing records whether the receiver currently refuses batches.
func (st *state) setFailing(f bool) {
	st.mu.Lock()
	if st.failing != f {
		st.failing = f
		st.notify()
	}
	st.mu.Unlock()
}

// finishReading tells the sender no more batches will come.
func (st *state) finishReading() {
	st.mu.Lock()
	st.readerDone = true
	st.notify()
	st.mu.Unlock()
}

// next returns the oldest batch not yet handed out and its frame, waiting for
// one; io.EOF once the reader finished and everything was handed out.
func (st *state) next(ctx context.Context) (*batch, []byte, error) {
	for {
		st.mu.Lock()
		if st.sent < len(st.queue) {
			b := st.queue[st.sent]
			st.sent++
			st.prepareAhead()
			frame := b.frame
			st.mu.Unlock()
			if frame == nil {
				full, err := readBatch(st.batchPath(b.Seq), true)
				if err != nil {
					return nil, nil, fmt.Errorf("read spooled batch %d: %w", b.Seq, err)
				}
				frame = full.frame
			}
			return b, frame, nil
		}
		if st.readerDone {
			st.mu.Unlock()
			return nil, nil, io.EOF
		}
		ch := st.changed
		st.mu.Unlock()
		select {
		case <-ctx.Done():
			return nil, nil, ctx.Err()
		case <-ch:
		}
	}
}

// project records what the checkpoint will hold once b is acked (everything
// queued before b committed first) and starts writing and fsyncing it. The
// fsyncs of queued batches run ahead of the sender, several at a time (the
// journal commits them together), so the commit after an ack is only a
// rename, even when the disk is slow. Callers hold mu, in sequence order.
func (st *state) project(b *batch) {
	for _, p := range b.Positions {
		st.projected[p.id()] = p
	}
	for _, id := range b.Forget {
		delete(st.projected, id)
	}
	b.cp = make(map[fileID]position, len(st.projected))
	for id, p := range st.projected {
		b.cp[id] = p
	}
	b.prepared = make(chan prepared, 1)
}

// prepareAhead starts the checkpoint writes of the next batches to send, a few
// ahead of the sender (not the whole queue: during a long outage that would be
// thousands of fsyncs for batches that wait anyway). Callers hold mu.
func (st *state) prepareAhead() {
	for i := 0; i < len(st.queue) && i < st.sent+prepareAheadBatches; i++ {
		b := st.queue[i]
		if b.prepStarted {
			continue
		}
		b.prepStarted = true
		go func() {
			st.syncSlots <- struct{}{}
			tmp, err := st.prepare(b)
			<-st.syncSlots
			b.prepared <- prepared{tmp, err}
		}()
	}
}

const prepareAheadBatches = 8

type prepared struct {
	tmp string
	err error
}

// prepare writes and fsyncs the checkpoint that b's ack will make current.
func (st *state) prepare(b *batch) (string, error) {
	cp := checkpointFile{Version: 1, AckedSeq: b.Seq, Files: make([]position, 0, len(b.cp))}
	for _, p := range b.cp {
		cp.Files = append(cp.Files, p)
	}
	sort.Slice(cp.Files, func(i, j int) bool { return cp.Files[i].Path < cp.Files[j].Path })
	data, err := json.Marshal(cp)
	if err != nil {
		return "", err
	}
	tmp := filepath.Join(st.dir, fmt.Sprintf(".checkpoint-%d.tmp", b.Seq))
	if err := writeFile(tmp, true, data); err != nil {
		return "", fmt.Errorf("write checkpoint: %w", err)
	}
	return tmp, nil
}

// commit makes b's checkpoint current and frees its spool space. Called in
// sequence order, only after b was acked.
func (st *state) commit(ctx context.Context, b *batch) error {
	p := <-b.prepared
	for p.err != nil {
		// The data is delivered: a failing state dir is no reason to resend it.
		select {
		case <-ctx.Done():
			return p.err
		case <-timeAfter(time.Second):
		}
		p.tmp, p.err = st.prepare(b)
	}
	if err := os.Rename(p.tmp, filepath.Join(st.dir, checkpointName)); err != nil {
		return fmt.Errorf("commit checkpoint: %w", err)
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	if b.spooled {
		if err := os.Remove(st.batchPath(b.Seq)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("remove acked batch: %w", err)
		}
	}
	st.files = b.cp
	b.cp = nil
	st.acked = b.Seq
	if len(st.queue) > 0 && st.queue[0] == b {
		st.queue = st.queue[1:]
		st.sent--
	}
	st.bytes -= int64(b.Size)
	b.frame = nil
	st.notify()
	return nil
}

// pending reports the batches and records not yet acked.
func (st *state) pending() (batches, records int, bytes int64) {
	st.mu.Lock()
	defer st.mu.Unlock()
	for _, b := range st.queue {
		records += b.Records
	}
	return len(st.queue), records, st.bytes
}

func writeFile(path string, sync bool, parts ...[]byte) error {
	tmp := path
	if !strings.HasSuffix(path, ".tmp") {
		tmp = path + ".tmp"
	}
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	var werr error
	for _, p := range parts {
		if _, werr = f.Write(p); werr != nil {
			break
		}
	}
	if werr == nil && sync {
		werr = f.Sync()
	}
	if cerr := f.Close(); werr == nil {
		werr = cerr
	}
	if werr != nil {
		os.Remove(tmp)
		return werr
	}
	if tmp != path {
		return os.Rename(tmp, path)
	}
	return nil
}
