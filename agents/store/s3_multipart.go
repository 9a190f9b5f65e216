package store

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	s3types "github.com/aws/aws-sdk-go-v2/service/s3/types"
)

// MinPartSize is the smallest part S3 accepts (except for the last one).
const MinPartSize = 5 << 20

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

	mu sync.Mutex
}

// LoadJournal reads a journal saved by Save. A missing file is ErrNotExist.
func LoadJournal(path string) (*MultipartJournal, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var j MultipartJournal
	if err := json.Unmarshal(b, &j); err != nil {
		return nil, fmt.Errorf("multipart journal %s: %w", path, err)
	}
	if j.Parts == nil {
		j.Parts = map[int32]string{}
	}
	return &j, nil
}

// Save writes the journal atomically (temp file + rename), so a SIGKILL
// leaves either the previous or the new state, never a torn file.
func (j *MultipartJournal) Save(path string) error {
	j.mu.Lock()
	b, err := json.Marshal(j)
	j.mu.Unlock()
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

func (j *MultipartJournal) setPart(n int32, etag string) {
	j.mu.Lock()
	j.Parts[n] = etag
	j.mu.Unlock()
}

// MultipartOptions configure UploadFileResumable.
type MultipartOptions struct {
	PartSize    int64
	Concurrency int
	Metadata    map[string]string
	ContentType string
	// Persist is called after the upload is created and after every finished
	// part; an error aborts the attempt (the caller's disk is failing).
	Persist func(*MultipartJournal) error
	// PartDone, when set, is told about every part uploaded by this call.
	PartDone func(part int32)
}

// UploadFileResumable uploads size bytes of f to key as a multipart upload,
// reading each part straight from the file through an io.SectionReader (no
// buffering, parts in parallel). j carries the state of an earlier attempt:
// with an UploadID, the parts the server still lists (ListParts) with the
// ETags recorded are reused and only the rest is sent. A vanished upload
// (NoSuchUpload) starts over. The caller checks that j belongs to the same
// source content; j.Key, Size, MTimeNS and SHA256 are not interpreted here.
func (s *S3Store) UploadFileResumable(ctx context.Context, key string, f io.ReaderAt, size int64, j *MultipartJournal, o MultipartOptions) (ObjectInfo, error) {
	if err := ValidKey(key); err != nil {
		return ObjectInfo{}, &Error{Op: "multipart", Key: key, Err: err}
	}
	if o.PartSize < MinPartSize {
		o.PartSize = MinPartSize
	}
	if o.Concurrency <= 0 {
		o.Concurrency = DefaultPartConcurrency
	}
	persist := func() error {
		if o.Persist == nil {
			return nil
		}
		if err := o.Persist(j); err != nil {
			return &Error{Op: "multipart", Key: key, Err: fmt.Errorf("saving journal: %w", err)}
		}
		return nil
	}
	if j.Parts == nil {
		j.Parts = map[int32]string{}
	}
	if j.UploadID != "" && j.PartSize > 0 {
		// Part boundaries depend on the part size of the first attempt.
		o.PartSize = j.PartSize
		if err := s.verifyParts(ctx, key, j); err != nil {
			if !errors.Is(err, ErrNotExist) {
				return ObjectInfo{}, err
			}
			j.UploadID, j.Parts = "", map[int32]string{}
		}
	}
	if j.UploadID == "" {
		in := &s3.CreateMultipartUploadInput{
			Bucket: aws.String(s.bucket), Key: aws.String(s.FullKey(key)), Metadata: o.Metadata,
			ServerSideEncryption: s.sseType(),
		}
		if o.ContentType != "" {
			in.ContentType = aws.String(o.ContentType)
		}
		if s.kmsKeyID != "" {
			in.SSEKMSKeyId = aws.String(s.kmsKeyID)
		}
		out, err := s.client.CreateMultipartUpload(ctx, in)
		if err != nil {
			return ObjectInfo{}, ClassifyS3("multipart create", key, err)
		}
		j.Key, j.UploadID, j.PartSize, j.Parts, j.Created = key, aws.ToString(out.UploadId), o.PartSize, map[int32]string{}, time.Now().UTC()
		if err := persist(); err != nil {
			return ObjectInfo{}, err
		}
	}
	nparts := int32((size + o.PartSize - 1) / o.PartSize)
	if nparts == 0 {
		nparts = 1 // an empty object is one empty part
	}
	if nparts > 10000 {
		return ObjectInfo{}, &Error{Op: "multipart", Key: key, Err: fmt.Errorf("%d bytes need %d parts of %d bytes; S3 allows 10000", size, nparts, o.PartSize)}
	}

	// A failed part stops new parts from starting but lets the ones in flight
	// finish: cancelling them would throw away work a retry then repeats, and
	// on a slow link a fast-failing part could starve the others forever.
	var (
		wg       sync.WaitGroup
		saveMu   sync.Mutex
		errMu    sync.Mutex
		firstErr error
	)
	fail := func(err error) {
		errMu.Lock()
		if firstErr == nil {
			firstErr = err
		}
		errMu.Unlock()
	}
	failed := func() bool {
		errMu.Lock()
		defer errMu.Unlock()
		return firstErr != nil
	}
	sem := make(chan struct{}, o.Concurrency)
	for n := int32(1); n <= nparts && !failed(); n++ {
		j.mu.Lock()
		_, done := j.Parts[n]
		j.mu.Unlock()
		if done {
			continue
		}
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			fail(ctx.Err())
			continue
		}
		if failed() {
			<-sem
			break
		}
		wg.Add(1)
		go func(n int32) {
			defer wg.Done()
			defer func() { <-sem }()
			off := int64(n-1) * o.PartSize
			length := min(o.PartSize, size-off)
			out, err := s.client.UploadPart(ctx, &s3.UploadPartInput{
				Bucket: aws.String(s.bucket), Key: aws.String(s.FullKey(key)), UploadId: aws.String(j.UploadID),
				PartNumber: aws.Int32(n), Body: io.NewSectionReader(f, off, length), ContentLength: aws.Int64(length),
			}, noPartChecksums)
			if err != nil {
				fail(ClassifyS3("upload part", key, err))
				return
			}
			j.setPart(n, aws.ToString(out.ETag))
			saveMu.Lock()
			err = persist()
			saveMu.Unlock()
			if err != nil {
				fail(err)
				return
			}
			if o.PartDone != nil {
				o.PartDone(n)
			}
		}(n)
	}
	wg.Wait()
	if firstErr != nil {
		var se *Error
		if errors.As(firstErr, &se) {
			return ObjectInfo{}, firstErr
		}
		return ObjectInfo{}, &Error{Op: "multipart", Key: key, Err: firstErr}
	}

	j.mu.Lock()
	parts := make([]s3types.CompletedPart, 0, len(j.Parts))
	for n, etag := range j.Parts {
		if n <= nparts {
			parts = append(parts, s3types.CompletedPart{PartNumber: aws.Int32(n), ETag: aws.String(etag)})
		}
	}
	j.mu.Unlock()
	slices.SortFunc(parts, func(a, b s3types.CompletedPart) int { return int(*a.PartNumber - *b.PartNumber) })
	out, err := s.client.CompleteMultipartUpload(ctx, &s3.CompleteMultipartUploadInput{
		Bucket: aws.String(s.bucket), Key: aws.String(s.FullKey(key)), UploadId: aws.String(j.UploadID),
		MultipartUpload: &s3types.CompletedMultipartUpload{Parts: parts},
	})
	if err != nil {
		err = ClassifyS3("multipart complete", key, err)
		if errors.Is(err, ErrNotExist) {
			// The upload vanished between the parts and Complete (aborted by a
			// lifecycle rule): start over on the next attempt, and say so.
			j.UploadID, j.Parts = "", map[int32]string{}
			_ = persist()
			var se *Error
			if errors.As(err, &se) {
				se.Retryable = true
			}
		}
		return ObjectInfo{}, err
	}
	return ObjectInfo{Key: key, Size: size, ETag: aws.ToString(out.ETag), VersionID: aws.ToString(out.VersionId), Metadata: o.Metadata}, nil
}

