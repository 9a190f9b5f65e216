package codec

import (
	"bytes"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"strings"
	"testing"
	"testing/iotest"
	"time"

	"github.com/klauspost/compress/zstd"
)

// text is compressible, log-like content of n bytes.
func text(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, 1))
	var b bytes.Buffer
	for b.Len() < n {
		fmt.Fprintf(&b, `{"ts":"2026-03-04T05:06:%02d.%06dZ","level":"info","user":%d,"msg":"upload finished","bytes":%d}`+"\n",
			r.IntN(60), r.IntN(1e6), r.IntN(500), r.IntN(1<<20))
	}
	return b.Bytes()[:n]
}

func random(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, 2))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func readAll(t *testing.T, r io.Reader) []byte {
	t.Helper()
	b, err := io.ReadAll(r)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func decodeAll(t *testing.T, enc string, stored []byte, size int64) []byte {
	t.Helper()
	rc, err := DecodeSized(enc, bytes.NewReader(stored), size)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	return readAll(t, rc)
}

// TestRoundTrip: text of every size class (empty, within the sample, at and
// past its edge, many chunks) is stored encoded, smaller, identical after
// decoding, and every Open gives the same bytes.
func TestRoundTrip(t *testing.T) {
	for _, enc := range []string{Zstd, Gzip} {
		for _, n := range []int{0, 1, 100, 4096, SampleSize - 1, SampleSize, SampleSize + 1, 3*replayChunk + 17, 2 << 20} {
			t.Run(fmt.Sprintf("%s/%d", enc, n), func(t *testing.T) {
				content := text(uint64(n), n)
				b, err := Encode(enc, "x.log", bytes.NewReader(content), int64(n))
				if err != nil {
					t.Fatal(err)
				}
				if n <= 100 {
					// Tiny files gain nothing from a frame header.
					if b.Encoding != None {
						t.Fatalf("%d bytes encoded as %q (%d bytes)", n, b.Encoding, b.Size)
					}
					return
				}
				if b.Encoding != enc || b.Size >= int64(n)*9/10 {
					t.Fatalf("encoding %q, %d of %d bytes", b.Encoding, b.Size, n)
				}
				first := readAll(t, b.Open())
				if int64(len(first)) != b.Size {
					t.Fatalf("read %d bytes, Size says %d", len(first), b.Size)
				}
				if again := readAll(t, iotest.OneByteReader(b.Open())); !bytes.Equal(again, first) {
					t.Fatal("a second Open gave other bytes")
				}
				if got := decodeAll(t, enc, first, int64(n)); !bytes.Equal(got, content) {
					t.Fatalf("decoded %d bytes differ from the %d original", len(got), n)
				}
			})
		}
	}
}

// TestRawWhenNotWorthIt: already compressed names and magic bytes, and
// content that does not compress, go as they are.
func TestRawWhenNotWorthIt(t *testing.T) {
	jpegLike := append([]byte{0xff, 0xd8, 0xff, 0xe0}, text(1, 20000)...)
	mp4Like := append([]byte{0, 0, 0, 0x18, 'f', 't', 'y', 'p'}, text(2, 20000)...)
	cases := map[string]struct {
		name string
		data []byte
	}{
		"jpg name, text content":   {"photo.JPG", text(3, 20000)},
		"zst name":                 {"a/b.tar.zst", text(4, 20000)},
		"jpeg magic, no extension": {"upload-123", jpegLike},
		"mp4 magic":                {"clip", mp4Like},
		"random bytes":             {"blob.bin", random(5, 200000)},
		"random small":             {"blob.txt", random(6, 3000)},
		// The sample compresses, the rest does not: the whole-file check
		// sends it raw.
		"compressible head only": {"mixed.dat", append(text(7, SampleSize), random(8, 2<<20)...)},
	}
	for name, c := range cases {
		for _, enc := range []string{Zstd, Gzip} {
			b, err := Encode(enc, c.name, bytes.NewReader(c.data), int64(len(c.data)))
			if err != nil {
				t.Fatal(err)
			}
			if b.Encoding != None || b.Size != int64(len(c.data)) {
				t.Errorf("%s with %s: encoding %q, %d bytes", name, enc, b.Encoding, b.Size)
			}
			if got := readAll(t, b.Open()); !bytes.Equal(got, c.data) {
				t.Errorf("%s: raw body differs", name)
			}
		}
	}
	if b, _ := Encode(None, "x.log", bytes.NewReader(text(9, 9000)), 9000); b.Encoding != None {
		t.Error("None encoded")
	}
	if _, err := Encode("br", "x.log", bytes.NewReader(text(9, 9000)), 9000); err == nil {
		t.Error("unknown encoding accepted")
	}
}

// TestReplaySeek: the HTTP client's seeks (position, length, rewind, a
// range in the middle) give the bytes a straight read gives.
func TestReplaySeek(t *testing.T) {
	content := text(10, 1<<20)
	b, err := Encode(Zstd, "x.csv", bytes.NewReader(content), int64(len(content)))
	if err != nil || b.data != nil {
		t.Fatalf("%v, in memory: %v", err, b.data != nil)
	}
	want := readAll(t, b.Open())
	r := b.Open()
	if n, err := r.Seek(0, io.SeekEnd); err != nil || n != b.Size {
		t.Fatalf("seek end: %d %v", n, err)
	}
	if n, err := r.Read(make([]byte, 10)); n != 0 || err != io.EOF {
		t.Fatalf("read at end: %d %v", n, err)
	}
	if _, err := r.Seek(0, io.SeekStart); err != nil {
		t.Fatal(err)
	}
	half := make([]byte, len(want)/2)
	if _, err := io.ReadFull(r, half); err != nil || !bytes.Equal(half, want[:len(half)]) {
		t.Fatalf("first half: %v", err)
	}
	if pos, _ := r.Seek(0, io.SeekCurrent); pos != int64(len(half)) {
		t.Fatalf("position %d", pos)
	}
	if _, err := r.Seek(123, io.SeekStart); err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, r); !bytes.Equal(got, want[123:]) {
		t.Fatal("read after a backward seek differs")
	}
	if _, err := r.Seek(int64(len(want))-5, io.SeekStart); err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, r); !bytes.Equal(got, want[len(want)-5:]) {
		t.Fatal("tail differs")
	}
}

