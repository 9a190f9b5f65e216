// Package s3 is the s3:// store backend: AWS S3 or any S3-compatible server,
// through aws-sdk-go-v2.
package s3

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"iter"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"syscall"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/aws/ratelimit"
	"github.com/aws/aws-sdk-go-v2/aws/retry"
	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"
	awsconfig "github.com/aws/aws-sdk-go-v2/config"
	tm "github.com/aws/aws-sdk-go-v2/feature/s3/transfermanager"
	tmtypes "github.com/aws/aws-sdk-go-v2/feature/s3/transfermanager/types"
	awss3 "github.com/aws/aws-sdk-go-v2/service/s3"
	s3types "github.com/aws/aws-sdk-go-v2/service/s3/types"
	"github.com/aws/smithy-go"
	"github.com/aws/smithy-go/logging"

	"github.com/podkeeper/podkeeper/agents/config"
	"github.com/podkeeper/podkeeper/agents/store"
)

func init() {
	store.Register("s3", func(ctx context.Context, c *config.Store, log *slog.Logger) (store.Store, error) {
		s, err := New(ctx, c, log)
		if err != nil {
			return nil, err // not a typed nil inside the interface
		}
		return s, nil
	})
}

// Store is the S3 backend (AWS or any S3-compatible server).
type Store struct {
	client   *awss3.Client
	tm       *tm.Client
	bucket   string
	prefix   string // "" or ends with "/"
	sse      string
	kmsKeyID string
}

// New builds the S3 backend from the shared configuration. Credentials come
// from the SDK's default chain (env keys, web identity / IRSA, Pod Identity,
// shared files).
func New(ctx context.Context, c *config.Store, log *slog.Logger) (*Store, error) {
	if log == nil {
		log = slog.Default()
	}
	httpClient, err := newHTTPClient(c)
	if err != nil {
		return nil, err
	}
	cfg, err := loadAWSConfig(ctx, c, httpClient, log)
	if err != nil {
		return nil, err
	}
	custom := c.S3Endpoint != ""
	client := awss3.NewFromConfig(cfg, func(so *awss3.Options) {
		if custom {
			so.BaseEndpoint = aws.String(c.S3Endpoint)
		}
		so.UsePathStyle = c.PathStyle()
	})
	tmc := tm.New(client, func(to *tm.Options) {
		// Only streamed bodies go through the transfer manager (a file goes
		// up through UploadFileResumable, read by offset); it copies each
		// part into a buffer of its own, so parts in flight are memory: a
		// 48 MiB checkpoint (1 M files) took 162 MiB of heap at 8 x 16 MiB.
		to.PartSizeBytes = streamPartSize
		to.MultipartUploadThreshold = store.DefaultMultipartThreshold
		to.Concurrency = streamPartConcurrency
		if custom {
			// The transfer manager has its own setting that overrides the client's.
			to.RequestChecksumCalculation = aws.RequestChecksumCalculationWhenRequired
		}
	})
	prefix := c.Prefix
	if prefix != "" {
		prefix += "/"
	}
	return &Store{client: client, tm: tmc, bucket: c.Bucket, prefix: prefix, sse: c.S3SSE, kmsKeyID: c.S3KMSKeyID}, nil
}

func newHTTPClient(c *config.Store) (*awshttp.BuildableClient, error) {
	httpClient := awshttp.NewBuildableClient().WithTransportOptions(func(tr *http.Transport) {
		// Agents run 16+ transfers at once against one host; the default of 2 idle
		// connections per host would reconnect constantly.
		tr.MaxIdleConns = 256
		tr.MaxIdleConnsPerHost = 128
	})
	if c.S3CAFile == "" {
		return httpClient, nil
	}
	pem, err := os.ReadFile(c.S3CAFile)
	if err != nil {
		return nil, fmt.Errorf("S3_CA_FILE: %w", err)
	}
	pool, err := x509.SystemCertPool()
	if err != nil || pool == nil {
		pool = x509.NewCertPool()
	}
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("S3_CA_FILE %s: no PEM certificate", c.S3CAFile)
	}
	return httpClient.WithTransportOptions(func(tr *http.Transport) {
		if tr.TLSClientConfig == nil {
			tr.TLSClientConfig = &tls.Config{MinVersion: tls.VersionTLS12}
		}
		tr.TLSClientConfig.RootCAs = pool
	}), nil
}