// noPartChecksums keeps the SDK from adding a CRC32 to each part on AWS
// (its default there): parts with checksums need the same checksums again at
// Complete, which a journal written by an older process may not have. The
// content is verified end to end by the sha256 in the object's metadata,
// which restore checks.
func noPartChecksums(o *s3.Options) {
	o.RequestChecksumCalculation = aws.RequestChecksumCalculationWhenRequired
}

// verifyParts keeps only the journal's parts that the server still lists
// with the same ETag and the expected size.
func (s *S3Store) verifyParts(ctx context.Context, key string, j *MultipartJournal) error {
	listed := map[int32]s3types.Part{}
	p := s3.NewListPartsPaginator(s.client, &s3.ListPartsInput{
		Bucket: aws.String(s.bucket), Key: aws.String(s.FullKey(key)), UploadId: aws.String(j.UploadID),
	})
	for p.HasMorePages() {
		page, err := p.NextPage(ctx)
		if err != nil {
			return ClassifyS3("list parts", key, err)
		}
		for _, part := range page.Parts {
			listed[aws.ToInt32(part.PartNumber)] = part
		}
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	for n, etag := range j.Parts {
		part, ok := listed[n]
		want := min(j.PartSize, j.Size-int64(n-1)*j.PartSize)
		if !ok || aws.ToString(part.ETag) != etag || aws.ToInt64(part.Size) != want {
			delete(j.Parts, n)
		}
	}
	return nil
}

// MultipartUpload is an unfinished multipart upload found on the server.
type MultipartUpload struct {
	Key       string
	UploadID  string
	Initiated time.Time
}

// ListMultipartUploads lists the unfinished multipart uploads under prefix.
func (s *S3Store) ListMultipartUploads(ctx context.Context, prefix string) ([]MultipartUpload, error) {
	var out []MultipartUpload
	in := &s3.ListMultipartUploadsInput{Bucket: aws.String(s.bucket), Prefix: aws.String(s.FullKey(prefix))}
	for {
		page, err := s.client.ListMultipartUploads(ctx, in)
		if err != nil {
			return nil, ClassifyS3("list uploads", prefix, err)
		}
		for _, u := range page.Uploads {
			mu := MultipartUpload{Key: s.relKey(aws.ToString(u.Key)), UploadID: aws.ToString(u.UploadId)}
			if u.Initiated != nil {
				mu.Initiated = *u.Initiated
			}
			out = append(out, mu)
		}
		if !aws.ToBool(page.IsTruncated) {
			return out, nil
		}
		in.KeyMarker, in.UploadIdMarker = page.NextKeyMarker, page.NextUploadIdMarker
	}
}

// AbortMultipart aborts an upload; one that is already gone is not an error.
func (s *S3Store) AbortMultipart(ctx context.Context, key, uploadID string) error {
	_, err := s.client.AbortMultipartUpload(ctx, &s3.AbortMultipartUploadInput{
		Bucket: aws.String(s.bucket), Key: aws.String(s.FullKey(key)), UploadId: aws.String(uploadID),
	})
	if err != nil {
		if err = ClassifyS3("abort upload", key, err); errors.Is(err, ErrNotExist) {
			return nil
		}
		return err
	}
	return nil
}

// JournalPath is where a journal for key lives in dir (one file per key).
func JournalPath(dir, key string) string {
	return filepath.Join(dir, fmt.Sprintf("%x.json", hashKey(key)))
}

func hashKey(key string) uint64 {
	// FNV-1a: file names only need to be distinct per key and short.
	h := uint64(14695981039346656037)
	for i := 0; i < len(key); i++ {
		h ^= uint64(key[i])
		h *= 1099511628211
	}
	return h
}
