package store

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// Multipart defaults: objects at or above DefaultMultipartThreshold are sent
// in parts of DefaultPartSize, DefaultPartConcurrency at a time.
const (
	DefaultMultipartThreshold = 16 << 20
	DefaultPartSize           = 16 << 20
	DefaultPartConcurrency    = 8
)

// MinPartSize is the smallest part S3 accepts (except for the last one).
const MinPartSize = 5 << 20

// Multiparter is the optional ability to upload a large file in parts that
// survive a restart of the uploader (S3 multipart uploads). Callers discover
// it with a type assertion on this interface, never on a backend's type, and
// fall back to Put when a store lacks it.
type Multiparter interface {
	// UploadFileResumable uploads size bytes of f to key. j carries the state of
	// an earlier attempt; parts the server still has are reused.
	UploadFileResumable(ctx context.Context, key string, f io.ReaderAt, size int64, j *MultipartJournal, o MultipartOptions) (ObjectInfo, error)
	// ListMultipartUploads lists the unfinished uploads under prefix.
	ListMultipartUploads(ctx context.Context, prefix string) ([]MultipartUpload, error)
	// AbortMultipart aborts an upload; one already gone is not an error.
	AbortMultipart(ctx context.Context, key, uploadID string) error
}

// MultipartJournal is what a resumable upload persists between attempts and
// across process restarts: which upload it is, which source it belongs to and
// which parts are already on the server. The identity fields let the caller
// decide whether the local file is still the one the upload was started for.
type MultipartJournal struct {
	Key      string `json:"key"`
	UploadID string `json:"upload_id"`
	Size     int64  `json:"size"`
	MTimeNS  int64  `json:"mtime_ns"`
	SHA256   string `json:"sha256"`
	PartSize int64  `json:"part_size"`
	// Parts maps part number to ETag of every part known to be uploaded.
	Parts   map[int32]string `json:"parts"`
	Created time.Time        `json:"created"`

	// mu guards Parts while parts upload in parallel.
	mu sync.Mutex
}

// ParseJournal decodes what Bytes encoded.
func ParseJournal(b []byte) (*MultipartJournal, error) {
	var j MultipartJournal
	if err := json.Unmarshal(b, &j); err != nil {
		return nil, err
	}
	if j.Parts == nil {
		j.Parts = map[int32]string{}
	}
	return &j, nil
}

// Bytes encodes the journal, safely while parts are being recorded.
func (j *MultipartJournal) Bytes() ([]byte, error) {
	j.mu.Lock()
	defer j.mu.Unlock()
	return json.Marshal(j)
}

func (j *MultipartJournal) Save(path string) error {
	b, err := j.Bytes()
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// PartCount is how many parts the journal knows are uploaded.
func (j *MultipartJournal) PartCount() int {
	j.mu.Lock()
	defer j.mu.Unlock()
	return len(j.Parts)
}

// HasPart reports whether part n is known to be uploaded.
func (j *MultipartJournal) HasPart(n int32) bool {
	j.mu.Lock()
	defer j.mu.Unlock()
	_, ok := j.Parts[n]
	return ok
}

// SetPart records part n as uploaded with etag.
func (j *MultipartJournal) SetPart(n int32, etag string) {
	j.mu.Lock()
	if j.Parts == nil {
		j.Parts = map[int32]string{}
	}
	j.Parts[n] = etag
	j.mu.Unlock()
}

// PartETags returns a copy of the uploaded parts (part number to ETag).
func (j *MultipartJournal) PartETags() map[int32]string {
	j.mu.Lock()
	defer j.mu.Unlock()
	out := make(map[int32]string, len(j.Parts))
	for n, etag := range j.Parts {
		out[n] = etag
	}
	return out
}

// RetainParts drops the parts for which keep returns false.
func (j *MultipartJournal) RetainParts(keep func(n int32, etag string) bool) {
	j.mu.Lock()
	defer j.mu.Unlock()
	for n, etag := range j.Parts {
		if !keep(n, etag) {
			delete(j.Parts, n)
		}
	}
}

// MultipartOptions configure UploadFileResumable.
type MultipartOptions struct {
	PartSize    int64
	Concurrency int
	Metadata    map[string]string
	ContentType string
	// IfNoneMatch and IfMatch make the completion conditional, as for Put:
	// it fails with ErrPrecondition when the key exists (IfNoneMatch) or its
	// ETag is not IfMatch. The upload and its parts stay on the server, so
	// an attempt under other conditions reuses them.
	IfNoneMatch bool
	IfMatch     string
	// Persist is called after the upload is created and after every finished
	// part; an error aborts the attempt (the caller's disk is failing).
	Persist func(*MultipartJournal) error
	// PartDone, when set, is told about every part uploaded by this call.
	PartDone func(part int32)
}

// MultipartUpload is an unfinished multipart upload found on the server.
type MultipartUpload struct {
	Key       string
	UploadID  string
	Initiated time.Time
}

// JournalPath is where a journal for key lives in dir (one file per key).
func JournalPath(dir, key string) string {
	return filepath.Join(dir, JournalName(key))
}

// JournalName is the file name of key's journal.
func JournalName(key string) string { return fmt.Sprintf("%x.json", hashKey(key)) }

func hashKey(key string) uint64 {
	// FNV-1a: file names only need to be distinct per key and short.
	h := uint64(14695981039346656037)
	for i := 0; i < len(key); i++ {
		h ^= uint64(key[i])
		h *= 1099511628211
	}
	return h
}
