// Package storetest is the conformance suite every store backend passes: the
// same tests run against file://, versitygw and MinIO, and each optional
// capability's tests run on every backend that has it.
package storetest

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"
	"testing"
	"testing/iotest"

	"github.com/podkeeper/podkeeper/agents/store"
)

// Backend is one store under test.
type Backend struct {
	// New returns an empty store (a fresh prefix) on each call.
	New func(t *testing.T) store.Store
	// MultipartThreshold is the size from which Put sends the body in parts
	// (0 = never): the Multipart checks then use bodies above it.
	MultipartThreshold int64
	// Wire, when set, reaches the traffic between the stores New returns and
	// their server; the Multiparter checks that need to refuse parts and count
	// them run only with it.
	Wire Wire
}

// Wire injects faults into a store's server traffic and counts it.
type Wire interface {
	// RefuseParts makes the server answer 503 to every upload of a part
	// numbered from or above; 0 stops refusing.
	RefuseParts(from int)
	// ResetCounts starts counting part uploads from zero.
	ResetCounts()
	// PartUploads is how many part uploads the server received since.
	PartUploads() int
}

var ctx = context.Background()

// Run runs the suite: the checks every Store passes, then those of each
// optional capability the backend has.
func Run(t *testing.T, b Backend) {
	checks := []struct {
		name string
		fn   func(t *testing.T, s store.Store)
	}{
		{"RoundTripMetadata", checkRoundTripMetadata},
		{"ContentEncoding", checkContentEncoding},
		{"UnseekableBody", checkUnseekableBody},
		{"EmptyObject", checkEmptyObject},
		{"UnusualKeys", checkUnusualKeys},
		{"InvalidKeysRefused", checkInvalidKeysRefused},
		{"NotFoundOnEveryCall", checkNotFoundOnEveryCall},
		{"ConditionalWrites", checkConditionalWrites},
		{"Ranges", checkRanges},
		{"OverwriteAndDelete", checkOverwriteAndDelete},
		{"ListPagingPast1000", checkListPagingPast1000},
		{"ListAfter", checkListAfter},
		{"ContextCancelled", checkContextCancelled},
	}
	for _, c := range checks {
		t.Run(c.name, func(t *testing.T) { c.fn(t, b.New(t)) })
	}
	if b.MultipartThreshold > 0 {
		t.Run("Multipart", func(t *testing.T) { checkMultipart(t, b.New(t), b.MultipartThreshold) })
	}
	if _, ok := b.New(t).(store.Multiparter); ok {
		t.Run("Multiparter", func(t *testing.T) { runMultiparter(t, b) })
	}
}

