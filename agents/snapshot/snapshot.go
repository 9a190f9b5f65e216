// Package snapshot is the manifest format shared by the syncer (writes) and
// restore (reads), format podkeeper.snapshot.v1:
//
//	PREFIX/snapshots/ID.json or ID.json.gz   the manifest (readers accept both)
//	PREFIX/data/PATH                         file bytes, user metadata sha256, mtime, mode
//	                                         (encoded files also size and encoding)
//
// ID is the UTC creation time as 20060102T150405.000000000Z, optionally followed
// by "-" and a short suffix, so ids sort by time as strings.
//
// Decoding is strict: a manifest comes from a bucket that other parties may be
// able to write, and restore turns its paths into files on disk.
package snapshot

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
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/podkeeper/podkeeper/agents/codec"
	"github.com/podkeeper/podkeeper/agents/store"
)

// Format is the only format this version reads and writes.
const Format = "podkeeper.snapshot.v1"

// Layout of a prefix, and the user metadata keys of data objects.
const (
	SnapshotsDir = "snapshots/"
	DataDir      = "data/"
	MetaSHA256   = "sha256"
	MetaMTime    = "mtime"
	MetaMode     = "mode"
	// An encoded object (File.Encoding) also records the encoding and the
	// original content's size; its sha256 is the original content's too.
	MetaEncoding = "encoding"
	MetaSize     = "size"
)

// Limits applied while decoding.
const (
	MaxPathBytes = 4096
	MaxFileSize  = 5 << 40 // 5 TiB, the largest object S3 stores
	idLayout     = "20060102T150405.000000000Z"
)

// MaxManifestBytes caps a manifest after decompression, so a gzip bomb stops
// here (about 2 million files fit).
var MaxManifestBytes int64 = 512 << 20

// Manifest is one snapshot.
type Manifest struct {
	Format  string    `json:"format"`
	ID      string    `json:"id"`
	Created time.Time `json:"created"`
	Writer  Writer    `json:"writer"`
	Files   []File    `json:"files"`
}

// Writer says who wrote a snapshot.
type Writer struct {
	Pod       string `json:"pod"`
	Namespace string `json:"namespace"`
	Host      string `json:"host"`
}

// File is one file of a snapshot. Size and SHA256 are the content's; the
// data object holds it as is, or encoded when Encoding is set (one of
// agents/codec's encodings: zstd, gzip), and is then decoded before the
// content is checked against them. Readers that predate the field refuse an
// entry that has it rather than take encoded bytes for the content.
type File struct {
	Path      string    `json:"path"`
	Size      int64     `json:"size"`
	SHA256    string    `json:"sha256"`
	MTime     time.Time `json:"mtime"`
	Mode      Mode      `json:"mode"`
	ETag      string    `json:"etag,omitempty"`
	VersionID string    `json:"version_id,omitempty"`
	Encoding  string    `json:"encoding,omitempty"`
}

// Mode is a file's permission bits, written as an octal string ("0644").
type Mode uint32

func (m Mode) String() string { return fmt.Sprintf("%04o", uint32(m)) }

func (m Mode) MarshalJSON() ([]byte, error) { return json.Marshal(m.String()) }

func (m *Mode) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("mode must be an octal string like \"0644\"")
	}
	v, err := ParseMode(s)
	if err != nil {
		return err
	}
	*m = v
	return nil
}

// ParseMode parses "644" or "0644": permission bits only; setuid, setgid and
// sticky are refused, since restore would otherwise hand them to whatever the
// bucket holds.
func ParseMode(s string) (Mode, error) {
	if len(s) < 3 || len(s) > 4 || strings.Trim(s, "01234567") != "" {
		return 0, fmt.Errorf("mode %q must be 3 or 4 octal digits", s)
	}
	v, _ := strconv.ParseUint(s, 8, 32)
	if v&^0o777 != 0 {
		return 0, fmt.Errorf("mode %q has setuid/setgid/sticky bits; only permission bits are allowed", s)
	}
	return Mode(v), nil
}

var idRe = regexp.MustCompile(`^(\d{8}T\d{6}\.\d{9}Z)(-[A-Za-z0-9_.-]{1,64})?$`)

