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
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
)

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

// batch is one frame ready to send, kept in the spool until acked.
type batch struct {
	batchMeta
	frame   []byte // nil when only on disk (memory stays bounded while the receiver is down)
	spooled bool   // written to disk
}

// Batches wait in memory up to inMemoryBytes (enough to keep the sender busy
// while the reader runs ahead); beyond it (only while the receiver fails) they
// are written to disk, and all but the next inMemoryBatches are read back from
// there when their turn comes.
const (
	inMemoryBytes   = 8 << 20
	inMemoryBatches = 4
)

// spool holds the unacknowledged batches in sequence order, bounded by
// LOGSHIP_BUFFER_MAX_BYTES. The reader adds batches (waiting while it is full:
// backpressure), the sender takes them in order and removes each once its ack
// is checkpointed.
//
// While the receiver accepts batches, they stay in memory only (up to
// inMemoryBytes, then the reader waits: the log files are the buffer) and after
// a crash are read again from the checkpoint. While it fails, more than
// inMemoryBytes may wait: then every waiting batch is written to disk, oldest
// first, so the disk always holds a contiguous run of batches from the oldest
// unacked one on: resume positions stay exact, and the lines survive their
// files being rotated away. Spool files are written without fsync: they survive
// a crash of the process; the state dir is an emptyDir, which does not outlive
// the node anyway.
type spool struct {
	dir   string
	max   int64
	gauge prometheus.Gauge // buffer_bytes

	mu      sync.Mutex
	changed chan struct{} // closed and replaced on every change
	queue   []*batch
	sent    int // batches of queue handed to the sender
	bytes   int64
	closed  bool // no more batches will be added
	failing bool // the sender is retrying: batches go to disk
}

// openSpool loads the batches spooled after acked, the last batch the
// checkpoint covers, and returns them in order.
func openSpool(stateDir string, max int64, acked uint64, gauge prometheus.Gauge) (*spool, []*batch, error) {
	sp := &spool{dir: filepath.Join(stateDir, "spool"), max: max, gauge: gauge, changed: make(chan struct{})}
	if err := os.MkdirAll(sp.dir, 0o755); err != nil {
		return nil, nil, err
	}
	seqs, err := sp.list()
	if err != nil {
		return nil, nil, err
	}
	broken := false
	for _, seq := range seqs {
		path := sp.path(seq)
		if seq <= acked || broken {
			os.Remove(path) // acked (the process died before deleting it), or after a gap
			continue
		}
		b, err := readBatch(path, false)
		if err != nil || b.Seq != seq || seq != acked+1+uint64(len(sp.queue)) {
			// A gap or a torn file: everything from here on is read again from the
			// log files instead (duplicates rather than a hole).
			broken = true
			os.Remove(path)
			continue
		}
		b.spooled = true
		sp.queue = append(sp.queue, b)
		sp.resize(int64(b.Size))
	}
	return sp, slices.Clone(sp.queue), nil
}

// list returns the sequence numbers on disk, in order, and removes files a
// crash left half-written.
func (sp *spool) list() ([]uint64, error) {
	entries, err := os.ReadDir(sp.dir)
	if err != nil {
		return nil, err
	}
	var seqs []uint64
	for _, e := range entries {
		name := e.Name()
		if strings.HasSuffix(name, ".tmp") {
			os.Remove(filepath.Join(sp.dir, name))
			continue
		}
		seq, err := strconv.ParseUint(strings.TrimSuffix(name, ".batch"), 10, 64)
		if err != nil || !strings.HasSuffix(name, ".batch") {
			continue
		}
		seqs = append(seqs, seq)
	}
	sort.Slice(seqs, func(i, j int) bool { return seqs[i] < seqs[j] })
	return seqs, nil
}

func (sp *spool) path(seq uint64) string {
	return filepath.Join(sp.dir, fmt.Sprintf("%020d.batch", seq))
}

// readBatch opens by path: LOGSHIP_STATE_DIR is the logshipper's own volume
// (podkeeper-state, mounted in no other container), not one the app can
// write, unlike the log directories, which are read through agents/safefs.
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
func (sp *spool) notify() {
	close(sp.changed)
	sp.changed = make(chan struct{})
}

// resize is the one place the spooled bytes change; callers hold mu.
func (sp *spool) resize(delta int64) {
	sp.bytes += delta
	sp.gauge.Set(float64(sp.bytes))
}

// waiting is the size of the batches not handed to the sender; callers hold mu.
func (sp *spool) waiting() int64 {
	n := int64(0)
	for _, q := range sp.queue[sp.sent:] {
		n += int64(q.Size)
	}
	return n
}

// isAcked tells whether q left the queue; callers hold mu. The queue is a
// contiguous run of sequence numbers, so its head says.
func (sp *spool) isAcked(q *batch) bool {
	return len(sp.queue) == 0 || q.Seq < sp.queue[0].Seq
}

