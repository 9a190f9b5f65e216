package logshipper

import (
	"hash/crc32"
	"time"
)

// batcher turns the tailer's entries into batches: it owns the encoder and
// the positions of what it encoded, and seals a batch when it is full or its
// oldest record waited LOGSHIP_BATCH_WAIT.
type batcher struct {
	cfg *Config
	m   *metrics
	enc *encoder

	seq       uint64              // of the next batch
	positions map[fileID]position // where each file stands after the open batch
	forget    []fileID
	start     time.Time // when the open batch's first record was read
}

func newBatcher(cfg *Config, m *metrics, enc *encoder, seq uint64) *batcher {
	return &batcher{cfg: cfg, m: m, enc: enc, seq: seq, positions: map[fileID]position{}}
}

// add takes one entry and returns the batch it completed, if any.
func (bt *batcher) add(e *entry) (*batch, error) {
	if e.forget {
		bt.forget = append(bt.forget, e.pos.id())
		return nil, nil
	}
	bt.enc.add(&e.rec)
	bt.m.recordsRead.Inc()
	bt.m.bytesRead.Add(float64(len(e.rec.line)))
	bt.positions[e.pos.id()] = e.pos
	if bt.start.IsZero() {
		bt.start = e.rec.t
	}
	if bt.enc.records >= bt.cfg.BatchRecords || bt.enc.lineBytes >= bt.cfg.BatchBytes {
		return bt.seal()
	}
	return nil, nil
}

// deadline is when the open batch is due; false when there is none.
func (bt *batcher) deadline() (time.Time, bool) {
	return bt.start.Add(bt.cfg.BatchWait), !bt.start.IsZero()
}

// seal ends the open batch; nil when it holds no record (files to forget
// wait for one).
func (bt *batcher) seal() (*batch, error) {
	if bt.enc.empty() {
		return nil, nil
	}
	b := &batch{batchMeta: batchMeta{Seq: bt.seq, Records: bt.enc.records, LineBytes: bt.enc.lineBytes, Forget: bt.forget}}
	if bt.cfg.Output == "forward" && bt.cfg.FluentAck {
		b.Chunk = newChunkID()
	}
	for _, p := range bt.positions {
		b.Positions = append(b.Positions, p)
	}
	frame, err := bt.enc.frame(bt.cfg.FluentTag, b.Chunk, bt.cfg.FluentCompress == "gzip")
	if err != nil {
		return nil, err
	}
	b.frame, b.Size, b.CRC = frame, len(frame), crc32.ChecksumIEEE(frame)
	bt.seq++
	bt.positions, bt.forget, bt.start = map[fileID]position{}, nil, time.Time{}
	return b, nil
}