func loadAWSConfig(ctx context.Context, c *config.Store, httpClient *awshttp.BuildableClient, log *slog.Logger) (aws.Config, error) {
	cfg, err := awsconfig.LoadDefaultConfig(ctx,
		awsconfig.WithRegion(c.S3Region),
		awsconfig.WithHTTPClient(httpClient),
		// The SDK logs checksum chatter at WARN to stderr; route it to our debug log.
		awsconfig.WithLogger(logging.LoggerFunc(func(cl logging.Classification, format string, v ...any) {
			log.Debug("aws-sdk: "+fmt.Sprintf(format, v...), "class", string(cl))
		})),
		// The standard retryer's client-side retry budget would stop retrying during
		// a long outage; agents run their own backoff loop around whole operations,
		// so the SDK only smooths over single blips.
		awsconfig.WithRetryer(func() aws.Retryer {
			return retry.NewStandard(func(so *retry.StandardOptions) {
				so.RateLimiter = ratelimit.None
				so.MaxAttempts = 3
			})
		}),
	)
	if err != nil {
		return aws.Config{}, fmt.Errorf("aws config: %w", err)
	}
	if c.S3Endpoint != "" {
		// Non-AWS servers vary in their support of the newer default checksums.
		cfg.RequestChecksumCalculation = aws.RequestChecksumCalculationWhenRequired
		cfg.ResponseChecksumValidation = aws.ResponseChecksumValidationWhenRequired
	}
	return cfg, nil
}

// fullKey is the bucket key of a store key.
func (s *Store) fullKey(key string) string { return s.prefix + key }

func (s *Store) relKey(full string) string { return strings.TrimPrefix(full, s.prefix) }
func (s *Store) String() string {
	return "s3://" + s.bucket + "/" + strings.TrimSuffix(s.prefix, "/")
}
func (s *Store) sseType() s3types.ServerSideEncryption { return s3types.ServerSideEncryption(s.sse) }

func (s *Store) Put(ctx context.Context, key string, r io.Reader, size int64, opts store.PutOptions) (store.ObjectInfo, error) {
	if err := store.ValidKey(key); err != nil {
		return store.ObjectInfo{}, &store.Error{Op: "put", Key: key, Err: err}
	}
	var ifNoneMatch, ifMatch *string
	if opts.IfNoneMatch {
		ifNoneMatch = aws.String("*")
	}
	if opts.IfMatch != "" {
		ifMatch = aws.String(opts.IfMatch)
	}
	if size < 0 || size >= store.DefaultMultipartThreshold {
		return s.putParts(ctx, key, r, size, opts, ifNoneMatch, ifMatch)
	}
	body, ok := r.(io.ReadSeeker)
	if !ok {
		// Below the multipart threshold a small buffer is cheap, and a seekable body
		// lets the SDK sign and retry it over plain HTTP.
		buf := make([]byte, size)
		if _, err := io.ReadFull(r, buf); err != nil {
			return store.ObjectInfo{}, &store.Error{Op: "put", Key: key, Err: fmt.Errorf("reading body: %w", err)}
		}
		body = bytes.NewReader(buf)
	}
	in := &awss3.PutObjectInput{
		Bucket: aws.String(s.bucket), Key: aws.String(s.fullKey(key)), Body: body, ContentLength: aws.Int64(size),
		Metadata: opts.Metadata, IfNoneMatch: ifNoneMatch, IfMatch: ifMatch, ServerSideEncryption: s.sseType(),
	}
	if opts.ContentType != "" {
		in.ContentType = aws.String(opts.ContentType)
	}
	if opts.ContentEncoding != "" {
		in.ContentEncoding = aws.String(opts.ContentEncoding)
	}
	if s.kmsKeyID != "" {
		in.SSEKMSKeyId = aws.String(s.kmsKeyID)
	}
	out, err := s.client.PutObject(ctx, in)
	if err != nil {
		return store.ObjectInfo{}, classify("put", key, err)
	}
	return store.ObjectInfo{Key: key, Size: size, ETag: aws.ToString(out.ETag), VersionID: aws.ToString(out.VersionId), Metadata: opts.Metadata,
		ContentEncoding: opts.ContentEncoding}, nil
}

// A streamed Put keeps at most about streamPartConcurrency + 1 parts of
// streamPartSize in memory (10 000 parts of 8 MiB: streams up to 78 GiB).
const (
	streamPartSize        = 8 << 20
	streamPartConcurrency = 2
)

