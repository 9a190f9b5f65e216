// Package file is the file:// store backend: objects as plain files under a
// directory.
package file

import (
	"context"
	"crypto/md5"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"iter"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/podkeeper/podkeeper/agents/config"
	"github.com/podkeeper/podkeeper/agents/store"
)

func init() {
	store.Register("file", func(_ context.Context, c *config.Store, _ *slog.Logger) (store.Store, error) {
		s, err := New(c.Path)
		if err != nil {
			return nil, err // not a typed nil inside the interface
		}
		return s, nil
	})
}

// fileInternal is the backend's own folder inside its root; keys under it are refused.
const fileInternal = ".podkeeper-store"

// Store keeps objects as plain files under a directory, so a file:// store is
// browsable with ls. Metadata lives beside the data in a parallel tree under
// .podkeeper-store/meta, writes are atomic (temp + fsync + rename) and
// conditional writes are checked under a lock (in-process mutex + flock, so two
// processes sharing the directory agree too).
type Store struct {
	root string
	mu   sync.Mutex
}

type fileMeta struct {
	Size        int64             `json:"size"`
	ETag        string            `json:"etag"`
	ContentType string            `json:"content_type,omitempty"`
	Encoding    string            `json:"content_encoding,omitempty"`
	Metadata    map[string]string `json:"metadata,omitempty"`
	ModTime     time.Time         `json:"mtime"`
}

// New opens (creating if needed) a file store rooted at dir.
func New(dir string) (*Store, error) {
	if !filepath.IsAbs(dir) {
		return nil, fmt.Errorf("file store: %q is not an absolute path", dir)
	}
	for _, d := range []string{dir, filepath.Join(dir, fileInternal, "tmp"), filepath.Join(dir, fileInternal, "meta")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, &store.Error{Op: "open", Err: err}
		}
	}
	return &Store{root: dir}, nil
}

func (s *Store) String() string { return "file://" + s.root }

func (s *Store) check(op, key string) error {
	if err := store.ValidKey(key); err != nil {
		return &store.Error{Op: op, Key: key, Err: err}
	}
	if key == fileInternal || strings.HasPrefix(key, fileInternal+"/") {
		return &store.Error{Op: op, Key: key, Err: fmt.Errorf("keys under %s/ are reserved by the file store", fileInternal)}
	}
	return nil
}

func (s *Store) dataPath(key string) string {
	return filepath.Join(s.root, filepath.FromSlash(key))
}
func (s *Store) metaPath(key string) string {
	return filepath.Join(s.root, fileInternal, "meta", filepath.FromSlash(key)+".json")
}

// fsErr wraps a filesystem error; local I/O errors are not retryable except
// the ones a full or busy disk gives, which may clear.
func fsErr(op, key string, err error) error {
	if errors.Is(err, fs.ErrNotExist) {
		return &store.Error{Op: op, Key: key, Err: store.ErrNotExist}
	}
	retry := errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EAGAIN) || errors.Is(err, syscall.EBUSY)
	return &store.Error{Op: op, Key: key, Err: err, Retryable: retry}
}

func (s *Store) Put(ctx context.Context, key string, r io.Reader, size int64, opts store.PutOptions) (store.ObjectInfo, error) {
	if err := s.check("put", key); err != nil {
		return store.ObjectInfo{}, err
	}
	tmpDir := filepath.Join(s.root, fileInternal, "tmp")
	data, err := os.CreateTemp(tmpDir, "put-*")
	if err != nil {
		return store.ObjectInfo{}, fsErr("put", key, err)
	}
	defer os.Remove(data.Name()) // a no-op after the rename
	h := md5.New()
	n, err := io.Copy(io.MultiWriter(data, h), ctxReader{ctx, r})
	if err == nil && size >= 0 && n != size {
		err = fmt.Errorf("body has %d bytes, expected %d", n, size)
	}
	if err == nil {
		err = data.Sync()
	}
	if cerr := data.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return store.ObjectInfo{}, fsErr("put", key, err)
	}
	meta := fileMeta{Size: n, ETag: etagOf(h), ContentType: opts.ContentType, Encoding: opts.ContentEncoding, Metadata: opts.Metadata, ModTime: time.Now().UTC()}
	metaTmp, err := writeTempJSON(tmpDir, meta)
	if err != nil {
		return store.ObjectInfo{}, fsErr("put", key, err)
	}
	defer os.Remove(metaTmp)

	unlock, err := s.lock()
	if err != nil {
		return store.ObjectInfo{}, fsErr("put", key, err)
	}
	defer unlock()
	if err := s.checkPrecondition(key, opts); err != nil {
		return store.ObjectInfo{}, err
	}
	dst := s.dataPath(key)
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return store.ObjectInfo{}, s.clash("put", key, err)
	}
	if err := os.MkdirAll(filepath.Dir(s.metaPath(key)), 0o755); err != nil {
		return store.ObjectInfo{}, s.clash("put", key, err)
	}
	// Data first: a crash between the renames leaves data without fresh metadata,
	// which Head detects by size/mtime and recomputes, never metadata without data.
	if err := os.Rename(data.Name(), dst); err != nil {
		return store.ObjectInfo{}, s.clash("put", key, err)
	}
	if err := os.Rename(metaTmp, s.metaPath(key)); err != nil {
		return store.ObjectInfo{}, fsErr("put", key, err)
	}
	syncDir(filepath.Dir(dst))
	syncDir(filepath.Dir(s.metaPath(key)))
	return store.ObjectInfo{Key: key, Size: n, ETag: meta.ETag, ModTime: meta.ModTime, Metadata: meta.Metadata, ContentEncoding: meta.Encoding}, nil
}

