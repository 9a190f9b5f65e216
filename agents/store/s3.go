package store

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
	"github.com/aws/aws-sdk-go-v2/service/s3"
	s3types "github.com/aws/aws-sdk-go-v2/service/s3/types"
	"github.com/aws/smithy-go"
	"github.com/aws/smithy-go/logging"

	"github.com/podkeeper/podkeeper/agents/config"
)

// Multipart defaults: objects at or above MultipartThreshold go through the
// transfer manager in PartSize parts, PartConcurrency at a time.
const (
	DefaultMultipartThreshold = 16 << 20
	DefaultPartSize           = 16 << 20
	DefaultPartConcurrency    = 8
)

// S3Store is the S3 backend (AWS or any S3-compatible server).
type S3Store struct {
	client    *s3.Client
	tm        *tm.Client
	bucket    string
	prefix    string // "" or ends with "/"
	sse       string
	kmsKeyID  string
	threshold int64
	custom    bool
}

// S3Options tune the backend beyond configuration (tests, benchmarks).
type S3Options struct {
	MultipartThreshold int64
	PartSize           int64
	PartConcurrency    int
	Log                *slog.Logger
}

// NewS3 builds the S3 backend from the shared configuration. Credentials come
// from the SDK's default chain (env keys, web identity / IRSA, Pod Identity,
// shared files).
func NewS3(ctx context.Context, c *config.Store, o S3Options) (*S3Store, error) {
	if o.MultipartThreshold <= 0 {
		o.MultipartThreshold = DefaultMultipartThreshold
	}
	if o.PartSize <= 0 {
		o.PartSize = DefaultPartSize
	}
	if o.PartConcurrency <= 0 {
		o.PartConcurrency = DefaultPartConcurrency
	}
	if o.Log == nil {
		o.Log = slog.Default()
	}
	httpClient := awshttp.NewBuildableClient().WithTransportOptions(func(tr *http.Transport) {
		// Agents run 16+ transfers at once against one host; the default of 2 idle
		// connections per host would reconnect constantly.
		tr.MaxIdleConns = 256
		tr.MaxIdleConnsPerHost = 128
	})
	if c.S3CAFile != "" {
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
		httpClient = httpClient.WithTransportOptions(func(tr *http.Transport) {
			if tr.TLSClientConfig == nil {
				tr.TLSClientConfig = &tls.Config{MinVersion: tls.VersionTLS12}
			}
			tr.TLSClientConfig.RootCAs = pool
		})
	}
	log := o.Log
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
		return nil, fmt.Errorf("aws config: %w", err)
	}
	custom := c.S3Endpoint != ""
	if custom {
		// Non-AWS servers vary in their support of the newer default checksums.
		cfg.RequestChecksumCalculation = aws.RequestChecksumCalculationWhenRequired
		cfg.ResponseChecksumValidation = aws.ResponseChecksumValidationWhenRequired
	}
	client := s3.NewFromConfig(cfg, func(so *s3.Options) {
		if custom {
			so.BaseEndpoint = aws.String(c.S3Endpoint)
		}
		so.UsePathStyle = c.PathStyle()
	})
	tmc := tm.New(client, func(to *tm.Options) {
		to.PartSizeBytes = o.PartSize
		to.MultipartUploadThreshold = o.MultipartThreshold
		to.Concurrency = o.PartConcurrency
		if custom {
			// The transfer manager has its own setting that overrides the client's.
			to.RequestChecksumCalculation = aws.RequestChecksumCalculationWhenRequired
		}
	})
	prefix := c.Prefix
	if prefix != "" {
		prefix += "/"
	}
	return &S3Store{client: client, tm: tmc, bucket: c.Bucket, prefix: prefix, sse: c.S3SSE, kmsKeyID: c.S3KMSKeyID, threshold: o.MultipartThreshold, custom: custom}, nil
}

// Client exposes the SDK client for S3-only features (multipart resume).
func (s *S3Store) Client() *s3.Client { return s.client }

