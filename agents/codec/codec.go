// Package codec is the one place that knows how data objects may be encoded
// (SYNC_COMPRESS): which encodings exist, how to decode one safely, and how the
// syncer encodes a file (see encode.go), including whether it is worth it.
//
// An encoded object records its encoding in the manifest entry
// (snapshot.File.Encoding) and in its own metadata; Size and SHA256 stay those
// of the original content, which every reader verifies after decoding.
package codec

import (
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/klauspost/compress/zstd"
)

// The encodings. None ("") is the content as is.
const (
	None = ""
	Zstd = "zstd"
	Gzip = "gzip"
)

// Decoder limits for zstd: a frame may not ask for a window above MaxWindow
// (the reference CLI uses at most 8 MiB up to level 19), and the decoder's
// buffers stay small (low-memory mode, one goroutine-free stream).
const (
	MaxWindow    = 8 << 20
	maxDecodeMem = 64 << 20
)

// Known reports whether enc is an encoding this version reads.
func Known(enc string) bool { return enc == None || enc == Zstd || enc == Gzip }

// ContentEncoding is the HTTP Content-Encoding an object of encoding enc is
// stored with: a plain HTTP GET then either decodes it (gzip, every client)
// or sees it labelled as encoded (zstd, RFC 8878), never as the content.
func ContentEncoding(enc string) string { return enc }

// InvalidError says an object's stored bytes are not a valid stream of its
// recorded encoding and size: damaged, or written by someone else.
type InvalidError struct {
	Encoding string
	Err      error
}

func (e *InvalidError) Error() string {
	return fmt.Sprintf("stored bytes are not a valid %s stream of the recorded content: %v", e.Encoding, e.Err)
}

func (e *InvalidError) Unwrap() error { return e.Err }

// ErrTooLong and ErrTooShort are the size mismatches DecodeSized reports
// (wrapped in *InvalidError).
var (
	ErrTooLong  = errors.New("decodes to more bytes than the recorded size")
	ErrTooShort = errors.New("decodes to fewer bytes than the recorded size")
)

var zstdDecoders = sync.Pool{New: func() any {
	d, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderLowmem(true),
		zstd.WithDecoderMaxWindow(MaxWindow), zstd.WithDecoderMaxMemory(maxDecodeMem))
	if err != nil {
		panic(err) // static options
	}
	return d
}}

// Decode returns the content of r, an object stored with encoding enc (""
// returns r as is). Errors of r itself (the network) come back unchanged;
// anything the decoder refuses is an *InvalidError. The decoded length is not
// bounded here: use DecodeSized when the recorded size is known (it always is
// for a manifest entry), so a decompression bomb stops at size+1 bytes.
func Decode(enc string, r io.Reader) (io.ReadCloser, error) {
	src := &srcReader{r: r}
	switch enc {
	case None:
		return io.NopCloser(r), nil
	case Zstd:
		d := zstdDecoders.Get().(*zstd.Decoder)
		if err := d.Reset(src); err != nil {
			zstdDecoders.Put(d)
			return nil, src.wrap(enc, err)
		}
		return &decoder{enc: enc, src: src, r: d, close: func() { d.Reset(nil); zstdDecoders.Put(d) }}, nil
	case Gzip:
		z, err := gzip.NewReader(src)
		if err != nil {
			return nil, src.wrap(enc, err)
		}
		return &decoder{enc: enc, src: src, r: z, close: func() { z.Close() }}, nil
	}
	return nil, &InvalidError{Encoding: enc, Err: fmt.Errorf("unknown encoding %q (this version reads %q and %q)", enc, Zstd, Gzip)}
}

// DecodeSized is Decode with the decoded length checked against size: a
// stream that goes on past size bytes fails at byte size+1 with ErrTooLong,
// one that ends early fails with ErrTooShort (both *InvalidError for an
// encoded object; for enc "" the same errors say the object is not the size
// recorded).
func DecodeSized(enc string, r io.Reader, size int64) (io.ReadCloser, error) {
	rc, err := Decode(enc, r)
	if err != nil {
		return nil, err
	}
	return &sized{rc: rc, enc: enc, left: size}, nil
}

// srcReader remembers whether the underlying reader failed, so that a
// decoder error can be told apart from a network error it passed on.
type srcReader struct {
	r   io.Reader
	err error
}

func (s *srcReader) Read(p []byte) (int, error) {
	n, err := s.r.Read(p)
	if err != nil && err != io.EOF {
		s.err = err
	}
	return n, err
}

func (s *srcReader) wrap(enc string, err error) error {
	if err == nil || err == io.EOF {
		return err
	}
	if s.err != nil {
		return s.err
	}
	if err == io.ErrUnexpectedEOF {
		err = errors.New("truncated stream")
	}
	return &InvalidError{Encoding: enc, Err: err}
}

type decoder struct {
	enc   string
	src   *srcReader
	r     io.Reader
	close func()
}

func (d *decoder) Read(p []byte) (int, error) {
	if d.r == nil {
		return 0, errors.New("codec: read after close")
	}
	n, err := d.r.Read(p)
	return n, d.src.wrap(d.enc, err)
}

func (d *decoder) Close() error {
	if d.close != nil {
		d.close()
		d.close, d.r = nil, nil
	}
	return nil
}

type sized struct {
	rc   io.ReadCloser
	enc  string
	left int64
	err  error // sticky size error
}

func (s *sized) Read(p []byte) (int, error) {
	if s.err != nil {
		return 0, s.err
	}
	if int64(len(p)) > s.left+1 {
		p = p[:s.left+1] // one byte more than allowed shows a longer stream
	}
	n, err := s.rc.Read(p)
	if int64(n) > s.left {
		return int(s.left), s.invalid(ErrTooLong)
	}
	s.left -= int64(n)
	if err == io.EOF && s.left > 0 {
		return n, s.invalid(ErrTooShort)
	}
	return n, err
}

func (s *sized) invalid(err error) error {
	enc := s.enc
	if enc == None {
		enc = "identity"
	}
	s.err = &InvalidError{Encoding: enc, Err: err}
	return s.err
}

func (s *sized) Close() error { return s.rc.Close() }