// checkPrecondition evaluates IfNoneMatch/IfMatch; the caller holds the lock.
func (s *Store) checkPrecondition(key string, opts store.PutOptions) error {
	if !opts.IfNoneMatch && opts.IfMatch == "" {
		return nil
	}
	cur, err := s.headLocked(key)
	switch {
	case err == nil && opts.IfNoneMatch:
		return &store.Error{Op: "put", Key: key, Err: fmt.Errorf("%w: object exists (If-None-Match: *)", store.ErrPrecondition)}
	case err == nil && opts.IfMatch != cur.ETag:
		return &store.Error{Op: "put", Key: key, Err: fmt.Errorf("%w: etag is %s, not %s", store.ErrPrecondition, cur.ETag, opts.IfMatch)}
	case err != nil && !errors.Is(err, store.ErrNotExist):
		return err
	case err != nil && opts.IfMatch != "":
		return &store.Error{Op: "put", Key: key, Err: fmt.Errorf("%w: object does not exist (If-Match)", store.ErrPrecondition)}
	}
	return nil
}

// clash explains the one thing S3 allows and a filesystem does not: a key that
// is both an object and a prefix of other keys.
func (s *Store) clash(op, key string, err error) error {
	if errors.Is(err, syscall.ENOTDIR) || errors.Is(err, syscall.EEXIST) || errors.Is(err, syscall.EISDIR) {
		return &store.Error{Op: op, Key: key, Err: fmt.Errorf("a file store cannot hold a key that is also a prefix of another key: %w", err)}
	}
	return fsErr(op, key, err)
}

func (s *Store) Get(ctx context.Context, key string, opts store.GetOptions) (io.ReadCloser, store.ObjectInfo, error) {
	if err := s.check("get", key); err != nil {
		return nil, store.ObjectInfo{}, err
	}
	if opts.VersionID != "" {
		return nil, store.ObjectInfo{}, &store.Error{Op: "get", Key: key, Err: errors.New("the file store keeps no versions")}
	}
	f, err := os.Open(s.dataPath(key))
	if err != nil {
		return nil, store.ObjectInfo{}, fsErr("get", key, err)
	}
	info, err := s.headOpen(key, f)
	if err != nil {
		f.Close()
		return nil, store.ObjectInfo{}, err
	}
	if opts.Offset == 0 && opts.Length == 0 {
		return f, info, nil
	}
	if opts.Offset < 0 || opts.Length < 0 || opts.Offset >= info.Size && !(opts.Offset == 0 && info.Size == 0) {
		f.Close()
		return nil, store.ObjectInfo{}, &store.Error{Op: "get", Key: key, Err: fmt.Errorf("range %d+%d not satisfiable for size %d", opts.Offset, opts.Length, info.Size)}
	}
	if _, err := f.Seek(opts.Offset, io.SeekStart); err != nil {
		f.Close()
		return nil, store.ObjectInfo{}, fsErr("get", key, err)
	}
	n := info.Size - opts.Offset
	if opts.Length > 0 && opts.Length < n {
		n = opts.Length
	}
	return struct {
		io.Reader
		io.Closer
	}{io.LimitReader(f, n), f}, info, nil
}

func (s *Store) Head(ctx context.Context, key string, _ store.HeadOptions) (store.ObjectInfo, error) {
	if err := s.check("head", key); err != nil {
		return store.ObjectInfo{}, err
	}
	return s.headLocked(key)
}

func (s *Store) headLocked(key string) (store.ObjectInfo, error) {
	f, err := os.Open(s.dataPath(key))
	if err != nil {
		return store.ObjectInfo{}, fsErr("head", key, err)
	}
	defer f.Close()
	return s.headOpen(key, f)
}

