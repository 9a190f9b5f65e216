package snapshot

import (
	"bufio"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"hash/maphash"
	"io"
	"strings"

	"github.com/podkeeper/podkeeper/agents/store"
)

// Streaming: a manifest read, checked and written one entry at a time, so
// that an agent can rewrite a checkpoint of a million files (the compactor's
// merge of the previous checkpoint and the batches after it) in memory that
// does not grow with the number of files.

// Scan decodes a manifest as DecodeCompact does, but hands each file to fn,
// in document order, instead of indexing it: memory is one entry whatever
// the manifest's size. head, if not nil, is called once before the first
// file with the header fields that precede "files" in the document;
// complete reports that all four did (always so in what this package
// writes). Every rule of the header and of an entry is checked as
// DecodeCompact checks it; the rules across entries (a path listed twice, a
// file that is another's parent directory) while the files come in path
// order, the order this package writes (an unsorted manifest's are not: a
// caller that needs them detects the disorder, as fn sees it). A manifest
// that breaks a rule is reported only when the scan ends, after fn has seen
// entries before the culprit: what fn did is provisional until Scan returns
// nil. An error of head or fn stops the scan and is returned as is. Scan
// returns the header (Files empty).
func Scan(r io.Reader, head func(h *Manifest, complete bool) error, fn func(File) error) (*Manifest, error) {
	var (
		chain  pathChain
		last   string
		sorted = true
		n      int
	)
	s := &fileSink{}
	s.add = func(f File) error {
		i := n
		n++
		if f.Path == last && i > 0 {
			s.err = fmt.Errorf("file %d %q: listed twice", i, f.Path)
			return nil
		}
		if sorted && i > 0 && f.Path < last {
			sorted = false
		}
		if sorted {
			if c, twice := chain.next(f.Path); c != "" {
				s.err = clashError(i, f.Path, c, twice)
				return nil
			}
		}
		last = f.Path
		if err := fn(f); err != nil {
			return sinkError{err}
		}
		return nil
	}
	if head != nil {
		s.head = func(h *Manifest, complete bool) error {
			if err := head(h, complete); err != nil {
				return sinkError{err}
			}
			return nil
		}
	}
	return decode(r, s)
}

// pathChain checks the rules across entries over paths that come in path
// order. A path that is a parent directory of a later one comes before it,
// and everything between them starts with it (byte order): so a chain of
// paths, each a prefix of the next, holds every possible parent of the
// current path.
type pathChain []string

// next adds p and returns the path it clashes with ("" none): p itself
// (twice), or a parent directory of p listed as a file.
func (c *pathChain) next(p string) (clash string, twice bool) {
	ch := *c
	for len(ch) > 0 && !strings.HasPrefix(p, ch[len(ch)-1]) {
		ch = ch[:len(ch)-1]
	}
	for _, q := range ch {
		switch {
		case len(q) == len(p):
			return q, true
		case p[len(q)] == '/':
			return q, false
		}
	}
	*c = append(ch, p)
	return "", false
}

func clashError(i int, p, c string, twice bool) error {
	if twice {
		return fmt.Errorf("file %d %q: listed twice", i, p)
	}
	return fmt.Errorf("file %q: %q is listed as a file and as its parent directory", p, c)
}

// PathOrder checks that paths come in strictly increasing path order and
// obey the rules across entries (no path twice, no file that is another's
// parent directory), one at a time, holding only the chain of possible
// parents.
type PathOrder struct {
	chain pathChain
	last  string
	n     int
}

// ErrUnsorted marks a path that comes before the one preceding it.
var ErrUnsorted = errors.New("not in path order")

// Next checks p, the next path.
func (o *PathOrder) Next(p string) error {
	i := o.n
	o.n++
	if i > 0 && p < o.last {
		return fmt.Errorf("file %d %q after %q: %w", i, p, o.last, ErrUnsorted)
	}
	o.last = p
	if c, twice := o.chain.next(p); c != "" {
		return clashError(i, p, c, twice)
	}
	return nil
}

// Encoder writes a manifest one file at a time: the bytes Encode writes for
// the same manifest (EncodeCompact is one). It checks no rule of the files:
// its caller hands it a valid manifest's, in path order.
type Encoder struct {
	zw  *gzip.Writer
	bw  *bufio.Writer
	n   int
	buf []byte
}

// NewEncoder checks the header h (its Files are ignored) and writes it to w,
// gzip-compressed when gz is set.
func NewEncoder(w io.Writer, h *Manifest, gz bool) (*Encoder, error) {
	hd := Manifest{Format: h.Format, ID: h.ID, Created: h.Created, Writer: h.Writer}
	if err := hd.validateHeader(); err != nil {
		return nil, err
	}
	e := &Encoder{}
	if gz {
		e.zw = gzip.NewWriter(w)
		w = e.zw
	}
	e.bw = bufio.NewWriterSize(w, 64<<10)
	put := func(prefix string, v any) {
		e.bw.WriteString(prefix)
		b, _ := json.Marshal(v)
		e.bw.Write(b)
	}
	put(`{"format":`, hd.Format)
	put(`,"id":`, hd.ID)
	put(`,"created":`, hd.Created)
	put(`,"writer":`, hd.Writer)
	e.bw.WriteString(`,"files":[`)
	return e, nil
}