// add queues b, or returns a channel closed at the next change when there is
// no room for it yet.
func (sp *spool) add(b *batch) (full <-chan struct{}) {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	over := sp.bytes > 0 && sp.bytes+int64(b.Size) > sp.max
	// A receiver that is up but slower than the reader gets backpressure at the
	// memory budget (the log files are the buffer); only one that fails makes
	// batches go to disk.
	over = over || (!sp.failing && sp.waiting() > 0 && sp.waiting()+int64(b.Size) > inMemoryBytes)
	if over {
		return sp.changed
	}
	sp.queue = append(sp.queue, b)
	sp.resize(int64(b.Size))
	sp.notify()
	return nil
}

// spill writes the waiting batches to disk once more than inMemoryBytes wait,
// and lets go of the frames on disk that are not next in line. It can be
// retried: what is on disk already is skipped.
func (sp *spool) spill() error {
	sp.mu.Lock()
	var todo []*batch
	if sp.waiting() > inMemoryBytes {
		for _, q := range sp.queue {
			if !q.spooled && q.frame != nil {
				todo = append(todo, q)
			}
		}
	}
	sp.mu.Unlock()
	for _, q := range todo {
		if err := sp.write(q); err != nil {
			return fmt.Errorf("spool batch: %w", err)
		}
	}
	sp.mu.Lock()
	for i := sp.sent + inMemoryBatches; i < len(sp.queue); i++ {
		if sp.queue[i].spooled {
			sp.queue[i].frame = nil // read back when its turn comes
		}
	}
	sp.mu.Unlock()
	return nil
}

// write puts q on disk, outside the lock: the sender goes on meanwhile.
func (sp *spool) write(q *batch) error {
	sp.mu.Lock()
	frame, acked := q.frame, sp.isAcked(q)
	sp.mu.Unlock()
	if acked {
		return nil
	}
	head, err := json.Marshal(q.batchMeta)
	if err != nil {
		return err
	}
	if err := writeFile(sp.path(q.Seq), false, head, []byte{'\n'}, frame); err != nil {
		return err
	}
	sp.mu.Lock()
	defer sp.mu.Unlock()
	q.spooled = true
	if sp.isAcked(q) {
		os.Remove(sp.path(q.Seq)) // acked while being written
	}
	return nil
}

// setFailing records whether the receiver currently refuses batches and
// reports whether that changed.
func (sp *spool) setFailing(f bool) bool {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if sp.failing == f {
		return false
	}
	sp.failing = f
	sp.notify()
	return true
}

// close tells the sender no more batches will come.
func (sp *spool) close() {
	sp.mu.Lock()
	sp.closed = true
	sp.notify()
	sp.mu.Unlock()
}

// next returns the oldest batch not yet handed out and its frame, waiting for
// one; io.EOF once the spool is closed and everything was handed out.
func (sp *spool) next(ctx context.Context) (*batch, []byte, error) {
	for {
		sp.mu.Lock()
		if sp.sent < len(sp.queue) {
			b := sp.queue[sp.sent]
			sp.sent++
			frame := b.frame
			sp.mu.Unlock()
			if frame == nil {
				full, err := readBatch(sp.path(b.Seq), true)
				if err != nil {
					return nil, nil, fmt.Errorf("read spooled batch %d: %w", b.Seq, err)
				}
				frame = full.frame
			}
			return b, frame, nil
		}
		if sp.closed {
			sp.mu.Unlock()
			return nil, nil, io.EOF
		}
		ch := sp.changed
		sp.mu.Unlock()
		select {
		case <-ctx.Done():
			return nil, nil, ctx.Err()
		case <-ch:
		}
	}
}

// upcoming returns the sequence numbers of the oldest unacked batches up to n
// past those handed to the sender.
func (sp *spool) upcoming(n int) []uint64 {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	seqs := make([]uint64, 0, n)
	for i := 0; i < len(sp.queue) && i < sp.sent+n; i++ {
		seqs = append(seqs, sp.queue[i].Seq)
	}
	return seqs
}

// remove frees the place of b, the oldest batch, once its ack is checkpointed.
func (sp *spool) remove(b *batch) error {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if b.spooled {
		if err := os.Remove(sp.path(b.Seq)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("remove acked batch: %w", err)
		}
	}
	if len(sp.queue) > 0 && sp.queue[0] == b {
		sp.queue = sp.queue[1:]
		sp.sent--
	}
	sp.resize(-int64(b.Size))
	b.frame = nil
	sp.notify()
	return nil
}

// pending reports the batches and records not yet acked.
func (sp *spool) pending() (batches, records int) {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	for _, b := range sp.queue {
		records += b.Records
	}
	return len(sp.queue), records
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
