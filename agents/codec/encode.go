package codec

import (
	"bytes"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"path"
	"strings"
	"sync"

	"github.com/klauspost/compress/zstd"
)

// SampleSize is how much of a file's beginning is compressed to decide
// whether compressing it is worth it; a file up to this size is encoded
// completely by the decision, and that result is what is uploaded.
const SampleSize = 64 << 10

// MinSaving is the fraction of the bytes an encoding must save, on the
// sample and then on the whole file, for the file to be stored encoded.
const MinSaving = 0.10

// Writer settings: zstd at its default level (about zstd -3) with a 1 MiB
// window and no goroutines of its own, gzip at its default level.
const zstdWindow = 1 << 20

var zstdEncoders = sync.Pool{New: func() any {
	e, err := zstd.NewWriter(nil, zstd.WithEncoderConcurrency(1), zstd.WithWindowSize(zstdWindow),
		zstd.WithEncoderLevel(zstd.SpeedDefault), zstd.WithLowerEncoderMem(true))
	if err != nil {
		panic(err) // static options
	}
	return e
}}

var gzipEncoders = sync.Pool{New: func() any { return gzip.NewWriter(nil) }}

var samples = sync.Pool{New: func() any { b := make([]byte, SampleSize); return &b }}

// compressedExt are names whose content is already compressed (images,
// video, audio, archives, compressed documents): never worth a second pass.
var compressedExt = map[string]bool{}

func init() {
	for _, e := range strings.Fields(`jpg jpeg jfif png gif webp avif heic heif jxl
		mp4 m4v mov mkv webm avi wmv flv mpg mpeg ts 3gp
		mp3 m4a aac ogg oga opus flac wma
		zip gz tgz zst zstd xz txz bz2 tbz2 7z rar lz4 lz lzma br sz
		jar war apk aab ipa whl nupkg docx xlsx pptx odt ods odp epub pdf
		woff woff2 dmg iso squashfs`) {
		compressedExt["."+e] = true
	}
}

// magics are the first bytes of already compressed formats, for files whose
// name does not say what they are.
var magics = [][]byte{
	{0xff, 0xd8, 0xff},                 // JPEG
	{0x89, 'P', 'N', 'G'},              // PNG
	[]byte("GIF8"),                     // GIF
	{'P', 'K', 0x03, 0x04},             // zip (and docx, jar, apk, ...)
	{0x1f, 0x8b},                       // gzip
	{0x28, 0xb5, 0x2f, 0xfd},           // zstd
	{0xfd, '7', 'z', 'X', 'Z', 0x00},   // xz
	[]byte("BZh"),                      // bzip2
	{'7', 'z', 0xbc, 0xaf, 0x27, 0x1c}, // 7z
	[]byte("Rar!\x1a\x07"),             // rar
	{0x04, 0x22, 0x4d, 0x18},           // lz4
	[]byte("%PDF-"),                    // PDF
	[]byte("OggS"),                     // Ogg
	[]byte("fLaC"),                     // FLAC
	[]byte("ID3"),                      // MP3 with a tag
	{0x1a, 0x45, 0xdf, 0xa3},           // Matroska / WebM
	[]byte("wOF2"),                     // WOFF2
}

// Compressed reports whether a file named name that begins with head is
// already compressed, by its extension or its magic bytes.
func Compressed(name string, head []byte) bool {
	if compressedExt[strings.ToLower(path.Ext(name))] {
		return true
	}
	for _, m := range magics {
		if bytes.HasPrefix(head, m) {
			return true
		}
	}
	switch {
	case len(head) >= 12 && string(head[:4]) == "RIFF" && (string(head[8:12]) == "WEBP" || string(head[8:12]) == "AVI "):
		return true
	case len(head) >= 12 && string(head[4:8]) == "ftyp": // MP4, MOV, HEIC, AVIF
		return true
	}
	return false
}

