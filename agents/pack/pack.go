// Package pack is the read accelerator for small files, format
// podkeeper.pack.v1:
//
//	PREFIX/packs/ID.pack   the plain content of many small files, back to back
//	PREFIX/packs/ID.idx    gzip JSON lines: a header, then one line per file
//	                       (path, sha256, offset, size) in offset order
//
// A restore of 20 000 files of 4 KiB costs 20 000 GETs, one round trip each;
// from packs it costs a few dozen ranged GETs. Packs are never the source of
// truth: data/PATH is, and snapshots do not mention packs. Restore uses a pack
// entry only when its path, size and sha256 equal the snapshot's file, and
// checks the bytes it reads against that sha256, so a missing, stale, partly
// deleted or damaged pack costs speed, never a file. That also lets packs be
// written and collected by one writer at a time (the compactor) without any
// coordination with readers: a pack is written before its index, an index is
// deleted before its pack, and a key is never written twice.
//
// ID is a snapshot-style id (creation time plus a random suffix), so packs
// sort by age.
package pack

import (
	"bufio"
	"bytes"
	"cmp"
	"compress/gzip"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"

	"github.com/podkeeper/podkeeper/agents/snapshot"
	"github.com/podkeeper/podkeeper/agents/store"
)

// Format is the only pack format this version reads and writes.
const Format = "podkeeper.pack.v1"

// Dir is where packs live under the prefix.
const Dir = "packs/"

// Limits applied while reading an index: it comes from a bucket other parties
// may be able to write.
const (
	// MaxFileSize is the largest entry a pack may hold.
	MaxFileSize = 16 << 20
	// MaxIndexBytes caps an index after decompression (a gzip bomb stops here).
	MaxIndexBytes = 256 << 20
	// MaxEntries caps the entries of one index.
	MaxEntries = 1 << 20
	maxLine    = 2*snapshot.MaxPathBytes + 256
)

// Header is the first line of an index.
type Header struct {
	Format  string    `json:"format"`
	ID      string    `json:"id"`
	Created time.Time `json:"created"`
	Size    int64     `json:"size"`  // bytes of the pack object
	Files   int       `json:"files"` // entries that follow
}

// Entry is one file in a pack: Size bytes at Offset are content whose sha256
// is SHA256.
type Entry struct {
	Path   string `json:"path"`
	SHA256 string `json:"sha256"`
	Offset int64  `json:"offset"`
	Size   int64  `json:"size"`
}

// Key is the object key of the pack id; IndexKey that of its index.
func Key(id string) string      { return Dir + id + ".pack" }
func IndexKey(id string) string { return Dir + id + ".idx" }

// NewID is the id of a pack created at t.
func NewID(t time.Time) string {
	var b [4]byte
	rand.Read(b[:])
	return snapshot.NewID(t, hex.EncodeToString(b[:]))
}

// Info is one pack found by List.
type Info struct {
	ID       string
	Indexed  bool // its index exists: the pack is complete and usable
	Packed   bool // its pack object exists
	Size     int64
	Modified time.Time
}

// List returns the packs under the prefix in id order (oldest first). Keys
// that are not packs are ignored.
func List(ctx context.Context, st store.Store) ([]Info, error) {
	var out []Info
	at := map[string]int{}
	for o, err := range st.List(ctx, Dir) {
		if err != nil {
			return nil, fmt.Errorf("list %s: %w", Dir, err)
		}
		name := strings.TrimPrefix(o.Key, Dir)
		kind := "idx"
		id, ok := strings.CutSuffix(name, ".idx")
		if !ok {
			kind = "pack"
			id, ok = strings.CutSuffix(name, ".pack")
		}
		if !ok || snapshot.ValidateID(id) != nil {
			continue
		}
		i, seen := at[id]
		if !seen {
			i = len(out)
			at[id] = i
			out = append(out, Info{ID: id})
		}
		if kind == "idx" {
			out[i].Indexed = true
		} else {
			out[i].Packed, out[i].Size, out[i].Modified = true, o.Size, o.ModTime
		}
	}
	// Keys list in byte order and "ID.idx" < "ID.pack", but "ID-x.idx" may
	// interleave with another id's keys: sort by id.
	sortInfos(out)
	return out, nil
}

func sortInfos(s []Info) { slices.SortFunc(s, func(a, b Info) int { return cmp.Compare(a.ID, b.ID) }) }

// ReadIndex streams the index of pack id to fn, entry by entry, after
// checking each: a valid path, a sha256, entries in offset order without
// overlap, inside the pack's size. It returns the header.
func ReadIndex(ctx context.Context, st store.Store, id string, fn func(Entry) error) (Header, error) {
	rc, _, err := st.Get(ctx, IndexKey(id), store.GetOptions{})
	if err != nil {
		return Header{}, err
	}
	defer rc.Close()
	h, err := decodeIndex(rc, id, fn)
	if err != nil {
		return h, fmt.Errorf("pack index %s: %w", IndexKey(id), err)
	}
	return h, nil
}

// InvalidError marks an index that breaks the format's rules.
type InvalidError struct{ Reason string }

func (e *InvalidError) Error() string { return "invalid: " + e.Reason }

func invalid(format string, a ...any) error { return &InvalidError{Reason: fmt.Sprintf(format, a...)} }

