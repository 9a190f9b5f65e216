package storetest

import (
	"bytes"
	"errors"
	"io"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/podkeeper/podkeeper/agents/store"
)

// runMultiparter checks resumable multipart uploads: resume after a partial
// upload, a vanished upload starting over, list and abort.
func runMultiparter(t *testing.T, b Backend) {
	t.Run("ResumeAfterRefusedParts", func(t *testing.T) {
		if b.Wire == nil {
			t.Skip("the backend gives no access to its traffic")
		}
		checkResume(t, b.New(t).(store.Multiparter), b.Wire)
	})
	t.Run("AbortedUploadStartsOver", func(t *testing.T) {
		checkAbortedUpload(t, b.New(t).(store.Multiparter))
	})
	t.Run("ConditionalComplete", func(t *testing.T) {
		checkConditionalComplete(t, b.New(t).(store.Multiparter))
	})
}

// checkConditionalComplete: completions are conditional like Put. Two
// uploads of a new key with IfNoneMatch, both with their parts on the
// server before either completes: exactly one completes, the other gets
// ErrPrecondition. IfMatch on a stale ETag (or on a key that is gone) fails
// the same way, and the refused upload's parts stay usable: a new attempt
// under the right condition completes it.
func checkConditionalComplete(t *testing.T, mp store.Multiparter) {
	s := mp.(store.Store)
	const key = "data/racy"
	bodies := [][]byte{bytes.Repeat([]byte("A"), 1<<20), bytes.Repeat([]byte("B"), 1<<20)}
	var arrived atomic.Int32
	both := make(chan struct{})
	errs := make([]error, 2)
	var wg sync.WaitGroup
	for i, body := range bodies {
		wg.Go(func() {
			j := &store.MultipartJournal{Key: key, Size: int64(len(body))}
			_, errs[i] = mp.UploadFileResumable(ctx, key, bytes.NewReader(body), int64(len(body)), j, store.MultipartOptions{
				PartSize: store.MinPartSize, Concurrency: 1, IfNoneMatch: true,
				PartDone: func(int32) {
					// Complete only once both uploads have their parts.
					if arrived.Add(1) == 2 {
						close(both)
					}
					select {
					case <-both:
					case <-time.After(time.Minute):
					}
				},
			})
		})
	}
	wg.Wait()
	if arrived.Load() != 2 {
		t.Fatalf("only %d uploads sent their parts: %v", arrived.Load(), errs)
	}
	winner := -1
	for i, err := range errs {
		switch {
		case err == nil:
			if winner >= 0 {
				t.Fatalf("both completions of a new key succeeded with If-None-Match")
			}
			winner = i
		case errors.Is(err, store.ErrPrecondition) && !store.IsRetryable(err):
		default:
			t.Fatalf("racer %d: %v, want ErrPrecondition", i, err)
		}
	}
	if winner < 0 {
		t.Fatalf("no completion succeeded: %v", errs)
	}
	if got := get(t, s, key, store.GetOptions{}); !bytes.Equal(got, bodies[winner]) {
		t.Fatalf("object is not the winner's body")
	}
	cur, err := s.Head(ctx, key, store.HeadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range uploadIDs(t, mp, key) {
		_ = mp.AbortMultipart(ctx, key, id)
	}

	// If-Match: refused on a stale ETag, then the same upload completes on
	// the current one.
	next := bytes.Repeat([]byte("C"), 1<<20)
	j := &store.MultipartJournal{Key: key, Size: int64(len(next))}
	o := store.MultipartOptions{PartSize: store.MinPartSize, Concurrency: 1, IfMatch: `"0123456789abcdef0123456789abcdef"`}
	if _, err := mp.UploadFileResumable(ctx, key, bytes.NewReader(next), int64(len(next)), j, o); !errors.Is(err, store.ErrPrecondition) {
		t.Fatalf("If-Match on a stale ETag: %v", err)
	}
	if j.UploadID == "" || j.PartCount() != 1 {
		t.Fatalf("the refused upload was dropped: %+v", j)
	}
	refused := j.UploadID
	o.IfMatch = cur.ETag
	if _, err := mp.UploadFileResumable(ctx, key, errAfter{bytes.NewReader(next), 0}, int64(len(next)), j, o); err != nil {
		t.Fatalf("If-Match on the current ETag, parts reused (the file is not read): %v", err)
	}
	if j.UploadID != refused {
		t.Errorf("a new upload was started instead of completing %s", refused)
	}
	if got := get(t, s, key, store.GetOptions{}); !bytes.Equal(got, next) {
		t.Fatal("If-Match completion did not replace the object")
	}
	// If-Match on a key that is gone.
	if err := s.Delete(ctx, key); err != nil {
		t.Fatal(err)
	}
	j = &store.MultipartJournal{Key: key, Size: int64(len(next))}
	o.IfMatch = cur.ETag
	_, err = mp.UploadFileResumable(ctx, key, bytes.NewReader(next), int64(len(next)), j, o)
	if !errors.Is(err, store.ErrPrecondition) {
		t.Fatalf("If-Match on a deleted key: %v", err)
	}
	if err := mp.AbortMultipart(ctx, key, j.UploadID); err != nil {
		t.Fatal(err)
	}
}

// partData is four full parts and a short last one.
func partData() []byte {
	const part = store.MinPartSize
	data := make([]byte, 4*part+1234)
	for i := range data {
		data[i] = byte(i*7 + i/part)
	}
	return data
}

// checkResume: parts refused by the server fail the attempt retryably; a new
// process resumes from the journal on disk and sends only the missing parts.
func checkResume(t *testing.T, mp store.Multiparter, wire Wire) {
	s := mp.(store.Store)
	data := partData()
	size := int64(len(data))
	jpath := store.JournalPath(t.TempDir(), "data/big")
	j := &store.MultipartJournal{Key: "data/big", Size: size}
	opts := store.MultipartOptions{PartSize: store.MinPartSize, Concurrency: 1, Metadata: map[string]string{"sha256": "x"},
		Persist: func(j *store.MultipartJournal) error { return j.Save(jpath) }}

	// Parts 3+ are refused: two parts land, the call fails retryably.
	wire.RefuseParts(3)
	_, err := mp.UploadFileResumable(ctx, "data/big", bytes.NewReader(data), size, j, opts)
	if err == nil || !store.IsRetryable(err) {
		t.Fatalf("first attempt: %v, want a retryable error", err)
	}
	wire.RefuseParts(0)

	// A new process: the journal from disk, two parts reused.
	b, err := os.ReadFile(jpath)
	if err != nil {
		t.Fatal(err)
	}
	j2, err := store.ParseJournal(b)
	if err != nil || j2.PartCount() != 2 || j2.UploadID == "" {
		t.Fatalf("journal after the failure: %+v, %v", j2, err)
	}
	wire.ResetCounts()
	info, err := mp.UploadFileResumable(ctx, "data/big", bytes.NewReader(data), size, j2, opts)
	if err != nil {
		t.Fatal(err)
	}
	if got := wire.PartUploads(); got != 3 {
		t.Errorf("resume uploaded %d parts, want 3 of 5", got)
	}
	if got := get(t, s, "data/big", store.GetOptions{}); !bytes.Equal(got, data) || info.ETag == "" {
		t.Fatalf("object differs (%d bytes, want %d)", len(got), size)
	}
	if h, err := s.Head(ctx, "data/big", store.HeadOptions{}); err != nil || h.Metadata["sha256"] != "x" {
		t.Errorf("metadata %v (%v)", h.Metadata, err)
	}
	if ups, err := mp.ListMultipartUploads(ctx, "data/big"); err != nil || len(ups) != 0 {
		t.Errorf("uploads left: %v %v", ups, err)
	}
}

// errAfter is a file that fails reads past a limit: the first attempt of an
// upload stops there, as a crash would.
type errAfter struct {
	r     io.ReaderAt
	limit int64
}

func (e errAfter) ReadAt(p []byte, off int64) (int, error) {
	if off+int64(len(p)) > e.limit {
		return 0, errors.New("disk went away")
	}
	return e.r.ReadAt(p, off)
}

// checkAbortedUpload: an interrupted upload is listed until aborted (twice is
// fine), and its journal then starts a new upload instead of reusing the id.
func checkAbortedUpload(t *testing.T, mp store.Multiparter) {
	s := mp.(store.Store)
	data := partData()
	size := int64(len(data))
	const key = "data/big2"
	j := &store.MultipartJournal{Key: key, Size: size}
	_, err := mp.UploadFileResumable(ctx, key, errAfter{bytes.NewReader(data), store.MinPartSize}, size, j, store.MultipartOptions{PartSize: store.MinPartSize, Concurrency: 1})
	if err == nil || j.PartCount() != 1 {
		t.Fatalf("interrupted upload: %v, %d parts", err, j.PartCount())
	}
	if ids := uploadIDs(t, mp, key); !slices.Contains(ids, j.UploadID) {
		t.Errorf("interrupted upload %s not listed: %q", j.UploadID, ids)
	}
	if err := mp.AbortMultipart(ctx, key, j.UploadID); err != nil {
		t.Fatal(err)
	}
	if err := mp.AbortMultipart(ctx, key, j.UploadID); err != nil {
		t.Errorf("aborting twice: %v", err)
	}
	if ids := uploadIDs(t, mp, key); slices.Contains(ids, j.UploadID) {
		t.Errorf("aborted upload %s still listed", j.UploadID)
	}
	old := j.UploadID
	if _, err := mp.UploadFileResumable(ctx, key, bytes.NewReader(data), size, j, store.MultipartOptions{PartSize: store.MinPartSize, Concurrency: 3}); err != nil {
		t.Fatalf("after abort: %v", err)
	}
	if j.UploadID == old {
		t.Error("the vanished upload id was reused")
	}
	if h, err := s.Head(ctx, key, store.HeadOptions{}); err != nil || h.Size != size {
		t.Errorf("%s: %+v %v", key, h, err)
	}
	if got := get(t, s, key, store.GetOptions{}); !bytes.Equal(got, data) {
		t.Errorf("%s: content differs", key)
	}
	if ids := uploadIDs(t, mp, key); len(ids) != 0 {
		t.Errorf("uploads left: %q", ids)
	}
}

func uploadIDs(t *testing.T, mp store.Multiparter, prefix string) []string {
	t.Helper()
	ups, err := mp.ListMultipartUploads(ctx, prefix)
	if err != nil {
		t.Fatalf("list uploads %q: %v", prefix, err)
	}
	var ids []string
	for _, u := range ups {
		ids = append(ids, u.UploadID)
	}
	return ids
}
