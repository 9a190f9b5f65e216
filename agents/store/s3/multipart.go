package s3

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	awss3 "github.com/aws/aws-sdk-go-v2/service/s3"
	s3types "github.com/aws/aws-sdk-go-v2/service/s3/types"
	"github.com/aws/smithy-go"
	"golang.org/x/sync/errgroup"

	"github.com/podkeeper/podkeeper/agents/store"
)

var _ store.Multiparter = (*Store)(nil)

// UploadFileResumable uploads size bytes of f to key as a multipart upload,
// reading each part straight from the file through an io.SectionReader (no
// buffering, parts in parallel). j carries the state of an earlier attempt:
// with an UploadID, the parts the server still lists (ListParts) with the
// ETags recorded are reused and only the rest is sent. A vanished upload
// (NoSuchUpload) starts over. The caller checks that j belongs to the same
// source content; j.Key, Size, MTimeNS and SHA256 are not interpreted here.
func (s *Store) UploadFileResumable(ctx context.Context, key string, f io.ReaderAt, size int64, j *store.MultipartJournal, o store.MultipartOptions) (store.ObjectInfo, error) {
	if err := store.ValidKey(key); err != nil {
		return store.ObjectInfo{}, &store.Error{Op: "multipart", Key: key, Err: err}
	}
	o.PartSize = max(o.PartSize, store.MinPartSize)
	if o.Concurrency <= 0 {
		o.Concurrency = store.DefaultPartConcurrency
	}
	if j.Parts == nil {
		j.Parts = map[int32]string{}
	}
	u := &upload{s: s, key: key, j: j, o: o}
	if j.UploadID != "" && j.PartSize > 0 {
		// Part boundaries depend on the part size of the first attempt.
		u.o.PartSize = j.PartSize
		if err := s.verifyParts(ctx, key, j); err != nil {
			if !errors.Is(err, store.ErrNotExist) {
				return store.ObjectInfo{}, err
			}
			j.UploadID, j.Parts = "", map[int32]string{}
		}
	}
	if j.UploadID == "" {
		if err := u.create(ctx); err != nil {
			return store.ObjectInfo{}, err
		}
	}
	nparts := int32((size + u.o.PartSize - 1) / u.o.PartSize)
	if nparts == 0 {
		nparts = 1 // an empty object is one empty part
	}
	if nparts > 10000 {
		return store.ObjectInfo{}, &store.Error{Op: "multipart", Key: key, Err: fmt.Errorf("%d bytes need %d parts of %d bytes; S3 allows 10000", size, nparts, u.o.PartSize)}
	}
	if err := u.sendParts(ctx, f, size, nparts); err != nil {
		return store.ObjectInfo{}, err
	}
	return u.complete(ctx, size, nparts)
}

// upload is one attempt of UploadFileResumable.
type upload struct {
	s      *Store
	key    string
	j      *store.MultipartJournal
	o      store.MultipartOptions
	saveMu sync.Mutex // one Persist at a time: parts finish in parallel
}

func (u *upload) persist() error {
	if u.o.Persist == nil {
		return nil
	}
	u.saveMu.Lock()
	defer u.saveMu.Unlock()
	if err := u.o.Persist(u.j); err != nil {
		return &store.Error{Op: "multipart", Key: u.key, Err: fmt.Errorf("saving journal: %w", err)}
	}
	return nil
}

func (u *upload) create(ctx context.Context) error {
	s := u.s
	in := &awss3.CreateMultipartUploadInput{
		Bucket: aws.String(s.bucket), Key: aws.String(s.fullKey(u.key)), Metadata: u.o.Metadata,
		ServerSideEncryption: s.sseType(),
	}
	if u.o.ContentType != "" {
		in.ContentType = aws.String(u.o.ContentType)
	}
	if s.kmsKeyID != "" {
		in.SSEKMSKeyId = aws.String(s.kmsKeyID)
	}
	out, err := s.client.CreateMultipartUpload(ctx, in)
	if err != nil {
		return classify("multipart create", u.key, err)
	}
	j := u.j
	j.Key, j.UploadID, j.PartSize, j.Parts, j.Created = u.key, aws.ToString(out.UploadId), u.o.PartSize, map[int32]string{}, time.Now().UTC()
	return u.persist()
}

// sendParts uploads the parts the journal lacks, Concurrency at a time. A
// failed part stops new parts from starting but lets the ones in flight
// finish (they run on ctx, not on the group's context): cancelling them would
// throw away work a retry then repeats, and on a slow link a fast-failing
// part could starve the others forever.
func (u *upload) sendParts(ctx context.Context, f io.ReaderAt, size int64, nparts int32) error {
	g, failed := errgroup.WithContext(ctx)
	g.SetLimit(u.o.Concurrency)
	for n := int32(1); n <= nparts && failed.Err() == nil; n++ {
		if u.j.HasPart(n) {
			continue
		}
		g.Go(func() error { return u.sendPart(ctx, f, size, n) })
	}
	err := g.Wait()
	if err == nil {
		// Cancelled between two parts: the ones never started must not reach
		// Complete as a shorter object.
		err = ctx.Err()
	}
	if err == nil {
		return nil
	}
	if _, ok := errors.AsType[*store.Error](err); ok {
		return err
	}
	return &store.Error{Op: "multipart", Key: u.key, Err: err}
}