// TestChangedWhileEncoding: a file that no longer encodes to the measured
// length fails the read instead of sending other bytes than announced.
func TestChangedWhileEncoding(t *testing.T) {
	content := text(11, 512<<10)
	src := bytes.Clone(content)
	b, err := Encode(Gzip, "x.log", bytes.NewReader(src), int64(len(src)))
	if err != nil || b.Encoding != Gzip {
		t.Fatal(err, b.Encoding)
	}
	copy(src[100<<10:], random(12, 300<<10)) // less compressible now
	if _, err := io.ReadAll(b.Open()); !errors.Is(err, ErrChanged) {
		t.Fatalf("changed file: %v", err)
	}
	copy(src, bytes.Repeat([]byte{'a'}, len(src))) // far more compressible
	if _, err := io.ReadAll(b.Open()); !errors.Is(err, ErrChanged) {
		t.Fatalf("changed file: %v", err)
	}
}

func zstdOf(t *testing.T, b []byte, opts ...zstd.EOption) []byte {
	var buf bytes.Buffer
	w, err := zstd.NewWriter(&buf, opts...)
	if err != nil {
		t.Fatal(err)
	}
	w.Write(b)
	w.Close()
	return buf.Bytes()
}

func gzipOf(b []byte) []byte {
	var buf bytes.Buffer
	w := gzip.NewWriter(&buf)
	w.Write(b)
	w.Close()
	return buf.Bytes()
}