// Body is what is uploaded for a file: its content as is, or encoded. Open
// may be called any number of times (every attempt, every retry of the HTTP
// client) and gives the same Size bytes each time while the file is unchanged.
type Body struct {
	Encoding string // None, Zstd or Gzip
	Size     int64  // bytes stored (the encoded length when encoded)
	src      io.ReaderAt
	srcSize  int64
	data     []byte // the whole encoded body, when it came from the sample
}

// Raw is the body of size bytes of src, not encoded.
func Raw(src io.ReaderAt, size int64) *Body {
	return &Body{Size: size, src: src, srcSize: size}
}

// Open returns a reader of the body from its first byte. It is seekable, so
// an HTTP client can sign and rewind it; an encoded one re-encodes from the
// file on a rewind instead of holding the encoded bytes.
func (b *Body) Open() io.ReadSeeker {
	switch {
	case b.Encoding == None:
		return io.NewSectionReader(b.src, 0, b.srcSize)
	case b.data != nil:
		return bytes.NewReader(b.data)
	}
	return &replay{enc: b.Encoding, src: b.src, srcSize: b.srcSize, size: b.Size}
}

// ErrChanged is returned while reading an encoded body whose file no longer
// encodes to the same length (it changed since Encode measured it).
var ErrChanged = errors.New("codec: the file changed while it was being encoded")

// Encode decides how a file named name (size bytes of src) is uploaded with
// encoding enc: as is when enc is None, when the name or the first bytes say
// the content is already compressed, or when the encoding saves less than
// MinSaving on the first SampleSize bytes or on the whole file; encoded
// otherwise. A file up to SampleSize is encoded once, in memory; a larger
// one is encoded once to measure it and again as it is read (Open), so
// memory stays at one encoder and a few buffers whatever the file's size.
func Encode(enc, name string, src io.ReaderAt, size int64) (*Body, error) {
	raw := Raw(src, size)
	if enc == None || size == 0 {
		return raw, nil
	}
	if enc != Zstd && enc != Gzip {
		return nil, fmt.Errorf("codec: unknown encoding %q", enc)
	}
	bp := samples.Get().(*[]byte)
	defer samples.Put(bp)
	sample := (*bp)[:min(size, SampleSize)]
	if _, err := src.ReadAt(sample, 0); err != nil {
		if err == io.EOF {
			err = ErrChanged
		}
		return nil, err
	}
	if Compressed(name, sample) {
		return raw, nil
	}
	var buf bytes.Buffer
	w := newWriter(enc, &buf)
	if _, err := w.Write(sample); err != nil {
		return nil, err
	}
	if err := w.Close(); err != nil {
		return nil, err
	}
	if !worth(int64(buf.Len()), int64(len(sample))) {
		return raw, nil
	}
	if size <= SampleSize {
		return &Body{Encoding: enc, Size: int64(buf.Len()), src: src, srcSize: size, data: bytes.Clone(buf.Bytes())}, nil
	}
	n, err := io.Copy(io.Discard, &replay{enc: enc, src: src, srcSize: size, size: -1})
	if err != nil {
		return nil, err
	}
	if !worth(n, size) {
		return raw, nil
	}
	return &Body{Encoding: enc, Size: n, src: src, srcSize: size}, nil
}

func worth(encoded, raw int64) bool { return float64(encoded) <= float64(raw)*(1-MinSaving) }

// writer is an encoder that gives itself back to its pool when closed.
type writer struct {
	io.Writer
	close func() error
}

func (w *writer) Close() error { return w.close() }

func newWriter(enc string, dst io.Writer) *writer {
	if enc == Zstd {
		e := zstdEncoders.Get().(*zstd.Encoder)
		e.Reset(dst)
		return &writer{Writer: e, close: func() error {
			err := e.Close()
			e.Reset(nil)
			zstdEncoders.Put(e)
			return err
		}}
	}
	g := gzipEncoders.Get().(*gzip.Writer)
	g.Reset(dst)
	return &writer{Writer: g, close: func() error {
		err := g.Close()
		g.Reset(io.Discard)
		gzipEncoders.Put(g)
		return err
	}}
}