// Bucket is the bucket, FullKey the bucket key of a store key.
func (s *S3Store) Bucket() string            { return s.bucket }
func (s *S3Store) FullKey(key string) string { return s.prefix + key }
func (s *S3Store) relKey(full string) string { return strings.TrimPrefix(full, s.prefix) }
func (s *S3Store) String() string {
	return "s3://" + s.bucket + "/" + strings.TrimSuffix(s.prefix, "/")
}
func (s *S3Store) sseType() s3types.ServerSideEncryption { return s3types.ServerSideEncryption(s.sse) }

func (s *S3Store) Put(ctx context.Context, key string, r io.Reader, size int64, opts PutOptions) (ObjectInfo, error) {
	if err := ValidKey(key); err != nil {
		return ObjectInfo{}, &Error{Op: "put", Key: key, Err: err}
	}
	var ifNoneMatch, ifMatch *string
	if opts.IfNoneMatch {
		ifNoneMatch = aws.String("*")
	}
	if opts.IfMatch != "" {
		ifMatch = aws.String(opts.IfMatch)
	}
	if size < 0 || size >= s.threshold {
		in := &tm.UploadObjectInput{
			Bucket: aws.String(s.bucket), Key: aws.String(s.FullKey(key)), Body: r,
			Metadata: opts.Metadata, IfNoneMatch: ifNoneMatch, IfMatch: ifMatch,
			ServerSideEncryption: tmtypes.ServerSideEncryption(s.sse),
		}
		if opts.ContentType != "" {
			in.ContentType = aws.String(opts.ContentType)
		}
		if s.kmsKeyID != "" {
			in.SSEKMSKeyID = aws.String(s.kmsKeyID)
		}
		out, err := s.tm.UploadObject(ctx, in)
		if err != nil {
			return ObjectInfo{}, s.wrap("put", key, err)
		}
		info := ObjectInfo{Key: key, Size: size, ETag: aws.ToString(out.ETag), VersionID: aws.ToString(out.VersionID)}
		if size < 0 {
			h, err := s.Head(ctx, key, HeadOptions{})
			if err != nil {
				return ObjectInfo{}, err
			}
			info.Size = h.Size
		}
		return info, nil
	}
	body, ok := r.(io.ReadSeeker)
	if !ok {
		// Below the multipart threshold a small buffer is cheap, and a seekable body
		// lets the SDK sign and retry it over plain HTTP.
		buf := make([]byte, size)
		if _, err := io.ReadFull(r, buf); err != nil {
			return ObjectInfo{}, &Error{Op: "put", Key: key, Err: fmt.Errorf("reading body: %w", err)}
		}
		body = bytes.NewReader(buf)
	}
	in := &s3.PutObjectInput{
		Bucket: aws.String(s.bucket), Key: aws.String(s.FullKey(key)), Body: body, ContentLength: aws.Int64(size),
		Metadata: opts.Metadata, IfNoneMatch: ifNoneMatch, IfMatch: ifMatch, ServerSideEncryption: s.sseType(),
	}
	if opts.ContentType != "" {
		in.ContentType = aws.String(opts.ContentType)
	}
	if s.kmsKeyID != "" {
		in.SSEKMSKeyId = aws.String(s.kmsKeyID)
	}
	out, err := s.client.PutObject(ctx, in)
	if err != nil {
		return ObjectInfo{}, s.wrap("put", key, err)
	}
	return ObjectInfo{Key: key, Size: size, ETag: aws.ToString(out.ETag), VersionID: aws.ToString(out.VersionId), Metadata: opts.Metadata}, nil
}

