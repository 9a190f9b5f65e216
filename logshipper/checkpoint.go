package logshipper

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
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

type checkpointFile struct {
	Version  int        `json:"version"`
	AckedSeq uint64     `json:"acked_seq"`
	Files    []position `json:"files"`
}

const checkpointName = "checkpoint.json"

// prepareAheadBatches is how many batches ahead of the sender their checkpoint
// is written: not the whole queue, since during a long outage that would be
// thousands of fsyncs for batches that wait anyway.
const prepareAheadBatches = 8

// checkpoint is the durable record of the acknowledged positions. Each batch's
// checkpoint (every batch before it acked too) is computed when the batch is
// queued and written and fsynced ahead of the sender, several at a time (the
// journal commits them together), so committing after an ack is only a rename,
// even when the disk is slow.
type checkpoint struct {
	dir   string
	slots chan struct{} // concurrent fsyncs

	mu        sync.Mutex
	projected map[fileID]position // positions once every projected batch is acked
	writes    map[uint64]*cpWrite // by batch sequence number, until committed
}

// cpWrite is the checkpoint one batch's ack makes current.
type cpWrite struct {
	files   map[fileID]position
	started bool
	done    chan cpPrepared
}

type cpPrepared struct {
	tmp string
	err error
}

// openCheckpoint loads dir's checkpoint; acked is the last batch it covers.
func openCheckpoint(dir string) (cp *checkpoint, acked uint64, err error) {
	cp = &checkpoint{dir: dir, slots: make(chan struct{}, 4), projected: map[fileID]position{}, writes: map[uint64]*cpWrite{}}
	if old, _ := filepath.Glob(filepath.Join(dir, ".checkpoint-*.tmp")); len(old) > 0 {
		for _, o := range old {
			os.Remove(o) // prepared for a batch whose ack never came
		}
	}
	b, err := os.ReadFile(filepath.Join(dir, checkpointName))
	switch {
	case errors.Is(err, os.ErrNotExist):
		return cp, 0, nil
	case err != nil:
		return nil, 0, err
	}
	var f checkpointFile
	if err := json.Unmarshal(b, &f); err != nil {
		return nil, 0, fmt.Errorf("checkpoint %s is corrupt (%v); move it away to start over", filepath.Join(dir, checkpointName), err)
	}
	for _, p := range f.Files {
		cp.projected[p.id()] = p
	}
	return cp, f.AckedSeq, nil
}

// project records what the checkpoint holds once b is acked. Called in
// sequence order, before b can be sent.
func (cp *checkpoint) project(b *batch) {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	for _, p := range b.Positions {
		cp.projected[p.id()] = p
	}
	for _, id := range b.Forget {
		delete(cp.projected, id)
	}
	files := make(map[fileID]position, len(cp.projected))
	for id, p := range cp.projected {
		files[id] = p
	}
	cp.writes[b.Seq] = &cpWrite{files: files, done: make(chan cpPrepared, 1)}
}

// positions returns where reading goes on for each known file: the checkpoint
// with every projected batch applied (at start-up: the batches still spooled).
func (cp *checkpoint) positions() map[fileID]position {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	out := make(map[fileID]position, len(cp.projected))
	for id, p := range cp.projected {
		out[id] = p
	}
	return out
}

// prepareAhead starts writing the checkpoints of the given batches, the next
// ones to be sent; those already started are skipped.
func (cp *checkpoint) prepareAhead(seqs []uint64) {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	for _, seq := range seqs {
		w := cp.writes[seq]
		if w == nil || w.started {
			continue
		}
		w.started = true
		go func() {
			cp.slots <- struct{}{}
			tmp, err := cp.write(seq, w.files)
			<-cp.slots
			w.done <- cpPrepared{tmp, err}
		}()
	}
}

// write writes and fsyncs the checkpoint that seq's ack will make current.
func (cp *checkpoint) write(seq uint64, files map[fileID]position) (string, error) {
	f := checkpointFile{Version: 1, AckedSeq: seq, Files: make([]position, 0, len(files))}
	for _, p := range files {
		f.Files = append(f.Files, p)
	}
	sort.Slice(f.Files, func(i, j int) bool { return f.Files[i].Path < f.Files[j].Path })
	data, err := json.Marshal(f)
	if err != nil {
		return "", err
	}
	tmp := filepath.Join(cp.dir, fmt.Sprintf(".checkpoint-%d.tmp", seq))
	if err := writeFile(tmp, true, data); err != nil {
		return "", fmt.Errorf("write checkpoint: %w", err)
	}
	return tmp, nil
}

// commit makes seq's checkpoint current. Called in sequence order, only after
// the batch was acked.
func (cp *checkpoint) commit(ctx context.Context, seq uint64) error {
	cp.mu.Lock()
	w := cp.writes[seq]
	cp.mu.Unlock()
	cp.prepareAhead([]uint64{seq}) // normally long started
	p := <-w.done
	for p.err != nil {
		// The data is delivered: a failing state dir is no reason to resend it.
		retry := time.NewTimer(time.Second)
		select {
		case <-ctx.Done():
			retry.Stop()
			return p.err
		case <-retry.C:
		}
		p.tmp, p.err = cp.write(seq, w.files)
	}
	if err := os.Rename(p.tmp, filepath.Join(cp.dir, checkpointName)); err != nil {
		return fmt.Errorf("commit checkpoint: %w", err)
	}
	cp.mu.Lock()
	delete(cp.writes, seq)
	cp.mu.Unlock()
	return nil
}