// TestDecodeHostile: bombs stop at the recorded size, short streams,
// garbage, truncation and trailing data are *InvalidError, a window beyond
// MaxWindow is refused, and network errors pass through unchanged.
func TestDecodeHostile(t *testing.T) {
	zeros := make([]byte, 256<<20)
	bombs := map[string][]byte{Zstd: zstdOf(t, zeros), Gzip: gzipOf(zeros)}
	for enc, bomb := range bombs {
		t.Logf("%s bomb: %d bytes decode to %d", enc, len(bomb), len(zeros))
		start := time.Now()
		rc, err := DecodeSized(enc, bytes.NewReader(bomb), 1000)
		if err != nil {
			t.Fatal(err)
		}
		n, err := io.Copy(io.Discard, rc)
		rc.Close()
		var ie *InvalidError
		if !errors.As(err, &ie) || !errors.Is(err, ErrTooLong) || n != 1000 {
			t.Errorf("%s bomb: %d bytes, %v", enc, n, err)
		}
		if d := time.Since(start); d > 5*time.Second {
			t.Errorf("%s bomb took %v to refuse", enc, d)
		}
	}
	content := text(13, 100000)
	streams := map[string][]byte{Zstd: zstdOf(t, content), Gzip: gzipOf(content)}
	for enc, s := range streams {
		cases := map[string]struct {
			stored []byte
			size   int64
			want   error
		}{
			"short":     {s, int64(len(content)) + 1, ErrTooShort},
			"truncated": {s[:len(s)/2], int64(len(content)), nil},
			"garbage":   {random(14, 5000), int64(len(content)), nil},
			"trailing":  {append(bytes.Clone(s), "junk after the stream"...), int64(len(content)), nil},
			"flipped":   {flip(s, len(s)/2), int64(len(content)), nil},
		}
		for name, c := range cases {
			rc, err := DecodeSized(enc, bytes.NewReader(c.stored), c.size)
			if err == nil {
				_, err = io.Copy(io.Discard, rc)
				rc.Close()
			}
			var ie *InvalidError
			if !errors.As(err, &ie) || (c.want != nil && !errors.Is(err, c.want)) {
				t.Errorf("%s %s: %v", enc, name, err)
			}
		}
	}
	// A frame asking for a 64 MiB window.
	big := zstdOf(t, text(15, 20<<20), zstd.WithWindowSize(64<<20), zstd.WithEncoderLevel(zstd.SpeedBestCompression), zstd.WithSingleSegment(false))
	rc, err := DecodeSized(Zstd, bytes.NewReader(big), 20<<20)
	if err == nil {
		_, err = io.Copy(io.Discard, rc)
		rc.Close()
	}
	var ie *InvalidError
	if !errors.As(err, &ie) || !strings.Contains(err.Error(), "window") {
		t.Errorf("64 MiB window: %v", err)
	}
	// The network failing mid-body is the network's error, not the object's.
	netErr := errors.New("connection reset by peer")
	for enc, s := range streams {
		rc, err := DecodeSized(enc, io.MultiReader(bytes.NewReader(s[:len(s)/2]), iotest.ErrReader(netErr)), int64(len(content)))
		if err == nil {
			_, err = io.Copy(io.Discard, rc)
			rc.Close()
		}
		if !errors.Is(err, netErr) || errors.As(err, &ie) {
			t.Errorf("%s: network error came back as %v", enc, err)
		}
	}
	if _, err := Decode("br", bytes.NewReader(nil)); !errors.As(err, &ie) {
		t.Errorf("unknown encoding: %v", err)
	}
	// Identity: the recorded size is enforced too.
	rc, _ = DecodeSized(None, strings.NewReader("12345"), 4)
	if _, err := io.ReadAll(rc); !errors.Is(err, ErrTooLong) {
		t.Errorf("identity too long: %v", err)
	}
}

func flip(b []byte, i int) []byte {
	b = bytes.Clone(b)
	b[i] ^= 0xff
	return b
}

func TestKnown(t *testing.T) {
	for _, e := range []string{None, Zstd, Gzip} {
		if !Known(e) {
			t.Errorf("%q unknown", e)
		}
	}
	for _, e := range []string{"br", "ZSTD", "identity", "gzip "} {
		if Known(e) {
			t.Errorf("%q known", e)
		}
	}
}