func (s *Store) headOpen(key string, f *os.File) (store.ObjectInfo, error) {
	st, err := f.Stat()
	if err != nil {
		return store.ObjectInfo{}, fsErr("head", key, err)
	}
	if st.IsDir() {
		return store.ObjectInfo{}, &store.Error{Op: "head", Key: key, Err: store.ErrNotExist}
	}
	var m fileMeta
	b, err := os.ReadFile(s.metaPath(key))
	if err == nil {
		err = json.Unmarshal(b, &m)
	}
	if err != nil || m.Size != st.Size() {
		// Data written outside the store, or a crash between the two renames:
		// describe the data as it is.
		h := md5.New()
		if _, err := io.Copy(h, io.NewSectionReader(f, 0, st.Size())); err != nil {
			return store.ObjectInfo{}, fsErr("head", key, err)
		}
		m = fileMeta{Size: st.Size(), ETag: etagOf(h), ModTime: st.ModTime().UTC()}
	}
	return store.ObjectInfo{Key: key, Size: m.Size, ETag: m.ETag, ModTime: m.ModTime, Metadata: m.Metadata, ContentEncoding: m.Encoding}, nil
}

func (s *Store) List(ctx context.Context, prefix string) iter.Seq2[store.ObjectInfo, error] {
	return s.ListAfter(ctx, prefix, "")
}

// ListAfter implements store.ListerAfter: keys up to after are skipped before
// they cost a read of their metadata.
func (s *Store) ListAfter(ctx context.Context, prefix, after string) iter.Seq2[store.ObjectInfo, error] {
	return func(yield func(store.ObjectInfo, error) bool) {
		// Walk only the deepest directory the prefix names, then sort: a directory
		// walk orders "a/b" before "a-b", S3 orders bytes.
		start := s.root
		if i := strings.LastIndex(prefix, "/"); i >= 0 {
			start = filepath.Join(s.root, filepath.FromSlash(prefix[:i]))
		}
		var keys []string
		err := filepath.WalkDir(start, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				if errors.Is(err, fs.ErrNotExist) {
					return nil
				}
				return err
			}
			if err := ctx.Err(); err != nil {
				return err
			}
			rel, _ := filepath.Rel(s.root, p)
			rel = filepath.ToSlash(rel)
			if d.IsDir() {
				if rel == fileInternal {
					return filepath.SkipDir
				}
				return nil
			}
			if d.Type().IsRegular() && strings.HasPrefix(rel, prefix) && rel > after {
				keys = append(keys, rel)
			}
			return nil
		})
		if err != nil {
			yield(store.ObjectInfo{}, fsErr("list", prefix, err))
			return
		}
		slices.Sort(keys)
		for _, k := range keys {
			info, err := s.headLocked(k)
			if errors.Is(err, store.ErrNotExist) {
				continue // deleted while listing
			}
			if err != nil {
				yield(store.ObjectInfo{}, err)
				return
			}
			info.Metadata, info.ContentEncoding = nil, "" // as S3's ListObjectsV2
			if !yield(info, nil) {
				return
			}
		}
	}
}

func (s *Store) Delete(ctx context.Context, key string) error {
	if err := s.check("delete", key); err != nil {
		return err
	}
	unlock, err := s.lock()
	if err != nil {
		return fsErr("delete", key, err)
	}
	defer unlock()
	for _, p := range []string{s.dataPath(key), s.metaPath(key)} {
		if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
			if st, serr := os.Stat(p); serr == nil && st.IsDir() {
				return nil // a prefix, not an object: nothing to delete, as in S3
			}
			return fsErr("delete", key, err)
		}
		// S3 has no directories: drop the ones this object leaves empty.
		for dir := filepath.Dir(p); dir != s.root && dir != filepath.Join(s.root, fileInternal, "meta"); dir = filepath.Dir(dir) {
			if os.Remove(dir) != nil {
				break
			}
		}
	}
	return nil
}

func (s *Store) lock() (func(), error) {
	s.mu.Lock()
	f, err := os.OpenFile(filepath.Join(s.root, fileInternal, "lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		s.mu.Unlock()
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		f.Close()
		s.mu.Unlock()
		return nil, err
	}
	return func() {
		f.Close() // releases the flock
		s.mu.Unlock()
	}, nil
}

func etagOf(h hash.Hash) string { return `"` + hex.EncodeToString(h.Sum(nil)) + `"` }

func writeTempJSON(dir string, v any) (string, error) {
	f, err := os.CreateTemp(dir, "meta-*")
	if err != nil {
		return "", err
	}
	err = json.NewEncoder(f).Encode(v)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(f.Name())
		return "", err
	}
	return f.Name(), nil
}

func syncDir(dir string) {
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync() // best effort: some filesystems refuse fsync on directories
		d.Close()
	}
}

// ctxReader stops a long copy when the context ends.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}