func decodeIndex(r io.Reader, id string, fn func(Entry) error) (Header, error) {
	zr, err := gzip.NewReader(r)
	if err != nil {
		return Header{}, invalid("not gzip: %v", err)
	}
	defer zr.Close()
	sc := bufio.NewScanner(io.LimitReader(zr, MaxIndexBytes))
	sc.Buffer(make([]byte, 0, 4096), maxLine)
	var h Header
	if !sc.Scan() {
		return h, scanErr(sc.Err(), "no header")
	}
	if err := strictUnmarshal(sc.Bytes(), &h); err != nil {
		return h, invalid("header: %v", err)
	}
	switch {
	case h.Format != Format:
		return h, invalid("format %q, this version reads %s", h.Format, Format)
	case h.ID != id:
		return h, invalid("header names pack %q", h.ID)
	case h.Size < 0 || h.Files < 0 || h.Files > MaxEntries:
		return h, invalid("size %d, files %d", h.Size, h.Files)
	}
	var end int64
	n := 0
	for sc.Scan() {
		var e Entry
		if err := strictUnmarshal(sc.Bytes(), &e); err != nil {
			return h, invalid("entry %d: %v", n, err)
		}
		if err := e.check(end, h.Size); err != nil {
			return h, invalid("entry %d (%q): %v", n, e.Path, err)
		}
		if n++; n > h.Files {
			return h, invalid("more than the %d entries the header lists", h.Files)
		}
		end = e.Offset + e.Size
		if err := fn(e); err != nil {
			return h, err
		}
	}
	if err := sc.Err(); err != nil {
		return h, scanErr(err, "")
	}
	if n != h.Files {
		return h, invalid("%d entries, the header lists %d", n, h.Files)
	}
	return h, nil
}

func scanErr(err error, empty string) error {
	switch {
	case err == nil:
		return invalid("%s", empty)
	case errors.Is(err, bufio.ErrTooLong):
		return invalid("a line longer than %d bytes", maxLine)
	case errors.Is(err, gzip.ErrChecksum), errors.Is(err, gzip.ErrHeader), errors.Is(err, io.ErrUnexpectedEOF):
		return invalid("%v", err)
	}
	return err
}

func strictUnmarshal(b []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if dec.More() {
		return errors.New("trailing data")
	}
	return nil
}

func (e *Entry) check(prevEnd, packSize int64) error {
	if err := snapshot.ValidPath(e.Path); err != nil {
		return err
	}
	if b, err := hex.DecodeString(e.SHA256); err != nil || len(b) != 32 || strings.ToLower(e.SHA256) != e.SHA256 {
		return errors.New("sha256 is not 64 lower-case hex digits")
	}
	switch {
	case e.Size <= 0 || e.Size > MaxFileSize:
		return fmt.Errorf("size %d outside 1..%d", e.Size, MaxFileSize)
	case e.Offset < prevEnd:
		return fmt.Errorf("offset %d overlaps the entry before (ends at %d)", e.Offset, prevEnd)
	case e.Offset > packSize-e.Size:
		return fmt.Errorf("bytes %d..%d lie past the pack's %d", e.Offset, e.Offset+e.Size, packSize)
	}
	return nil
}

// Builder collects the content of one pack in memory (a pack is a few MiB).
type Builder struct {
	buf     bytes.Buffer
	entries []Entry
}

// Add appends a file's content, whose sha256 the caller has checked.
func (b *Builder) Add(path, sha256 string, content []byte) {
	b.entries = append(b.entries, Entry{Path: path, SHA256: sha256, Offset: int64(b.buf.Len()), Size: int64(len(content))})
	b.buf.Write(content)
}

// Len is the number of files added; Size their bytes.
func (b *Builder) Len() int    { return len(b.entries) }
func (b *Builder) Size() int64 { return int64(b.buf.Len()) }
func (b *Builder) Reset()      { b.buf.Reset(); b.entries = b.entries[:0] }

// Upload stores the pack, then its index (both If-None-Match): an index
// exists only for a complete pack.
func (b *Builder) Upload(ctx context.Context, st store.Store, now time.Time) (string, error) {
	id := NewID(now)
	if _, err := st.Put(ctx, Key(id), bytes.NewReader(b.buf.Bytes()), int64(b.buf.Len()),
		store.PutOptions{IfNoneMatch: true, ContentType: "application/octet-stream"}); err != nil {
		return "", err
	}
	var idx bytes.Buffer
	zw := gzip.NewWriter(&idx)
	enc := json.NewEncoder(zw)
	if err := enc.Encode(Header{Format: Format, ID: id, Created: now.UTC(), Size: int64(b.buf.Len()), Files: len(b.entries)}); err != nil {
		return "", err
	}
	for _, e := range b.entries {
		if err := enc.Encode(e); err != nil {
			return "", err
		}
	}
	if err := zw.Close(); err != nil {
		return "", err
	}
	if _, err := st.Put(ctx, IndexKey(id), bytes.NewReader(idx.Bytes()), int64(idx.Len()),
		store.PutOptions{IfNoneMatch: true, ContentType: "application/x-ndjson"}); err != nil {
		return "", err
	}
	return id, nil
}

// Delete removes a pack: the index first, so no reader finds an index whose
// pack is gone (one that read it already falls back to per-file GETs).
func Delete(ctx context.Context, st store.Store, id string) error {
	if err := st.Delete(ctx, IndexKey(id)); err != nil {
		return err
	}
	return st.Delete(ctx, Key(id))
}