// isSHA256 reports whether s is 64 lowercase hex digits (a loop: the regexp
// it replaces was a tenth of the time a checkpoint's million entries took).
func isSHA256(s string) bool {
	if len(s) != 64 {
		return false
	}
	for i := range len(s) {
		if c := s[i]; (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

// NewID returns the id of a snapshot created at t, with an optional suffix
// (letters, digits, '_', '.', '-') that keeps two writers apart.
func NewID(t time.Time, suffix string) string {
	id := t.UTC().Format(idLayout)
	if suffix != "" {
		id += "-" + suffix
	}
	return id
}

// ParseID returns the creation time an id encodes.
func ParseID(id string) (time.Time, error) {
	m := idRe.FindStringSubmatch(id)
	if m == nil {
		return time.Time{}, fmt.Errorf("snapshot id %q is not of the form %s[-suffix]", id, idLayout)
	}
	return time.Parse(idLayout, m[1])
}

// Key is the object key of a manifest.
func Key(id string, gzipped bool) string {
	if gzipped {
		return SnapshotsDir + id + ".json.gz"
	}
	return SnapshotsDir + id + ".json"
}

// DataKey is the object key of a file's data.
func DataKey(path string) string { return DataDir + path }

// ValidPath checks a manifest path: relative, clean, '/'-separated, valid
// UTF-8, no "..", ".", empty or NUL elements, at most MaxPathBytes.
func ValidPath(p string) error {
	switch {
	case p == "":
		return errors.New("empty path")
	case len(p) > MaxPathBytes:
		return fmt.Errorf("path longer than %d bytes", MaxPathBytes)
	case !utf8.ValidString(p):
		return errors.New("path is not valid UTF-8")
	case strings.ContainsRune(p, 0):
		return errors.New("path contains NUL")
	case strings.ContainsRune(p, '\\'):
		return errors.New("path contains a backslash")
	case strings.HasPrefix(p, "/"):
		return errors.New("path is absolute")
	}
	for el := range strings.SplitSeq(p, "/") {
		switch el {
		case "":
			return errors.New("path has an empty element")
		case ".", "..":
			return fmt.Errorf("path has a %q element", el)
		}
	}
	return nil
}

// Validate checks every rule of the format. It sorts an index of the paths
// instead of building a set: for a million files that is 4 MB, not ~60.
func (m *Manifest) Validate() error {
	if err := m.validateHeader(); err != nil {
		return err
	}
	for i := range m.Files {
		if err := m.Files[i].validate(); err != nil {
			return fmt.Errorf("file %d %q: %w", i, m.Files[i].Path, err)
		}
	}
	return m.checkPaths()
}

func (m *Manifest) validateHeader() error {
	if m.Format != Format {
		return fmt.Errorf("unknown snapshot format %q (this version reads %q)", m.Format, Format)
	}
	if _, err := ParseID(m.ID); err != nil {
		return err
	}
	if m.Created.IsZero() {
		return errors.New("snapshot has no creation time")
	}
	return nil
}

func (f *File) validate() error {
	if err := ValidPath(f.Path); err != nil {
		return err
	}
	switch {
	case f.Size < 0 || f.Size > MaxFileSize:
		return fmt.Errorf("size %d outside 0..%d", f.Size, int64(MaxFileSize))
	case !isSHA256(f.SHA256):
		return errors.New("sha256 must be 64 lowercase hex digits")
	case f.MTime.IsZero():
		return errors.New("no mtime")
	case f.Mode&^0o777 != 0:
		return fmt.Errorf("mode %s has bits beyond permissions", f.Mode)
	case !codec.Known(f.Encoding):
		return fmt.Errorf("unknown encoding %q (this version reads %q and %q)", f.Encoding, codec.Zstd, codec.Gzip)
	}
	return nil
}

// checkPaths refuses a path listed twice, and a path that is both a file and
// the parent directory of another file (it cannot be restored).
func (m *Manifest) checkPaths() error {
	idx := make([]int32, len(m.Files))
	for i := range idx {
		idx[i] = int32(i)
	}
	path := func(i int32) string { return m.Files[i].Path }
	slices.SortFunc(idx, func(a, b int32) int { return strings.Compare(path(a), path(b)) })
	for k := 1; k < len(idx); k++ {
		if path(idx[k]) == path(idx[k-1]) {
			return fmt.Errorf("file %d %q: listed twice", idx[k], path(idx[k]))
		}
	}
	isFile := func(p string) bool {
		_, found := slices.BinarySearchFunc(idx, p, func(i int32, p string) int { return strings.Compare(path(i), p) })
		return found
	}
	for _, f := range m.Files {
		for i := strings.LastIndexByte(f.Path, '/'); i > 0; i = strings.LastIndexByte(f.Path[:i], '/') {
			if isFile(f.Path[:i]) {
				return fmt.Errorf("file %q: %q is listed as a file and as its parent directory", f.Path, f.Path[:i])
			}
		}
	}
	return nil
}

// Decode reads a manifest (plain JSON or gzip, detected by magic bytes) and
// validates it, as a []File: for small manifests and tests. Agents read
// checkpoints with DecodeCompact; Decode refuses more than MaxFileEntries.
func Decode(r io.Reader) (*Manifest, error) {
	c, err := DecodeCompact(r)
	if err != nil {
		return nil, err
	}
	if n, limit := c.Files.Len(), MaxFileEntries(); n > limit {
		return nil, fmt.Errorf("snapshot %s: %d files, more than %d as a file list: %w (%s)", c.ID, n, limit, ErrBudget, budgetSource())
	}
	return c.Manifest(), nil
}

// Compact is a manifest whose files are an Index.
type Compact struct {
	Format  string
	ID      string
	Created time.Time
	Writer  Writer
	Files   *Index
}

// Manifest materializes c's files.
func (c *Compact) Manifest() *Manifest {
	return &Manifest{Format: c.Format, ID: c.ID, Created: c.Created, Writer: c.Writer, Files: c.Files.Files()}
}

// CompactOf is m in compact form (validated).
func CompactOf(m *Manifest) (*Compact, error) {
	if err := m.validateHeader(); err != nil {
		return nil, err
	}
	x, err := IndexOf(m.Files)
	if err != nil {
		return nil, err
	}
	return &Compact{Format: m.Format, ID: m.ID, Created: m.Created, Writer: m.Writer, Files: x}, nil
}

// DecodeCompact reads a manifest (plain JSON or gzip, detected by magic
// bytes) into compact form and validates it. Unknown fields, repeated fields,
// trailing data, oversize input and entries over the memory budget
// (BudgetBytes, MaxEntries) are refused. It streams: one file entry is
// decoded at a time into the Index, so memory is what the index needs, never
// the document.
func DecodeCompact(r io.Reader) (*Compact, error) {
	b := NewBuilder()
	m, err := decode(r, &fileSink{add: b.add})
	if err != nil {
		return nil, err
	}
	x, err := b.Finish()
	if err != nil {
		return nil, fmt.Errorf("snapshot %s: %w", m.ID, err)
	}
	return &Compact{Format: m.Format, ID: m.ID, Created: m.Created, Writer: m.Writer, Files: x}, nil
}

// fileSink receives the entries of a manifest being decoded.
type fileSink struct {
	// add takes each valid entry, in document order; an error stops decoding.
	add func(File) error
	// head, if not nil, is called when "files" starts, with the header fields
	// before it; complete: all four of them came before it.
	head func(h *Manifest, complete bool) error
	// err is the first entry that broke a rule of its own (decodeFiles).
	err error
}

// decode reads a manifest into s and returns its validated header (Files
// empty, not nil).
func decode(r io.Reader, s *fileSink) (*Manifest, error) {
	src, closeSrc, err := decompress(r)
	if err != nil {
		return nil, err
	}
	defer closeSrc()
	lr := &io.LimitedReader{R: src, N: MaxManifestBytes + 1}
	dec := json.NewDecoder(lr)
	dec.DisallowUnknownFields()
	m, err := decodeObject(dec, s)
	if err != nil {
		var se sinkError
		switch {
		case errors.As(err, &se):
			return nil, se.err
		case lr.N <= 0:
			return nil, fmt.Errorf("snapshot: manifest larger than %d bytes", MaxManifestBytes)
		case errors.Is(err, ErrBudget):
			return nil, fmt.Errorf("snapshot: %w", err)
		}
		return nil, fmt.Errorf("snapshot: not a valid manifest: %w", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, errors.New("snapshot: trailing data after the manifest")
	}
	if m.Files == nil {
		return nil, errors.New(`snapshot: "files" is missing`)
	}
	if err := m.validateHeader(); err != nil {
		return nil, fmt.Errorf("snapshot %s: %w", m.ID, err)
	}
	if s.err != nil {
		return nil, fmt.Errorf("snapshot %s: %w", m.ID, s.err)
	}
	return m, nil
}

// sinkError carries an error of Scan's callbacks out of the decoder
// unchanged.
type sinkError struct{ err error }

func (e sinkError) Error() string { return e.err.Error() }

func decompress(r io.Reader) (io.Reader, func(), error) {
	br := &peekReader{r: r}
	magic, err := br.peek(2)
	if err != nil {
		return nil, nil, fmt.Errorf("snapshot: %w", err)
	}
	if !bytes.Equal(magic, []byte{0x1f, 0x8b}) {
		return br, func() {}, nil
	}
	zr, err := gzip.NewReader(br)
	if err != nil {
		return nil, nil, fmt.Errorf("snapshot: gzip: %w", err)
	}
	return zr, func() { zr.Close() }, nil
}

// decodeObject walks the top-level object key by key; "files" is read entry
// by entry.
func decodeObject(dec *json.Decoder, s *fileSink) (*Manifest, error) {
	if err := expectDelim(dec, '{'); err != nil {
		return nil, err
	}
	m := &Manifest{}
	seen := map[string]bool{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, err
		}
		key, _ := tok.(string)
		if seen[key] {
			return nil, fmt.Errorf("field %q repeated", key)
		}
		seen[key] = true
		switch key {
		case "format":
			err = dec.Decode(&m.Format)
		case "id":
			err = dec.Decode(&m.ID)
		case "created":
			err = dec.Decode(&m.Created)
		case "writer":
			err = dec.Decode(&m.Writer)
		case "files":
			if s.head != nil {
				h := *m
				if err := s.head(&h, seen["format"] && seen["id"] && seen["created"] && seen["writer"]); err != nil {
					return nil, err
				}
			}
			m.Files, err = decodeFiles(dec, s)
		default:
			err = fmt.Errorf("unknown field %q", key)
		}
		if err != nil {
			return nil, err
		}
	}
	return m, expectDelim(dec, '}')
}

// decodeFiles hands each entry to s. A file that breaks a rule of its own is
// remembered (s.err) and decoding goes on, so that a malformed document is
// still reported as such first; the entries stop counting from there.
func decodeFiles(dec *json.Decoder, s *fileSink) ([]File, error) {
	tok, err := dec.Token()
	if err != nil {
		return nil, err
	}
	if tok == nil {
		return nil, nil // "files": null is reported as missing
	}
	if d, ok := tok.(json.Delim); !ok || d != '[' {
		return nil, fmt.Errorf(`"files" must be an array`)
	}
	var f File
	for i := 0; dec.More(); i++ {
		f = File{}
		if err := dec.Decode(&f); err != nil {
			return nil, fmt.Errorf("file %d: %w", i, err)
		}
		if s.err != nil {
			continue
		}
		if err := f.validate(); err != nil {
			s.err = fmt.Errorf("file %d %q: %w", i, f.Path, err)
			continue
		}
		if err := s.add(f); err != nil {
			return nil, err
		}
	}
	return []File{}, expectDelim(dec, ']')
}

func expectDelim(dec *json.Decoder, want json.Delim) error {
	tok, err := dec.Token()
	if err != nil {
		return err
	}
	if d, ok := tok.(json.Delim); !ok || d != want {
		return fmt.Errorf("expected %q, found %v", want, tok)
	}
	return nil
}

// Encode validates m and writes it as JSON, gzip-compressed when gz is set.
func Encode(w io.Writer, m *Manifest, gz bool) error {
	if m.Files == nil {
		m.Files = []File{}
	}
	if err := m.Validate(); err != nil {
		return err
	}
	if !gz {
		return json.NewEncoder(w).Encode(m)
	}
	zw := gzip.NewWriter(w)
	if err := json.NewEncoder(zw).Encode(m); err != nil {
		return err
	}
	return zw.Close()
}

type peekReader struct {
	r   io.Reader
	buf []byte
}

func (p *peekReader) peek(n int) ([]byte, error) {
	for len(p.buf) < n {
		b := make([]byte, n-len(p.buf))
		k, err := p.r.Read(b)
		p.buf = append(p.buf, b[:k]...)
		if err == io.EOF {
			if len(p.buf) == 0 {
				return nil, errors.New("empty manifest")
			}
			break
		}
		if err != nil {
			return nil, err
		}
	}
	return p.buf, nil
}

func (p *peekReader) Read(b []byte) (int, error) {
	if len(p.buf) > 0 {
		n := copy(b, p.buf)
		p.buf = p.buf[n:]
		return n, nil
	}
	return p.r.Read(b)
}

// Info is a snapshot found in a store listing.
type Info struct {
	ID      string
	Key     string
	Created time.Time
	Size    int64 // of the manifest object
}

// List returns the snapshots of st, oldest first. Objects under snapshots/
// whose names are not snapshot ids are ignored.
func List(ctx context.Context, st store.Store) ([]Info, error) {
	var out []Info
	for o, err := range st.List(ctx, SnapshotsDir) {
		if err != nil {
			return nil, err
		}
		name := strings.TrimPrefix(o.Key, SnapshotsDir)
		id, ok := strings.CutSuffix(name, ".json.gz")
		if !ok {
			if id, ok = strings.CutSuffix(name, ".json"); !ok {
				continue
			}
		}
		created, err := ParseID(id)
		if err != nil {
			continue
		}
		out = append(out, Info{ID: id, Key: o.Key, Created: created, Size: o.Size})
	}
	slices.SortFunc(out, func(a, b Info) int { return strings.Compare(a.ID, b.ID) })
	return out, nil
}

// ErrNoSnapshot is returned when a prefix holds no (matching) snapshot.
var ErrNoSnapshot = errors.New("no snapshot")

// Resolve finds a snapshot by spec: "latest", an id, or an RFC 3339 time (the
// newest snapshot created at or before it).
func Resolve(ctx context.Context, st store.Store, spec string) (Info, error) {
	all, err := List(ctx, st)
	if err != nil {
		return Info{}, err
	}
	switch {
	case spec == "" || spec == "latest":
		if len(all) == 0 {
			return Info{}, ErrNoSnapshot
		}
		return all[len(all)-1], nil
	case idRe.MatchString(spec):
		for _, s := range all {
			if s.ID == spec {
				return s, nil
			}
		}
		return Info{}, fmt.Errorf("%w with id %s", ErrNoSnapshot, spec)
	}
	at, err := time.Parse(time.RFC3339Nano, spec)
	if err != nil {
		return Info{}, fmt.Errorf("snapshot %q is neither \"latest\", an id nor an RFC 3339 time", spec)
	}
	for i := len(all) - 1; i >= 0; i-- {
		if !all[i].Created.After(at) {
			return all[i], nil
		}
	}
	return Info{}, fmt.Errorf("%w created at or before %s", ErrNoSnapshot, at.UTC().Format(time.RFC3339))
}

// Load fetches and decodes one snapshot as a []File (small manifests; see
// LoadCompact).
func Load(ctx context.Context, st store.Store, info Info) (*Manifest, error) {
	c, err := LoadCompact(ctx, st, info)
	if err != nil {
		return nil, err
	}
	if n, limit := c.Files.Len(), MaxFileEntries(); n > limit {
		return nil, fmt.Errorf("%s: %d files, more than %d as a file list: %w (%s)", info.Key, n, limit, ErrBudget, budgetSource())
	}
	return c.Manifest(), nil
}

// LoadCompact fetches and decodes one snapshot in compact form.
func LoadCompact(ctx context.Context, st store.Store, info Info) (*Compact, error) {
	rc, _, err := st.Get(ctx, info.Key, store.GetOptions{})
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	c, err := DecodeCompact(rc)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", info.Key, err)
	}
	if c.ID != info.ID {
		return nil, fmt.Errorf("%s: manifest says id %s", info.Key, c.ID)
	}
	return c, nil
}

// Write encodes m (gzip) and stores it under its key. It returns the key.
func Write(ctx context.Context, st store.Store, m *Manifest) (string, error) {
	var buf bytes.Buffer
	if err := Encode(&buf, m, true); err != nil {
		return "", err
	}
	key := Key(m.ID, true)
	_, err := st.Put(ctx, key, bytes.NewReader(buf.Bytes()), int64(buf.Len()), store.PutOptions{ContentType: "application/gzip", IfNoneMatch: true})
	return key, err
}

// EncodeCompact writes c as JSON, gzip-compressed when gz is set: the bytes
// Encode writes for the same manifest, produced one entry at a time.
func EncodeCompact(w io.Writer, c *Compact, gz bool) error {
	e, err := NewEncoder(w, &Manifest{Format: c.Format, ID: c.ID, Created: c.Created, Writer: c.Writer}, gz)
	if err != nil {
		return err
	}
	if err := addAll(e, c.Files); err != nil {
		return err
	}
	return e.Close()
}

func addAll(e *Encoder, x *Index) error {
	for _, f := range x.All() {
		if err := e.Add(f); err != nil {
			return err
		}
	}
	return nil
}

// WriteCompact encodes c (gzip) and stores it under its key, without holding
// the encoded manifest: a large one is encoded twice, once to measure it
// (gzip output is deterministic) and once into the upload (PutEncoded). It
// returns the key.
func WriteCompact(ctx context.Context, st store.Store, c *Compact) (string, error) {
	key := Key(c.ID, true)
	if c.Files.Len() <= 10_000 {
		var buf bytes.Buffer
		if err := EncodeCompact(&buf, c, true); err != nil {
			return "", err
		}
		_, err := st.Put(ctx, key, bytes.NewReader(buf.Bytes()), int64(buf.Len()), store.PutOptions{ContentType: "application/gzip", IfNoneMatch: true})
		return key, err
	}
	sum := NewSummer()
	if err := EncodeCompact(sum, c, true); err != nil {
		return "", err
	}
	h := &Manifest{Format: c.Format, ID: c.ID, Created: c.Created, Writer: c.Writer}
	return PutEncoded(ctx, st, h, sum.Sum(), func(e *Encoder) error { return addAll(e, c.Files) })
}

// ValidateID reports whether id is a well-formed snapshot id.
func ValidateID(id string) error {
	_, err := ParseID(id)
	return err
}

// HashReader returns the sha256 (lowercase hex) and length of r's content.
func HashReader(r io.Reader) (string, int64, error) {
	h := sha256.New()
	n, err := io.Copy(h, r)
	if err != nil {
		return "", 0, err
	}
	return hex.EncodeToString(h.Sum(nil)), n, nil
}

// Metadata is the user metadata of a data object for f.
func (f File) Metadata() map[string]string {
	m := map[string]string{MetaSHA256: f.SHA256, MetaMTime: f.MTime.UTC().Format(time.RFC3339Nano), MetaMode: f.Mode.String()}
	if f.Encoding != "" {
		m[MetaEncoding], m[MetaSize] = f.Encoding, strconv.FormatInt(f.Size, 10)
	}
	return m
}

// FileFromMetadata rebuilds an entry from a data object's metadata (as written
// by Metadata), checking it as strictly as a manifest. size is the object's;
// an encoded object's metadata names the content's.
func FileFromMetadata(path string, size int64, meta map[string]string) (File, error) {
	f := File{Path: path, Size: size, SHA256: meta[MetaSHA256], Encoding: meta[MetaEncoding]}
	if f.Encoding != "" {
		if !codec.Known(f.Encoding) {
			return File{}, fmt.Errorf("object %s: unknown encoding %q", path, f.Encoding)
		}
		n, err := strconv.ParseInt(meta[MetaSize], 10, 64)
		if err != nil || n < 0 || n > MaxFileSize {
			return File{}, fmt.Errorf("object %s: metadata size %q of its %s content", path, meta[MetaSize], f.Encoding)
		}
		f.Size = n
	}
	mt, err := time.Parse(time.RFC3339Nano, meta[MetaMTime])
	if err != nil {
		return File{}, fmt.Errorf("object %s: metadata mtime %q: %w", path, meta[MetaMTime], err)
	}
	f.MTime = mt
	if f.Mode, err = ParseMode(meta[MetaMode]); err != nil {
		return File{}, fmt.Errorf("object %s: %w", path, err)
	}
	if !isSHA256(f.SHA256) {
		return File{}, fmt.Errorf("object %s: metadata sha256 %q is not 64 lowercase hex digits", path, f.SHA256)
	}
	return f, nil
}