// Add writes the next file.
func (e *Encoder) Add(f File) error {
	b, err := json.Marshal(f)
	if err != nil {
		return err
	}
	if e.n > 0 {
		e.bw.WriteByte(',')
	}
	e.n++
	_, err = e.bw.Write(b)
	return err
}

// Close ends the manifest and flushes it (it does not close the writer).
func (e *Encoder) Close() error {
	e.bw.WriteString("]}\n")
	if err := e.bw.Flush(); err != nil {
		return err
	}
	if e.zw != nil {
		return e.zw.Close()
	}
	return nil
}

// Sum is the length and sha256 of an encoded manifest.
type Sum struct {
	Size   int64
	SHA256 [32]byte
}

// Summer is a writer that only measures what it is given.
type Summer struct {
	n int64
	h hash.Hash
}

// NewSummer is an empty Summer.
func NewSummer() *Summer { return &Summer{h: sha256.New()} }

func (s *Summer) Write(b []byte) (int, error) {
	s.n += int64(len(b))
	return s.h.Write(b)
}

// Sum is the length and hash of what was written.
func (s *Summer) Sum() Sum {
	out := Sum{Size: s.n}
	s.h.Sum(out.SHA256[:0])
	return out
}

// ErrChanged marks a manifest whose second encoding (the upload) differed
// from the first (the measure): a source changed in between.
var ErrChanged = errors.New("snapshot: the manifest's upload encoded differently from its measure; nothing stored")

// PutEncoded stores the manifest with header h under its key (gzip,
// If-None-Match) from emit, which writes its files into e, without holding
// it: want is the Sum of an earlier, identical run (emit into an Encoder over
// a Summer). The upload fails, and nothing is stored, unless this run writes
// exactly those bytes: its last byte is held back until they matched.
func PutEncoded(ctx context.Context, st store.Store, h *Manifest, want Sum, emit func(e *Encoder) error) (string, error) {
	key := Key(h.ID, true)
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() {
		v := &verifyWriter{w: pw, want: want, h: sha256.New()}
		err := func() error {
			e, err := NewEncoder(v, h, true)
			if err != nil {
				return err
			}
			if err := emit(e); err != nil {
				return err
			}
			if err := e.Close(); err != nil {
				return err
			}
			return v.finish()
		}()
		pw.CloseWithError(err)
		done <- err
	}()
	_, err := st.Put(ctx, key, pr, want.Size, store.PutOptions{ContentType: "application/gzip", IfNoneMatch: true})
	pr.CloseWithError(errUploadEnded)
	if eerr := <-done; eerr != nil && !errors.Is(eerr, errUploadEnded) && err != nil {
		return key, eerr // what made the upload fail
	}
	return key, err
}

var errUploadEnded = errors.New("upload ended")

// verifyWriter passes through all but the last byte of want, which it
// writes only once the whole stream matched want.
type verifyWriter struct {
	w    io.Writer
	want Sum
	h    hash.Hash
	n    int64
	last byte
}

func (v *verifyWriter) Write(p []byte) (int, error) {
	if v.n+int64(len(p)) > v.want.Size {
		return 0, ErrChanged
	}
	v.h.Write(p)
	end := len(p)
	if v.n+int64(len(p)) == v.want.Size && end > 0 {
		end--
		v.last = p[end]
	}
	if _, err := v.w.Write(p[:end]); err != nil {
		return 0, err
	}
	v.n += int64(len(p))
	return len(p), nil
}

func (v *verifyWriter) finish() error {
	var sum [32]byte
	v.h.Sum(sum[:0])
	if v.n != v.want.Size || sum != v.want.SHA256 {
		return ErrChanged
	}
	_, err := v.w.Write([]byte{v.last})
	return err
}

// Meter charges files against this process's memory budget as an Index of
// them would be charged (Builder), without keeping them: what a streamed
// manifest would cost the agents that load it. It holds a 64-bit hash per
// directory.
type Meter struct{ b *Builder }

// NewMeter is an empty Meter under BudgetBytes and MaxEntries.
func NewMeter() *Meter {
	b := newBuilder(BudgetBytes(), MaxEntries())
	b.dirIDs = nil
	b.dry, b.seed = true, maphash.MakeSeed()
	b.dirHash = map[uint64]struct{}{maphash.String(b.seed, ""): {}}
	return &Meter{b: b}
}

// Add charges f, which passed validation (Scan, a batch's Validate).
func (m *Meter) Add(f File) error { return m.b.add(f) }

// Len is the number of files charged.
func (m *Meter) Len() int { return m.b.x.nrec }

// Cost is what they cost.
func (m *Meter) Cost() int64 { return m.b.x.cost }

// ScanStored fetches the snapshot info and hands its files to fn (Scan),
// checking that it is the snapshot its key names.
func ScanStored(ctx context.Context, st store.Store, info Info, fn func(File) error) error {
	rc, _, err := st.Get(ctx, info.Key, store.GetOptions{})
	if err != nil {
		return err
	}
	defer rc.Close()
	h, err := Scan(rc, func(h *Manifest, _ bool) error {
		if h.ID != "" && h.ID != info.ID {
			return fmt.Errorf("manifest says id %s", h.ID)
		}
		return nil
	}, fn)
	if err == nil && h.ID != info.ID {
		err = fmt.Errorf("manifest says id %s", h.ID)
	}
	if err != nil {
		return fmt.Errorf("%s: %w", info.Key, err)
	}
	return nil
}
