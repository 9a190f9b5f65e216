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
	frame []byte // nil when only on disk (memory stays bounded while the receiver is down)
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
	readerDone bool
}

const checkpointName = "checkpoint.json"

// inMemoryBatches is how many queued batches keep their frame in memory; the
// rest are read back from the spool when their turn comes.
const inMemoryBatches = 4

// openState loads the checkpoint and the spool. resume is where reading goes on
// for each known file: the checkpoint overlaid with the batches still spooled.
func openState(dir string, max int64) (st *state, resume map[fileID]position, err error) {
	st = &state{dir: dir, spool: filepath.Join(dir, "spool"), max: max, changed: make(chan struct{}), files: map[fileID]position{}}
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

// add spools b, first waiting while the spool is full. whileWaiting runs now
// and then during the wait (the reader keeps discovering files so a rotation
// during backpressure does not lose one). The spool file is written without
// fsync: it survives a crash of the process; the state dir is an emptyDir,
// which does not outlive the node anyway.
func (st *state) add(ctx context.Context, b *batch, whileWaiting func()) error {
	b.CRC = crc32.ChecksumIEEE(b.frame)
	b.Size = len(b.frame)
	for {
		st.mu.Lock()
		full := st.bytes > 0 && st.bytes+int64(b.Size) > st.max
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
	head, err := json.Marshal(b.batchMeta)
	if err != nil {
		return err
	}
	path := st.batchPath(b.Seq)
	if err := writeFile(path, false, head, []byte{'\n'}, b.frame); err != nil {
		return fmt.Errorf("spool batch: %w", err)
	}
	st.mu.Lock()
	if len(st.queue)-st.sent >= inMemoryBatches {
		b.frame = nil
	}
	st.queue = append(st.queue, b)
	st.bytes += int64(b.Size)
	st.notify()
	st.mu.Unlock()
	return nil
}

// finishReading tells the sender no more batches will come.
func (st *state) finishReading() {
	st.mu.Lock()
	st.readerDone = true
	st.notify()
	st.mu.Unlock()
}

// next returns the oldest batch not yet handed out, waiting for one; io.EOF
// once the reader finished and everything was handed out.
func (st *state) next(ctx context.Context) (*batch, error) {
	for {
		st.mu.Lock()
		if st.sent < len(st.queue) {
			b := st.queue[st.sent]
			st.sent++
			st.mu.Unlock()
			if b.frame == nil {
				full, err := readBatch(st.batchPath(b.Seq), true)
				if err != nil {
					return nil, fmt.Errorf("read spooled batch %d: %w", b.Seq, err)
				}
				b.frame = full.frame
			}
			return b, nil
		}
		if st.readerDone {
			st.mu.Unlock()
			return nil, io.EOF
		}
		ch := st.changed
		st.mu.Unlock()
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-ch:
		}
	}
}

// prepare writes and fsyncs the checkpoint that b's ack will make current, so
// the fsync overlaps the network round trip and commit is only a rename.
func (st *state) prepare(b *batch) (string, error) {
	st.mu.Lock()
	files := make(map[fileID]position, len(st.files)+len(b.Positions))
	for id, p := range st.files {
		files[id] = p
	}
	st.mu.Unlock()
	for _, p := range b.Positions {
		files[p.id()] = p
	}
	for _, id := range b.Forget {
		delete(files, id)
	}
	cp := checkpointFile{Version: 1, AckedSeq: b.Seq, Files: make([]position, 0, len(files))}
	for _, p := range files {
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
func (st *state) commit(b *batch, tmp string) error {
	if err := os.Rename(tmp, filepath.Join(st.dir, checkpointName)); err != nil {
		return fmt.Errorf("commit checkpoint: %w", err)
	}
	if err := os.Remove(st.batchPath(b.Seq)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove acked batch: %w", err)
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	for _, p := range b.Positions {
		st.files[p.id()] = p
	}
	for _, id := range b.Forget {
		delete(st.files, id)
	}
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