// putParts sends a large or unknown-size body through the transfer manager,
// in parts from its own buffers.
func (s *Store) putParts(ctx context.Context, key string, r io.Reader, size int64, opts store.PutOptions, ifNoneMatch, ifMatch *string) (store.ObjectInfo, error) {
	in := &tm.UploadObjectInput{
		Bucket: aws.String(s.bucket), Key: aws.String(s.fullKey(key)), Body: r,
		Metadata: opts.Metadata, IfNoneMatch: ifNoneMatch, IfMatch: ifMatch,
		ServerSideEncryption: tmtypes.ServerSideEncryption(s.sse),
	}
	if opts.ContentType != "" {
		in.ContentType = aws.String(opts.ContentType)
	}
	if opts.ContentEncoding != "" {
		in.ContentEncoding = aws.String(opts.ContentEncoding)
	}
	if s.kmsKeyID != "" {
		in.SSEKMSKeyID = aws.String(s.kmsKeyID)
	}
	out, err := s.tm.UploadObject(ctx, in)
	if err != nil {
		return store.ObjectInfo{}, classify("put", key, err)
	}
	info := store.ObjectInfo{Key: key, Size: size, ETag: aws.ToString(out.ETag), VersionID: aws.ToString(out.VersionID)}
	if size < 0 {
		h, err := s.Head(ctx, key, store.HeadOptions{})
		if err != nil {
			return store.ObjectInfo{}, err
		}
		info.Size = h.Size
	}
	return info, nil
}

func (s *Store) Get(ctx context.Context, key string, opts store.GetOptions) (io.ReadCloser, store.ObjectInfo, error) {
	if err := store.ValidKey(key); err != nil {
		return nil, store.ObjectInfo{}, &store.Error{Op: "get", Key: key, Err: err}
	}
	in := &awss3.GetObjectInput{Bucket: aws.String(s.bucket), Key: aws.String(s.fullKey(key))}
	if opts.Offset < 0 || opts.Length < 0 {
		return nil, store.ObjectInfo{}, &store.Error{Op: "get", Key: key, Err: fmt.Errorf("negative range %d+%d", opts.Offset, opts.Length)}
	}
	if opts.Offset > 0 || opts.Length > 0 {
		rng := fmt.Sprintf("bytes=%d-", opts.Offset)
		if opts.Length > 0 {
			rng += strconv.FormatInt(opts.Offset+opts.Length-1, 10)
		}
		in.Range = aws.String(rng)
	}
	if opts.VersionID != "" {
		in.VersionId = aws.String(opts.VersionID)
	}
	out, err := s.client.GetObject(ctx, in)
	if err != nil {
		return nil, store.ObjectInfo{}, classify("get", key, err)
	}
	info := store.ObjectInfo{Key: key, Size: aws.ToInt64(out.ContentLength), ETag: aws.ToString(out.ETag), Metadata: out.Metadata, VersionID: aws.ToString(out.VersionId),
		ContentEncoding: aws.ToString(out.ContentEncoding)}
	if out.LastModified != nil {
		info.ModTime = out.LastModified.UTC()
	}
	if cr := aws.ToString(out.ContentRange); cr != "" {
		// "bytes 0-9/100": the object's size is after the slash.
		if i := strings.LastIndexByte(cr, '/'); i >= 0 {
			if n, err := strconv.ParseInt(cr[i+1:], 10, 64); err == nil {
				info.Size = n
			}
		}
	}
	return out.Body, info, nil
}

func (s *Store) Head(ctx context.Context, key string, opts store.HeadOptions) (store.ObjectInfo, error) {
	if err := store.ValidKey(key); err != nil {
		return store.ObjectInfo{}, &store.Error{Op: "head", Key: key, Err: err}
	}
	in := &awss3.HeadObjectInput{Bucket: aws.String(s.bucket), Key: aws.String(s.fullKey(key))}
	if opts.VersionID != "" {
		in.VersionId = aws.String(opts.VersionID)
	}
	out, err := s.client.HeadObject(ctx, in)
	if err != nil {
		return store.ObjectInfo{}, classify("head", key, err)
	}
	info := store.ObjectInfo{Key: key, Size: aws.ToInt64(out.ContentLength), ETag: aws.ToString(out.ETag), Metadata: out.Metadata, VersionID: aws.ToString(out.VersionId),
		ContentEncoding: aws.ToString(out.ContentEncoding)}
	if out.LastModified != nil {
		info.ModTime = out.LastModified.UTC()
	}
	return info, nil
}

