// Package store is the storage seam every agent uses: a small object-store
// interface, optional capabilities (Multiparter), and Open, which picks the
// backend STORE_URL names among those registered. The backends live in
// subpackages (s3, file) so that an agent without a store does not link the
// AWS SDK; a binary that opens stores imports agents/store/backends.
//
// Keys are relative to the store's root (the PREFIX of s3://BUCKET/PREFIX or the
// directory of file:///PATH) and always use '/'. Bodies are streams, never whole
// buffers, and every call takes a context.
package store

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"iter"
	"strings"
	"time"
	"unicode/utf8"
)

// ErrNotExist is returned (wrapped) when an object does not exist. It is
// fs.ErrNotExist so errors.Is(err, os.ErrNotExist) works too.
var ErrNotExist = fs.ErrNotExist

// ErrPrecondition is returned (wrapped) when IfNoneMatch/IfMatch did not hold.
var ErrPrecondition = errors.New("precondition failed")

// Store is an object store rooted at a prefix.
type Store interface {
	// Put writes the object key from r. size is the exact length of r, or -1 when
	// unknown. It returns the new object's info (at least ETag and Size).
	Put(ctx context.Context, key string, r io.Reader, size int64, opts PutOptions) (ObjectInfo, error)
	// Get streams the object (or a byte range of it). The caller closes the body.
	Get(ctx context.Context, key string, opts GetOptions) (io.ReadCloser, ObjectInfo, error)
	// Head returns an object's size, ETag, metadata and modification time.
	Head(ctx context.Context, key string, opts HeadOptions) (ObjectInfo, error)
	// List yields the objects whose key starts with prefix, in byte order of the
	// key, fetching pages lazily. Metadata is not filled by List.
	List(ctx context.Context, prefix string) iter.Seq2[ObjectInfo, error]
	// Delete removes an object. Deleting a missing object is not an error
	// (S3 semantics).
	Delete(ctx context.Context, key string) error
	// String names the store for logs (never with credentials).
	String() string
}

// ListerAfter is the optional ability to start a listing after a key (S3's
// StartAfter): a reader that follows an append-only directory then pays for
// what is new, not for the whole directory, on every look.
type ListerAfter interface {
	ListAfter(ctx context.Context, prefix, after string) iter.Seq2[ObjectInfo, error]
}

// ListAfter lists the objects under prefix whose key sorts after after ("":
// all), through the store's ListerAfter or else by filtering List.
func ListAfter(ctx context.Context, st Store, prefix, after string) iter.Seq2[ObjectInfo, error] {
	if la, ok := st.(ListerAfter); ok {
		return la.ListAfter(ctx, prefix, after)
	}
	return func(yield func(ObjectInfo, error) bool) {
		for o, err := range st.List(ctx, prefix) {
			if err == nil && o.Key <= after {
				continue
			}
			if !yield(o, err) {
				return
			}
		}
	}
}

// PutOptions are the optional parts of a Put.
type PutOptions struct {
	// Metadata is user metadata (x-amz-meta-*). Keys are lower-case ASCII.
	Metadata    map[string]string
	ContentType string
	// ContentEncoding is the object's HTTP Content-Encoding (e.g. "gzip":
	// a plain HTTP GET then decodes it); Head and Get report it back.
	ContentEncoding string
	// IfNoneMatch makes the write fail with ErrPrecondition when the key exists.
	IfNoneMatch bool
	// IfMatch makes the write fail with ErrPrecondition unless the current ETag
	// equals it.
	IfMatch string
}

// GetOptions are the optional parts of a Get.
type GetOptions struct {
	// Offset and Length select a byte range; Length 0 means "to the end".
	Offset, Length int64
	// VersionID fetches a specific object version (S3 versioned buckets only).
	VersionID string
}

// HeadOptions are the optional parts of a Head.
type HeadOptions struct {
	// VersionID describes a specific object version (S3 versioned buckets);
	// backends without versions ignore it and describe the current object.
	VersionID string
}

// ObjectInfo describes one object.
type ObjectInfo struct {
	Key       string
	Size      int64
	ETag      string
	ModTime   time.Time
	Metadata  map[string]string
	VersionID string
	// ContentEncoding as written (PutOptions.ContentEncoding); filled by
	// Head and Get, not by List.
	ContentEncoding string
}

// Error is the error type of every backend. Retryable classifies it: a
// transient network or server problem (retry with backoff) versus a permanent
// one (bad request, denied, not found, precondition).
type Error struct {
	Op        string
	Key       string
	Err       error
	Retryable bool
}

func (e *Error) Error() string {
	if e.Key == "" {
		return fmt.Sprintf("store %s: %v", e.Op, e.Err)
	}
	return fmt.Sprintf("store %s %q: %v", e.Op, e.Key, e.Err)
}

func (e *Error) Unwrap() error { return e.Err }

// IsRetryable reports whether err is a transient store error worth retrying.
// Context cancellation is never retryable.
func IsRetryable(err error) bool {
	if err == nil || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return false
	}
	var e *Error
	return errors.As(err, &e) && e.Retryable
}

// ValidKey checks a key: non-empty, valid UTF-8, no NUL, at most 1024 bytes (the
// S3 limit), relative, and free of empty, "." and ".." elements, so that a key
// maps safely onto a path on every backend.
func ValidKey(key string) error {
	switch {
	case key == "":
		return errors.New("empty key")
	case len(key) > 1024:
		return errors.New("key longer than 1024 bytes")
	case !utf8.ValidString(key):
		return errors.New("key is not valid UTF-8")
	case strings.ContainsRune(key, 0):
		return errors.New("key contains NUL")
	case strings.HasPrefix(key, "/"):
		return errors.New("key is absolute")
	}
	for el := range strings.SplitSeq(key, "/") {
		if el == "" || el == "." || el == ".." {
			return fmt.Errorf("key has an empty, '.' or '..' element")
		}
	}
	return nil
}