func checkRoundTripMetadata(t *testing.T, s store.Store) {
	body := []byte("hello, podkeeper\n")
	meta := map[string]string{"sha256": strings.Repeat("ab", 32), "mtime": "2026-11-26T10:00:00.123456789Z", "mode": "0644"}
	info, err := s.Put(ctx, "data/a/b.txt", bytes.NewReader(body), int64(len(body)), store.PutOptions{Metadata: meta, ContentType: "text/plain"})
	if err != nil {
		t.Fatal(err)
	}
	if info.ETag == "" || info.Size != int64(len(body)) {
		t.Fatalf("put info = %+v", info)
	}
	h, err := s.Head(ctx, "data/a/b.txt", store.HeadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if h.Size != int64(len(body)) || h.ETag != info.ETag || h.ModTime.IsZero() {
		t.Fatalf("head = %+v, put = %+v", h, info)
	}
	for k, v := range meta {
		if h.Metadata[k] != v {
			t.Errorf("metadata %s = %q, want %q (all: %v)", k, h.Metadata[k], v, h.Metadata)
		}
	}
	got := get(t, s, "data/a/b.txt", store.GetOptions{})
	if !bytes.Equal(got, body) {
		t.Fatalf("get = %q", got)
	}
}

// checkContentEncoding: the Content-Encoding given at Put is reported by
// Head and Get, and the stored bytes come back as they were put (the store
// never decodes them, whatever the HTTP client would do on its own).
func checkContentEncoding(t *testing.T, s store.Store) {
	content := bytes.Repeat([]byte("compressible line of text\n"), 2000)
	var gz bytes.Buffer
	w := gzip.NewWriter(&gz)
	w.Write(content)
	w.Close()
	if _, err := s.Put(ctx, "enc/a.txt.gz-stored", bytes.NewReader(gz.Bytes()), int64(gz.Len()),
		store.PutOptions{ContentType: "text/plain", ContentEncoding: "gzip"}); err != nil {
		t.Fatal(err)
	}
	h, err := s.Head(ctx, "enc/a.txt.gz-stored", store.HeadOptions{})
	if err != nil || h.ContentEncoding != "gzip" || h.Size != int64(gz.Len()) {
		t.Fatalf("head: encoding %q, %d bytes (want gzip, %d): %v", h.ContentEncoding, h.Size, gz.Len(), err)
	}
	rc, info, err := s.Get(ctx, "enc/a.txt.gz-stored", store.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(rc)
	rc.Close()
	if err != nil || !bytes.Equal(got, gz.Bytes()) || info.ContentEncoding != "gzip" {
		t.Fatalf("get: %d bytes (want the %d stored), encoding %q, %v", len(got), gz.Len(), info.ContentEncoding, err)
	}
	if _, err := s.Put(ctx, "enc/plain", strings.NewReader("x"), 1, store.PutOptions{}); err != nil {
		t.Fatal(err)
	}
	if h, err := s.Head(ctx, "enc/plain", store.HeadOptions{}); err != nil || h.ContentEncoding != "" {
		t.Fatalf("plain object: encoding %q, %v", h.ContentEncoding, err)
	}
}

func checkUnseekableBody(t *testing.T, s store.Store) {
	body := randBytes(t, 300_000)
	r := iotest.OneByteReader(bytes.NewReader(body)) // hides Seek
	if _, err := s.Put(ctx, "pipe", io.LimitReader(bufioish(r), int64(len(body))), int64(len(body)), store.PutOptions{}); err != nil {
		t.Fatal(err)
	}
	if got := get(t, s, "pipe", store.GetOptions{}); !bytes.Equal(got, body) {
		t.Fatal("content differs")
	}
}

func checkEmptyObject(t *testing.T, s store.Store) {
	if _, err := s.Put(ctx, "empty", bytes.NewReader(nil), 0, store.PutOptions{}); err != nil {
		t.Fatal(err)
	}
	h, err := s.Head(ctx, "empty", store.HeadOptions{})
	if err != nil || h.Size != 0 {
		t.Fatalf("head = %+v, %v", h, err)
	}
	if got := get(t, s, "empty", store.GetOptions{}); len(got) != 0 {
		t.Fatalf("get = %q", got)
	}
}

func checkUnusualKeys(t *testing.T, s store.Store) {
	keys := []string{"with space/file name.jpg", "ünïcödé/日本語.txt", "emoji/📷 photo.png", "plus+and&amp=.txt", "percent%20.txt"}
	for _, k := range keys {
		if _, err := s.Put(ctx, k, strings.NewReader(k), int64(len(k)), store.PutOptions{}); err != nil {
			t.Fatalf("put %q: %v", k, err)
		}
	}
	for _, k := range keys {
		if got := get(t, s, k, store.GetOptions{}); string(got) != k {
			t.Fatalf("get %q = %q", k, got)
		}
	}
	listed := listKeys(t, s, "")
	want := slices.Clone(keys)
	slices.Sort(want)
	if !slices.Equal(listed, want) {
		t.Fatalf("list = %q, want %q", listed, want)
	}
}

func checkInvalidKeysRefused(t *testing.T, s store.Store) {
	for _, k := range []string{"", "../escape", "a/../b", "/abs", "a//b", "a/./b", "nul\x00"} {
		if _, err := s.Put(ctx, k, strings.NewReader("x"), 1, store.PutOptions{}); err == nil {
			t.Errorf("put %q succeeded", k)
		} else if store.IsRetryable(err) {
			t.Errorf("put %q: a bad key is permanent, got retryable %v", k, err)
		}
	}
}

func checkNotFoundOnEveryCall(t *testing.T, s store.Store) {
	if _, err := s.Head(ctx, "missing", store.HeadOptions{}); !errors.Is(err, store.ErrNotExist) {
		t.Errorf("head: %v", err)
	}
	if _, _, err := s.Get(ctx, "missing", store.GetOptions{}); !errors.Is(err, store.ErrNotExist) {
		t.Errorf("get: %v", err)
	}
	if _, _, err := s.Get(ctx, "missing", store.GetOptions{Offset: 1, Length: 2}); !errors.Is(err, store.ErrNotExist) {
		t.Errorf("ranged get: %v", err)
	}
	if err := s.Delete(ctx, "missing"); err != nil {
		t.Errorf("delete of a missing key must succeed like S3: %v", err)
	}
	if keys := listKeys(t, s, "missing"); len(keys) != 0 {
		t.Errorf("list: %q", keys)
	}
	_, err := s.Put(ctx, "missing", strings.NewReader("x"), 1, store.PutOptions{IfMatch: `"0123"`})
	if !errors.Is(err, store.ErrPrecondition) && !errors.Is(err, store.ErrNotExist) {
		t.Errorf("put If-Match on a missing key: %v", err)
	}
	if store.IsRetryable(err) {
		t.Errorf("not-found must not be retryable: %v", err)
	}
}

func checkConditionalWrites(t *testing.T, s store.Store) {
	first, err := s.Put(ctx, "lease.json", strings.NewReader("v1"), 2, store.PutOptions{IfNoneMatch: true})
	if err != nil {
		t.Fatalf("create-only on a new key: %v", err)
	}
	_, err = s.Put(ctx, "lease.json", strings.NewReader("v2"), 2, store.PutOptions{IfNoneMatch: true})
	if !errors.Is(err, store.ErrPrecondition) || store.IsRetryable(err) {
		t.Fatalf("create-only on an existing key: %v", err)
	}
	second, err := s.Put(ctx, "lease.json", strings.NewReader("v3"), 2, store.PutOptions{IfMatch: first.ETag})
	if err != nil {
		t.Fatalf("If-Match with the current etag: %v", err)
	}
	_, err = s.Put(ctx, "lease.json", strings.NewReader("v4"), 2, store.PutOptions{IfMatch: first.ETag})
	if !errors.Is(err, store.ErrPrecondition) {
		t.Fatalf("If-Match with a stale etag: %v", err)
	}
	if got := get(t, s, "lease.json", store.GetOptions{}); string(got) != "v3" {
		t.Fatalf("content = %q, want v3", got)
	}
	h, _ := s.Head(ctx, "lease.json", store.HeadOptions{})
	if h.ETag != second.ETag {
		t.Fatalf("head etag %s, put etag %s", h.ETag, second.ETag)
	}
	// Racing creators: exactly one wins.
	var wg sync.WaitGroup
	var mu sync.Mutex
	wins := 0
	for i := range 8 {
		wg.Go(func() {
			v := fmt.Sprint(i)
			if _, err := s.Put(ctx, "race", strings.NewReader(v), int64(len(v)), store.PutOptions{IfNoneMatch: true}); err == nil {
				mu.Lock()
				wins++
				mu.Unlock()
			} else if !errors.Is(err, store.ErrPrecondition) && !store.IsRetryable(err) {
				t.Errorf("racer %d: %v", i, err)
			}
		})
	}
	wg.Wait()
	if wins != 1 {
		t.Fatalf("%d racers created the key, want exactly 1", wins)
	}
}

func checkRanges(t *testing.T, s store.Store) {
	body := randBytes(t, 100_000)
	if _, err := s.Put(ctx, "r", bytes.NewReader(body), int64(len(body)), store.PutOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ off, n int64 }{{0, 10}, {10, 1000}, {99_990, 10}, {50_000, 0}, {99_999, 1}} {
		rc, info, err := s.Get(ctx, "r", store.GetOptions{Offset: c.off, Length: c.n})
		if err != nil {
			t.Fatalf("range %d+%d: %v", c.off, c.n, err)
		}
		got, err := io.ReadAll(rc)
		rc.Close()
		if err != nil {
			t.Fatal(err)
		}
		end := int64(len(body))
		if c.n > 0 {
			end = c.off + c.n
		}
		if !bytes.Equal(got, body[c.off:end]) {
			t.Fatalf("range %d+%d: %d bytes differ", c.off, c.n, len(got))
		}
		if info.Size != int64(len(body)) {
			t.Fatalf("range %d+%d: size %d, want the object's size %d", c.off, c.n, info.Size, len(body))
		}
	}
}

func checkOverwriteAndDelete(t *testing.T, s store.Store) {
	for _, v := range []string{"one", "two!"} {
		if _, err := s.Put(ctx, "k/x", strings.NewReader(v), int64(len(v)), store.PutOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	if got := get(t, s, "k/x", store.GetOptions{}); string(got) != "two!" {
		t.Fatalf("got %q", got)
	}
	if err := s.Delete(ctx, "k/x"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Head(ctx, "k/x", store.HeadOptions{}); !errors.Is(err, store.ErrNotExist) {
		t.Fatalf("after delete: %v", err)
	}
	if keys := listKeys(t, s, ""); len(keys) != 0 {
		t.Fatalf("after delete list = %q", keys)
	}
}

func checkListPagingPast1000(t *testing.T, s store.Store) {
	const n = 1100
	var want []string
	for i := range n {
		want = append(want, fmt.Sprintf("many/%04d", i))
	}
	// Keys that sort between the others byte-wise, not as a directory walk would.
	want = append(want, "many-x", "many.x", "other/1")
	parallel(t, want, func(k string) error {
		_, err := s.Put(ctx, k, strings.NewReader("x"), 1, store.PutOptions{})
		return err
	})
	slices.Sort(want)
	if got := listKeys(t, s, ""); !slices.Equal(got, want) {
		t.Fatalf("list returned %d keys (first %q), want %d in byte order", len(got), head(got), len(want))
	}
	got := listKeys(t, s, "many/")
	if len(got) != n || got[0] != "many/0000" || got[n-1] != fmt.Sprintf("many/%04d", n-1) {
		t.Fatalf("prefixed list: %d keys", len(got))
	}
	if got := listKeys(t, s, "many"); len(got) != n+2 {
		t.Fatalf("list of a partial prefix: %d keys, want %d", len(got), n+2)
	}
	// Stopping early must not error or leak.
	count := 0
	for _, err := range s.List(ctx, "") {
		if err != nil {
			t.Fatal(err)
		}
		if count++; count == 3 {
			break
		}
	}
}

func checkContextCancelled(t *testing.T, s store.Store) {
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	_, err := s.Put(cctx, "c", strings.NewReader("x"), 1, store.PutOptions{})
	if err == nil {
		t.Fatal("put with a cancelled context succeeded")
	}
	if store.IsRetryable(err) {
		t.Fatalf("cancellation must not be retryable: %v", err)
	}
}

func checkMultipart(t *testing.T, s store.Store, multipart int64) {
	body := randBytes(t, int(multipart*2+12345))
	meta := map[string]string{"sha256": "x"}
	// Known size, unseekable.
	if _, err := s.Put(ctx, "big/known", bufioish(bytes.NewReader(body)), int64(len(body)), store.PutOptions{Metadata: meta}); err != nil {
		t.Fatal(err)
	}
	// Unknown size.
	info, err := s.Put(ctx, "big/unknown", bufioish(bytes.NewReader(body)), -1, store.PutOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if info.Size != int64(len(body)) {
		t.Fatalf("unknown-size put reports %d bytes", info.Size)
	}
	for _, k := range []string{"big/known", "big/unknown"} {
		if got := get(t, s, k, store.GetOptions{}); !bytes.Equal(got, body) {
			t.Fatalf("%s: content differs", k)
		}
	}
	if h, _ := s.Head(ctx, "big/known", store.HeadOptions{}); h.Metadata["sha256"] != "x" {
		t.Fatalf("multipart metadata lost: %v", h.Metadata)
	}
	_, err = s.Put(ctx, "big/known", bufioish(bytes.NewReader(body)), int64(len(body)), store.PutOptions{IfNoneMatch: true})
	if !errors.Is(err, store.ErrPrecondition) {
		t.Fatalf("multipart create-only on an existing key: %v", err)
	}
}

func get(t *testing.T, s store.Store, key string, o store.GetOptions) []byte {
	t.Helper()
	rc, _, err := s.Get(context.Background(), key, o)
	if err != nil {
		t.Fatalf("get %q: %v", key, err)
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		t.Fatalf("read %q: %v", key, err)
	}
	return b
}

func listKeys(t *testing.T, s store.Store, prefix string) []string {
	t.Helper()
	var keys []string
	for o, err := range s.List(context.Background(), prefix) {
		if err != nil {
			t.Fatalf("list %q: %v", prefix, err)
		}
		keys = append(keys, o.Key)
	}
	return keys
}

func randBytes(t *testing.T, n int) []byte {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

func head(s []string) []string { return s[:min(3, len(s))] }

// bufioish hides every interface but Read (Seek, WriterTo, Len) from the store.
func bufioish(r io.Reader) io.Reader { return struct{ io.Reader }{r} }

func parallel(t *testing.T, items []string, fn func(string) error) {
	t.Helper()
	ch := make(chan string)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var first error
	for range 16 {
		wg.Go(func() {
			for k := range ch {
				if err := fn(k); err != nil {
					mu.Lock()
					if first == nil {
						first = fmt.Errorf("%s: %w", k, err)
					}
					mu.Unlock()
				}
			}
		})
	}
	for _, k := range items {
		ch <- k
	}
	close(ch)
	wg.Wait()
	if first != nil {
		t.Fatal(first)
	}
}

// listOnly hides every optional ability of a store: store.ListAfter's
// fallback must give what the capability gives.
type listOnly struct{ store.Store }

func checkListAfter(t *testing.T, s store.Store) {
	for _, k := range []string{"log/1", "log/2", "log/2x", "log/3", "logz/1", "other"} {
		if _, err := s.Put(ctx, k, strings.NewReader(k), int64(len(k)), store.PutOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	_, native := s.(store.ListerAfter)
	for _, c := range []struct{ after, want string }{
		{"", "log/1 log/2 log/2x log/3"},
		{"log/2", "log/2x log/3"},
		{"log/0", "log/1 log/2 log/2x log/3"},
		{"log/3", ""},
		{"log/9", ""},
	} {
		for name, st := range map[string]store.Store{"store": s, "fallback": listOnly{s}} {
			var got []string
			for o, err := range store.ListAfter(ctx, st, "log/", c.after) {
				if err != nil {
					t.Fatal(err)
				}
				got = append(got, o.Key)
			}
			if g := strings.Join(got, " "); g != c.want {
				t.Errorf("%s (native %v): ListAfter(log/, %q) = %q, want %q", name, native, c.after, g, c.want)
			}
		}
	}
}