func (s *Store) List(ctx context.Context, prefix string) iter.Seq2[store.ObjectInfo, error] {
	return s.ListAfter(ctx, prefix, "")
}

// ListAfter implements store.ListerAfter with ListObjectsV2's StartAfter.
func (s *Store) ListAfter(ctx context.Context, prefix, after string) iter.Seq2[store.ObjectInfo, error] {
	return func(yield func(store.ObjectInfo, error) bool) {
		in := &awss3.ListObjectsV2Input{Bucket: aws.String(s.bucket), Prefix: aws.String(s.fullKey(prefix))}
		if after != "" {
			in.StartAfter = aws.String(s.fullKey(after))
		}
		p := awss3.NewListObjectsV2Paginator(s.client, in)
		for p.HasMorePages() {
			page, err := p.NextPage(ctx)
			if err != nil {
				yield(store.ObjectInfo{}, classify("list", prefix, err))
				return
			}
			for _, o := range page.Contents {
				info := store.ObjectInfo{Key: s.relKey(aws.ToString(o.Key)), Size: aws.ToInt64(o.Size), ETag: aws.ToString(o.ETag)}
				if o.LastModified != nil {
					info.ModTime = o.LastModified.UTC()
				}
				if !yield(info, nil) {
					return
				}
			}
		}
	}
}

func (s *Store) Delete(ctx context.Context, key string) error {
	if err := store.ValidKey(key); err != nil {
		return &store.Error{Op: "delete", Key: key, Err: err}
	}
	_, err := s.client.DeleteObject(ctx, &awss3.DeleteObjectInput{Bucket: aws.String(s.bucket), Key: aws.String(s.fullKey(key))})
	if err != nil {
		if err = classify("delete", key, err); errors.Is(err, store.ErrNotExist) {
			return nil
		}
		return err
	}
	return nil
}

var sdkRetryables = retry.IsErrorRetryables(retry.DefaultRetryables)

// classify turns an aws-sdk-go-v2 error into *store.Error by its type and
// status: not-found and precondition become the store's sentinels, transient
// failures are marked retryable.
func classify(op, key string, err error) error {
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return &store.Error{Op: op, Key: key, Err: err}
	}
	status := 0
	var re *awshttp.ResponseError
	if errors.As(err, &re) {
		status = re.HTTPStatusCode()
	}
	code := ""
	var ae smithy.APIError
	if errors.As(err, &ae) {
		code = ae.ErrorCode()
	}
	switch {
	case status == http.StatusNotFound || code == "NoSuchKey" || code == "NotFound":
		return &store.Error{Op: op, Key: key, Err: fmt.Errorf("%w (%v)", store.ErrNotExist, err)}
	case status == http.StatusPreconditionFailed || code == "PreconditionFailed":
		return &store.Error{Op: op, Key: key, Err: fmt.Errorf("%w (%v)", store.ErrPrecondition, err)}
	}
	if isTLSTrustError(err) {
		// A certificate the client does not trust will not become trusted by
		// waiting: fail loudly instead of retrying forever.
		return &store.Error{Op: op, Key: key, Err: err}
	}
	retryable := status >= 500 || status == http.StatusTooManyRequests || status == http.StatusRequestTimeout ||
		// 409 on a conditional write: a concurrent write to the same key is in flight.
		code == "ConditionalRequestConflict" ||
		sdkRetryables.IsErrorRetryable(err) == aws.TrueTernary
	if status == 0 && !retryable {
		// No HTTP response at all: the server is down or the connection broke.
		var ne net.Error
		var oe *net.OpError
		retryable = errors.As(err, &ne) || errors.As(err, &oe) || errors.Is(err, syscall.ECONNREFUSED) ||
			errors.Is(err, syscall.ECONNRESET) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF)
	}
	return &store.Error{Op: op, Key: key, Err: err, Retryable: retryable}
}

func isTLSTrustError(err error) bool {
	var ve *tls.CertificateVerificationError
	var ua x509.UnknownAuthorityError
	var he x509.HostnameError
	var ci x509.CertificateInvalidError
	return errors.As(err, &ve) || errors.As(err, &ua) || errors.As(err, &he) || errors.As(err, &ci)
}