func (u *upload) sendPart(ctx context.Context, f io.ReaderAt, size int64, n int32) error {
	s := u.s
	off := int64(n-1) * u.o.PartSize
	length := min(u.o.PartSize, size-off)
	out, err := s.client.UploadPart(ctx, &awss3.UploadPartInput{
		Bucket: aws.String(s.bucket), Key: aws.String(s.fullKey(u.key)), UploadId: aws.String(u.j.UploadID),
		PartNumber: aws.Int32(n), Body: io.NewSectionReader(f, off, length), ContentLength: aws.Int64(length),
	}, noPartChecksums)
	if err != nil {
		return classify("upload part", u.key, err)
	}
	u.j.SetPart(n, aws.ToString(out.ETag))
	if err := u.persist(); err != nil {
		return err
	}
	if u.o.PartDone != nil {
		u.o.PartDone(n)
	}
	return nil
}

func (u *upload) complete(ctx context.Context, size int64, nparts int32) (store.ObjectInfo, error) {
	s := u.s
	var parts []s3types.CompletedPart
	for n, etag := range u.j.PartETags() {
		if n <= nparts {
			parts = append(parts, s3types.CompletedPart{PartNumber: aws.Int32(n), ETag: aws.String(etag)})
		}
	}
	slices.SortFunc(parts, func(a, b s3types.CompletedPart) int { return int(*a.PartNumber - *b.PartNumber) })
	in := &awss3.CompleteMultipartUploadInput{
		Bucket: aws.String(s.bucket), Key: aws.String(s.fullKey(u.key)), UploadId: aws.String(u.j.UploadID),
		MultipartUpload: &s3types.CompletedMultipartUpload{Parts: parts},
	}
	if u.o.IfNoneMatch {
		in.IfNoneMatch = aws.String("*")
	}
	if u.o.IfMatch != "" {
		in.IfMatch = aws.String(u.o.IfMatch)
	}
	out, err := s.client.CompleteMultipartUpload(ctx, in)
	if err != nil {
		var ae smithy.APIError
		if u.o.IfMatch != "" && errors.As(err, &ae) && ae.ErrorCode() == "NoSuchKey" {
			// If-Match on a key that is gone (S3 answers 404 NoSuchKey, not
			// 412): the condition failed, the upload is still there.
			return store.ObjectInfo{}, &store.Error{Op: "multipart complete", Key: u.key, Err: fmt.Errorf("%w: object does not exist (If-Match) (%v)", store.ErrPrecondition, err)}
		}
		err = classify("multipart complete", u.key, err)
		if errors.Is(err, store.ErrNotExist) {
			// The upload vanished between the parts and Complete (aborted by a
			// lifecycle rule): start over on the next attempt, and say so.
			u.j.UploadID, u.j.Parts = "", map[int32]string{}
			_ = u.persist()
			if se, ok := errors.AsType[*store.Error](err); ok {
				se.Retryable = true
			}
		}
		return store.ObjectInfo{}, err
	}
	return store.ObjectInfo{Key: u.key, Size: size, ETag: aws.ToString(out.ETag), VersionID: aws.ToString(out.VersionId), Metadata: u.o.Metadata}, nil
}

// noPartChecksums keeps the SDK from adding a CRC32 to each part on AWS
// (its default there): parts with checksums need the same checksums again at
// Complete, which a journal written by an older process may not have. The
// content is verified end to end by the sha256 in the object's metadata,
// which restore checks.
func noPartChecksums(o *awss3.Options) {
	o.RequestChecksumCalculation = aws.RequestChecksumCalculationWhenRequired
}

// verifyParts keeps only the journal's parts that the server still lists
// with the same ETag and the expected size.
func (s *Store) verifyParts(ctx context.Context, key string, j *store.MultipartJournal) error {
	listed := map[int32]s3types.Part{}
	p := awss3.NewListPartsPaginator(s.client, &awss3.ListPartsInput{
		Bucket: aws.String(s.bucket), Key: aws.String(s.fullKey(key)), UploadId: aws.String(j.UploadID),
	})
	for p.HasMorePages() {
		page, err := p.NextPage(ctx)
		if err != nil {
			return classify("list parts", key, err)
		}
		for _, part := range page.Parts {
			listed[aws.ToInt32(part.PartNumber)] = part
		}
	}
	j.RetainParts(func(n int32, etag string) bool {
		part, ok := listed[n]
		want := min(j.PartSize, j.Size-int64(n-1)*j.PartSize)
		return ok && aws.ToString(part.ETag) == etag && aws.ToInt64(part.Size) == want
	})
	return nil
}

// ListMultipartUploads lists the unfinished multipart uploads under prefix.
func (s *Store) ListMultipartUploads(ctx context.Context, prefix string) ([]store.MultipartUpload, error) {
	var out []store.MultipartUpload
	in := &awss3.ListMultipartUploadsInput{Bucket: aws.String(s.bucket), Prefix: aws.String(s.fullKey(prefix))}
	for {
		page, err := s.client.ListMultipartUploads(ctx, in)
		if err != nil {
			return nil, classify("list uploads", prefix, err)
		}
		for _, u := range page.Uploads {
			mu := store.MultipartUpload{Key: s.relKey(aws.ToString(u.Key)), UploadID: aws.ToString(u.UploadId)}
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
func (s *Store) AbortMultipart(ctx context.Context, key, uploadID string) error {
	_, err := s.client.AbortMultipartUpload(ctx, &awss3.AbortMultipartUploadInput{
		Bucket: aws.String(s.bucket), Key: aws.String(s.fullKey(key)), UploadId: aws.String(uploadID),
	})
	if err != nil {
		if err = classify("abort upload", key, err); errors.Is(err, store.ErrNotExist) {
			return nil
		}
		return err
	}
	return nil
}
