package store_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"strconv"
	"testing"

	"github.com/podkeeper/podkeeper/agents/store"
	"github.com/podkeeper/podkeeper/test/peers"
)

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

func TestUploadFileResumable(t *testing.T) {
	if testing.Short() {
		t.Skip("needs the S3 peers")
	}
	for _, kind := range peers.S3Kinds {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			srv := peers.StartS3(t, kind)
			proxy := peers.NewCountingProxy(t, srv.Endpoint)
			cfg := srv.StoreConfig(t, "mp")
			cfg.S3Endpoint = proxy.URL
			st, err := store.NewS3(context.Background(), cfg, store.S3Options{})
			if err != nil {
				t.Fatal(err)
			}
			const part = store.MinPartSize
			size := int64(4*part + 1234)
			data := make([]byte, size)
			for i := range data {
				data[i] = byte(i*7 + i/part)
			}
			ctx := context.Background()
			jpath := store.JournalPath(t.TempDir(), "data/big")
			j := &store.MultipartJournal{Key: "data/big", Size: size}
			opts := store.MultipartOptions{PartSize: part, Concurrency: 1, Metadata: map[string]string{"sha256": "x"},
				Persist: func(j *store.MultipartJournal) error { return j.Save(jpath) }}

			// Parts 3+ are refused: two parts land, the call fails retryably.
			proxy.FailWith(http.StatusServiceUnavailable, func(r *http.Request) bool {
				n, err := strconv.Atoi(r.URL.Query().Get("partNumber"))
				return err == nil && n >= 3
			})
			_, err = st.UploadFileResumable(ctx, "data/big", bytes.NewReader(data), size, j, opts)
			if err == nil || !store.IsRetryable(err) {
				t.Fatalf("first attempt: %v, want a retryable error", err)
			}
			proxy.FailWith(0, nil)

			// A new process: the journal from disk, two parts reused.
			j2, err := store.LoadJournal(jpath)
			if err != nil || j2.PartCount() != 2 || j2.UploadID == "" {
				t.Fatalf("journal after the failure: %+v, %v", j2, err)
			}
			proxy.Reset()
			info, err := st.UploadFileResumable(ctx, "data/big", bytes.NewReader(data), size, j2, opts)
			if err != nil {
				t.Fatal(err)
			}
			if got := proxy.Count("PUT-part"); got != 3 {
				t.Errorf("resume uploaded %d parts, want 3 of 5", got)
			}
			rc, _, err := st.Get(ctx, "data/big", store.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			got, _ := io.ReadAll(rc)
			rc.Close()
			if !bytes.Equal(got, data) || info.ETag == "" {
				t.Fatalf("object differs (%d bytes, want %d)", len(got), size)
			}
			if h, err := st.Head(ctx, "data/big", store.HeadOptions{}); err != nil || h.Metadata["sha256"] != "x" {
				t.Errorf("metadata %v (%v)", h.Metadata, err)
			}

			// An upload that vanished (aborted by someone else) starts over.
			j3 := &store.MultipartJournal{Key: "data/big2", Size: size}
			_, err = st.UploadFileResumable(ctx, "data/big2", errAfter{bytes.NewReader(data), part}, size, j3, store.MultipartOptions{PartSize: part, Concurrency: 1})
			if err == nil || j3.PartCount() != 1 {
				t.Fatalf("interrupted upload: %v, %d parts", err, j3.PartCount())
			}
			if err := st.AbortMultipart(ctx, "data/big2", j3.UploadID); err != nil {
				t.Fatal(err)
			}
			if err := st.AbortMultipart(ctx, "data/big2", j3.UploadID); err != nil {
				t.Errorf("aborting twice: %v", err)
			}
			old := j3.UploadID
			if _, err := st.UploadFileResumable(ctx, "data/big2", bytes.NewReader(data), size, j3, store.MultipartOptions{PartSize: part, Concurrency: 3}); err != nil {
				t.Fatalf("after abort: %v", err)
			}
			if j3.UploadID == old {
				t.Error("the vanished upload id was reused")
			}
			if h, err := st.Head(ctx, "data/big2", store.HeadOptions{}); err != nil || h.Size != size {
				t.Errorf("data/big2: %+v %v", h, err)
			}
			ups, err := st.ListMultipartUploads(ctx, "data/big")
			if err != nil || len(ups) != 0 {
				t.Errorf("uploads left: %v %v", ups, err)
			}
		})
	}
}
