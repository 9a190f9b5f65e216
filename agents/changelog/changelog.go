// Package changelog is the append-only change log that lets any number of
// writers share one prefix (format podkeeper.log.v1):
//
//	PREFIX/log/T-W.json.gz   one batch of changes by writer W, stamped T
//
// T is the writer's UTC clock as 20060102T150405.000000000Z, so keys sort by
// time; W is a short hash of the writer's identity (namespace, Pod, UID), so
// two writers never create the same key, and a key is created with
// If-None-Match so not even a retry overwrites one.
//
// The state of the prefix at any instant is the fold of a checkpoint (a
// podkeeper.snapshot.v1 manifest) and the batches after it: per path, the
// change with the newest mtime wins, ties broken by the greater writer id (the
// source article's rule, section 2.5). That rule is a last-writer-wins
// register per path: commutative, associative and idempotent, so batches can
// be applied in any order and more than once. A checkpoint therefore folds
// only batches older than its horizon minus Margin, and readers re-apply
// everything after the horizon minus Margin: a batch whose PUT landed late
// (its stamp is from before the PUT) is never lost between the two.
package changelog

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/podkeeper/podkeeper/agents/snapshot"
	"github.com/podkeeper/podkeeper/agents/store"
)

// Format names this version of the batch format.
const Format = "podkeeper.log.v1"

// Dir holds the batches.
const Dir = "log/"

// Margin is how late a batch may land after its stamp and still be folded
// correctly: writers give up on a PUT (and retry under a new stamp) well
// before it.
const Margin = time.Minute

// MaxBatchBytes caps one batch after decompression (a batch is about one
// second of uploads, so this is generous) against hostile objects.
const MaxBatchBytes = 64 << 20

// Writer identifies one syncer: a Pod, by namespace, name and UID (a
// replacement Pod of the same name is another writer).
type Writer struct {
	Namespace string `json:"namespace"`
	Pod       string `json:"pod"`
	UID       string `json:"uid"`
}

// ID is the writer's identity as one string, the tie-breaker of the rule.
func (w Writer) ID() string { return w.Namespace + "/" + w.Pod + "/" + w.UID }

// short is the key suffix for w: stable, fixed length, no characters that
// need escaping in a key.
func (w Writer) short() string {
	h := sha256.Sum256([]byte(w.ID()))
	return hex.EncodeToString(h[:8])
}

// Change is one file written or deleted. A deletion carries the path and the
// time the writer saw it go (in MTime); its other fields are empty.
type Change struct {
	snapshot.File
	Deleted bool `json:"deleted,omitempty"`
}

// Batch is one log object.
type Batch struct {
	Format  string    `json:"format"`
	Writer  Writer    `json:"writer"`
	Time    time.Time `json:"time"`
	Changes []Change  `json:"changes"`
}

// Info is a batch found in a listing.
type Info struct {
	Key    string
	Time   time.Time
	Writer string // the key's writer hash
}

// Key is the object key of a batch by w stamped t.
func Key(t time.Time, w Writer) string {
	return Dir + t.UTC().Format("20060102T150405.000000000Z") + "-" + w.short() + ".json.gz"
}

// parseKey reads a listed key; ok is false for anything that is not a batch.
func parseKey(key string) (Info, bool) {
	name, found := strings.CutPrefix(key, Dir)
	if !found {
		return Info{}, false
	}
	name, found = strings.CutSuffix(name, ".json.gz")
	stamp, writer, split := strings.Cut(name, "-")
	if !found || !split || len(writer) != 16 || strings.Trim(writer, "0123456789abcdef") != "" {
		return Info{}, false
	}
	t, err := snapshot.ParseID(stamp)
	if err != nil {
		return Info{}, false
	}
	return Info{Key: key, Time: t, Writer: writer}, true
}

// Validate checks a batch as strictly as a manifest: restore turns its paths
// into files.
func (b *Batch) Validate() error {
	if b.Format != Format {
		return fmt.Errorf("unknown log format %q (this version reads %q)", b.Format, Format)
	}
	if b.Writer.Pod == "" || b.Time.IsZero() {
		return errors.New("batch has no writer or no time")
	}
	for i, c := range b.Changes {
		if c.Deleted {
			if err := snapshot.ValidPath(c.Path); err != nil {
				return fmt.Errorf("change %d %q: %w", i, c.Path, err)
			}
			if c.MTime.IsZero() {
				return fmt.Errorf("change %d %q: deletion without a time", i, c.Path)
			}
			continue
		}
		m := snapshot.Manifest{Format: snapshot.Format, ID: snapshot.NewID(b.Time, ""), Created: b.Time, Files: []snapshot.File{c.File}}
		if err := m.Validate(); err != nil {
			return fmt.Errorf("change %d: %w", i, err)
		}
	}
	return nil
}

// Append stores b under a new key. The key is created only if absent: two
// writers never collide (their hashes differ), and a writer that retries an
// append whose first attempt did land gets ErrPrecondition, which means done.
func Append(ctx context.Context, st store.Store, b *Batch) (string, error) {
	b.Format = Format
	if err := b.Validate(); err != nil {
		return "", err
	}
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	if err := json.NewEncoder(zw).Encode(b); err != nil {
		return "", err
	}
	if err := zw.Close(); err != nil {
		return "", err
	}
	key := Key(b.Time, b.Writer)
	_, err := st.Put(ctx, key, bytes.NewReader(buf.Bytes()), int64(buf.Len()),
		store.PutOptions{ContentType: "application/gzip", IfNoneMatch: true})
	if errors.Is(err, store.ErrPrecondition) {
		return key, nil
	}
	return key, err
}

// List returns the batches stamped after from (zero: all) in key order,
// which is time order. Objects under log/ that are not batches are skipped.
func List(ctx context.Context, st store.Store, from time.Time) ([]Info, error) {
	var out []Info
	for o, err := range st.List(ctx, Dir) {
		if err != nil {
			return nil, err
		}
		if info, ok := parseKey(o.Key); ok && info.Time.After(from) {
			out = append(out, info)
		}
	}
	return out, nil
}

// Load fetches and decodes one batch, strictly and bounded.
func Load(ctx context.Context, st store.Store, info Info) (*Batch, error) {
	rc, _, err := st.Get(ctx, info.Key, store.GetOptions{})
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	zr, err := gzip.NewReader(rc)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", info.Key, err)
	}
	defer zr.Close()
	lr := &io.LimitedReader{R: zr, N: MaxBatchBytes + 1}
	dec := json.NewDecoder(lr)
	dec.DisallowUnknownFields()
	var b Batch
	if err := dec.Decode(&b); err != nil {
		if lr.N <= 0 {
			return nil, fmt.Errorf("%s: batch larger than %d bytes", info.Key, MaxBatchBytes)
		}
		return nil, fmt.Errorf("%s: not a valid batch: %w", info.Key, err)
	}
	if err := b.Validate(); err != nil {
		return nil, fmt.Errorf("%s: %w", info.Key, err)
	}
	if got := Key(b.Time, b.Writer); got != info.Key {
		// A batch copied under another name would smuggle a stamp past the
		// point-in-time filter.
		return nil, fmt.Errorf("%s: content says %s", info.Key, got)
	}
	return &b, nil
}