// replay encodes srcSize bytes of src as it is read, chunk by chunk into a
// small buffer, and starts over from the file on a backward Seek. size is
// the encoded length measured before (-1 while measuring): reading yields
// exactly that many bytes or fails with ErrChanged.
type replay struct {
	enc     string
	src     io.ReaderAt
	srcSize int64
	size    int64

	w     *writer
	off   int64 // next byte of src to encode
	done  bool  // src fully encoded, encoder closed
	buf   bytes.Buffer
	pos   int64 // bytes of the body handed out (or skipped)
	chunk []byte
	// parked: pos was set by a seek to or past the end, without encoding up
	// to there; reads return EOF until a seek back starts over.
	parked bool
}

const replayChunk = 32 << 10

func (r *replay) Read(p []byte) (int, error) {
	if r.parked {
		return 0, io.EOF
	}
	if r.size >= 0 && r.pos >= r.size {
		// At the measured end: the encoding must end too.
		if r.more() {
			return 0, ErrChanged
		}
		return 0, io.EOF
	}
	for r.buf.Len() == 0 && !r.done {
		if err := r.fill(); err != nil {
			return 0, err
		}
	}
	if r.buf.Len() == 0 {
		if r.size >= 0 {
			return 0, ErrChanged // ended before the measured length
		}
		return 0, io.EOF
	}
	if r.size >= 0 && int64(len(p)) > r.size-r.pos {
		p = p[:r.size-r.pos]
	}
	n, _ := r.buf.Read(p)
	r.pos += int64(n)
	return n, nil
}

// more reports whether the encoding goes on (it must not past the measured
// end).
func (r *replay) more() bool {
	for r.buf.Len() == 0 && !r.done {
		if r.fill() != nil {
			return true
		}
	}
	return r.buf.Len() > 0
}

// fill encodes the next chunk of src into buf.
func (r *replay) fill() error {
	if r.w == nil {
		r.w = newWriter(r.enc, &r.buf)
		if r.chunk == nil {
			r.chunk = make([]byte, replayChunk)
		}
	}
	n := min(int64(len(r.chunk)), r.srcSize-r.off)
	if n > 0 {
		k, err := r.src.ReadAt(r.chunk[:n], r.off)
		if int64(k) < n {
			if err == nil || err == io.EOF {
				err = ErrChanged
			}
			return err
		}
		r.off += n
		if _, err := r.w.Write(r.chunk[:n]); err != nil {
			return err
		}
	}
	if r.off >= r.srcSize {
		err := r.w.Close()
		r.w, r.done = nil, true
		return err
	}
	return nil
}

func (r *replay) Seek(offset int64, whence int) (int64, error) {
	var abs int64
	switch whence {
	case io.SeekStart:
		abs = offset
	case io.SeekCurrent:
		abs = r.pos + offset
	case io.SeekEnd:
		if r.size < 0 {
			return 0, errors.New("codec: seek from the end of an unmeasured body")
		}
		abs = r.size + offset
	default:
		return 0, errors.New("codec: bad whence")
	}
	switch {
	case abs < 0:
		return 0, errors.New("codec: seek before the start")
	case abs == r.pos:
		return abs, nil
	case r.size >= 0 && abs >= r.size:
		r.pos, r.parked = abs, true
		return abs, nil
	case abs < r.pos || r.parked:
		r.restart()
	}
	for r.pos < abs {
		for r.buf.Len() == 0 && !r.done {
			if err := r.fill(); err != nil {
				return 0, err
			}
		}
		if r.buf.Len() == 0 {
			return 0, ErrChanged
		}
		k := min(int64(r.buf.Len()), abs-r.pos)
		r.buf.Next(int(k))
		r.pos += k
	}
	return abs, nil
}

// restart drops the encoder state: the next read encodes from the file's
// first byte.
func (r *replay) restart() {
	if r.w != nil {
		_ = r.w.Close()
		r.w = nil
	}
	r.buf.Reset()
	r.off, r.pos, r.done, r.parked = 0, 0, false, false
}