func (s *S3Store) Get(ctx context.Context, key string, opts GetOptions) (io.ReadCloser, ObjectInfo, error) {
	if err := ValidKey(key); err != nil {
		return nil, ObjectInfo{}, &Error{Op: "get", Key: key, Err: err}
	}
	in := &s3.GetObjectInput{Bucket: aws.String(s.bucket), Key: aws.String(s.FullKey(key))}
	if opts.Offset < 0 || opts.Length < 0 {
		return nil, ObjectInfo{}, &Error{Op: "get", Key: key, Err: fmt.Errorf("negative range %d+%d", opts.Offset, opts.Length)}
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
		return nil, ObjectInfo{}, s.wrap("get", key, err)
	}
	info := ObjectInfo{Key: key, Size: aws.ToInt64(out.ContentLength), ETag: aws.ToString(out.ETag), Metadata: out.Metadata, VersionID: aws.ToString(out.VersionId)}
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

func (s *S3Store) Head(ctx context.Context, key string, opts HeadOptions) (ObjectInfo, error) {
	if err := ValidKey(key); err != nil {
		return ObjectInfo{}, &Error{Op: "head", Key: key, Err: err}
	}
	in := &s3.HeadObjectInput{Bucket: aws.String(s.bucket), Key: aws.String(s.FullKey(key))}
	if opts.VersionID != "" {
		in.VersionId = aws.String(opts.VersionID)
	}
	out, err := s.client.HeadObject(ctx, in)
	if err != nil {
		return ObjectInfo{}, s.wrap("head", key, err)
	}
	info := ObjectInfo{Key: key, Size: aws.ToInt64(out.ContentLength), ETag: aws.ToString(out.ETag), Metadata: out.Metadata, VersionID: aws.ToString(out.VersionId)}
	if out.LastModified != nil {
		info.ModTime = out.LastModified.UTC()
	}
	return info, nil
}

func (s *S3Store) List(ctx context.Context, prefix string) iter.Seq2[ObjectInfo, error] {
	return func(yield func(ObjectInfo, error) bool) {
		p := s3.NewListObjectsV2Paginator(s.client, &s3.ListObjectsV2Input{
			Bucket: aws.String(s.bucket), Prefix: aws.String(s.FullKey(prefix)),
		})
		for p.HasMorePages() {
			page, err := p.NextPage(ctx)
			if err != nil {
				yield(ObjectInfo{}, s.wrap("list", prefix, err))
				return
			}
			for _, o := range page.Contents {
				info := ObjectInfo{Key: s.relKey(aws.ToString(o.Key)), Size: aws.ToInt64(o.Size), ETag: aws.ToString(o.ETag)}
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

func (s *S3Store) Delete(ctx context.Context, key string) error {
	if err := ValidKey(key); err != nil {
		return &Error{Op: "delete", Key: key, Err: err}
	}
	_, err := s.client.DeleteObject(ctx, &s3.DeleteObjectInput{Bucket: aws.String(s.bucket), Key: aws.String(s.FullKey(key))})
	if err != nil {
		if werr := s.wrap("delete", key, err); errors.Is(werr, ErrNotExist) {
			return nil
		}
		return s.wrap("delete", key, err)
	}
	return nil
}

var sdkRetryables = retry.IsErrorRetryables(retry.DefaultRetryables)

// wrap classifies an SDK error by its type and status: not-found and
// precondition become sentinels, transient failures are marked retryable.
func (s *S3Store) wrap(op, key string, err error) error {
	return ClassifyS3(op, key, err)
}

var _ Multiparter = (*S3Store)(nil)

// ClassifyS3 turns an aws-sdk-go-v2 error into *Error (exported for S3-only
// helpers that call the SDK directly).
func ClassifyS3(op, key string, err error) error {
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return &Error{Op: op, Key: key, Err: err}
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
		return &Error{Op: op, Key: key, Err: fmt.Errorf("%w (%v)", ErrNotExist, err)}
	case status == http.StatusPreconditionFailed || code == "PreconditionFailed":
		return &Error{Op: op, Key: key, Err: fmt.Errorf("%w (%v)", ErrPrecondition, err)}
	}
	if isTLSTrustError(err) {
		// A certificate the client does not trust will not become trusted by
		// waiting: fail loudly instead of retrying forever.
		return &Error{Op: op, Key: key, Err: err}
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
	return &Error{Op: op, Key: key, Err: err, Retryable: retryable}
}

func isTLSTrustError(err error) bool {
	var ve *tls.CertificateVerificationError
	var ua x509.UnknownAuthorityError
	var he x509.HostnameError
	var ci x509.CertificateInvalidError
	return errors.As(err, &ve) || errors.As(err, &ua) || errors.As(err, &he) || errors.As(err, &ci)
}
