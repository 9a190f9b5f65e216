package restore

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"
	"golang.org/x/sys/unix"

	"github.com/podkeeper/podkeeper/agents/adaptive"
	"github.com/podkeeper/podkeeper/agents/backoff"
	"github.com/podkeeper/podkeeper/agents/codec"
	"github.com/podkeeper/podkeeper/agents/safefs"
	"github.com/podkeeper/podkeeper/agents/snapshot"
	"github.com/podkeeper/podkeeper/agents/store"
)

// ChangedError says a data object no longer holds what the snapshot recorded.
type ChangedError struct {
	Path      string
	Key       string
	Want      string // sha256 or size the snapshot recorded
	Got       string
	VersionID string
}

func (e *ChangedError) Error() string {
	msg := fmt.Sprintf("file %q: object %s does not match the snapshot (snapshot says %s, downloaded %s): the object changed after the snapshot was taken", e.Path, e.Key, e.Want, e.Got)
	if e.VersionID != "" {
		return msg + fmt.Sprintf("; the snapshot's version %s was fetched, so that stored version itself is damaged", e.VersionID)
	}
	return msg + "; the snapshot records no version_id, so only the current object could be fetched (bucket versioning lets older snapshots restore exactly)"
}

// readError marks a failure while reading a response body: the network, not
// the disk, so it is worth retrying.
func retryableRead(op, key string, err error) error {
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	return &store.Error{Op: op, Key: key, Err: err, Retryable: true}
}

var bufPool = sync.Pool{New: func() any { b := make([]byte, 256<<10); return &b }}

// smallBufPool serves files that fit in smallBufSize (plus the byte that sees
// EOF): with 128 downloads in flight, 256 KiB buffers would be 32 MiB.
var smallBufPool = sync.Pool{New: func() any { b := make([]byte, smallBufSize); return &b }}

const smallBufSize = 32 << 10

// limiterKey carries the small-file limiter to get, which reports throttling
// to it.
type limiterKey struct{}

func (r *Restorer) fetchAll(ctx context.Context, t *tree, tmp int, p *plan) error {
	r.prog.totalFiles, r.prog.totalBytes = int64(len(p.fetch)), p.fetchBytes
	if len(p.fetch) == 0 {
		return nil
	}
	stop := r.logProgress(ctx, time.Now())
	defer stop()

	var small, large []int32
	for _, i := range p.fetch {
		if p.files.Size(int(i)) >= r.rangeThreshold {
			large = append(large, i)
		} else {
			small = append(small, i)
		}
	}
	// Small files: from packs where they are, else one GET each, as many at
	// a time as the adaptive limiter allows; the first failure cancels the
	// others.
	lim := adaptive.New(r.cfg.Concurrency, r.cfg.MaxConcurrency, time.Now())
	lctx := context.WithValue(ctx, limiterKey{}, lim)
	if r.cfg.Packs && len(small) >= minPackedFiles {
		runs, rest := r.packRuns(lctx, p.files, small)
		fallback, err := r.fetchRuns(lctx, lim, t, tmp, p.files, runs)
		if err != nil {
			return err
		}
		if len(runs) > 0 {
			r.log.Info("small files from packs", "files", len(small)-len(rest)-len(fallback), "ranged_gets", len(runs),
				"pack_entries_refused", len(fallback), "files_not_in_packs", len(rest))
		}
		small = append(rest, fallback...)
	}
	largestFirst(p.files, small)
	err := r.each(lctx, lim, len(small), func(ctx context.Context, k int) error {
		return r.fetchFile(ctx, t, tmp, p.files.At(int(small[k])))
	})
	if err != nil {
		return err
	}
	if len(small) > 0 {
		r.log.Debug("small files fetched", "files", len(small), "final_concurrency", lim.Limit())
	}
	// Large files one after another, each with Concurrency ranged GETs.
	for _, i := range large {
		if err := r.fetchFile(ctx, t, tmp, p.files.At(int(i))); err != nil {
			return err
		}
	}
	return ctx.Err()
}

// fetchFile downloads f into a temp file, verifies it, gives it its mode and
// mtime and renames it into place. A sha256 mismatch is retried once.
func (r *Restorer) fetchFile(ctx context.Context, t *tree, tmp int, f snapshot.File) error {
	var err error
	for attempt := range 2 {
		err = r.fetchOnce(ctx, t, tmp, f)
		var ce *ChangedError
		if !errors.As(err, &ce) {
			return err
		}
		if attempt == 0 {
			r.log.Warn("downloaded data does not match the snapshot, retrying once", "path", f.Path, "err", err)
		}
	}
	return err
}

func (r *Restorer) fetchOnce(ctx context.Context, t *tree, tmp int, f snapshot.File) error {
	file, name, err := createTemp(tmp)
	if err != nil {
		return fmt.Errorf("create temp file for %q: %w", f.Path, err)
	}
	var sum string
	if f.Size >= r.rangeThreshold && f.Encoding == codec.None {
		// An encoded object is fetched whole: its ranges are not the file's.
		sum, err = r.downloadRanges(ctx, file, f)
	} else {
		sum, err = r.downloadWhole(ctx, file, f)
	}
	if err == nil && r.cfg.Verify && sum != f.SHA256 {
		err = &ChangedError{Path: f.Path, Key: snapshot.DataKey(f.Path), Want: "sha256 " + f.SHA256, Got: "sha256 " + sum, VersionID: f.VersionID}
	}
	if err != nil {
		discard(tmp, file, name)
		return err
	}
	return r.install(t, tmp, file, name, f)
}

// discard drops a temp file that will not be placed.
func discard(tmp int, file *os.File, name string) {
	file.Close()
	if name != "" {
		unix.Unlinkat(tmp, name, 0)
	}
}

// install gives the complete, verified temp file (named name in tmp, or
// unnamed when name is "") f's mode and mtime, makes it durable as
// r.Durability asks and puts it at f.Path. It always closes file.
func (r *Restorer) install(t *tree, tmp int, file *os.File, name string, f snapshot.File) error {
	placed := false
	defer func() {
		if !placed {
			discard(tmp, file, name)
		}
	}()
	if err := file.Chmod(os.FileMode(f.Mode)); err != nil {
		return fmt.Errorf("chmod temp file of %q: %w", f.Path, err)
	}
	ts := []unix.Timespec{unix.NsecToTimespec(f.MTime.UnixNano()), unix.NsecToTimespec(f.MTime.UnixNano())}
	if err := safefs.TimesFd(int(file.Fd()), ts); err != nil {
		return fmt.Errorf("set mtime of %q: %w", f.Path, err)
	}
	// Large files are flushed on their own even under SyncFS: their writeback
	// is already under way (see downloadRanges), and syncfs would also wait
	// for every other writer's dirty data on the filesystem.
	if r.Durability == FsyncEach || f.Size >= r.rangeThreshold {
		if err := file.Sync(); err != nil {
			return fmt.Errorf("fsync %q: %w", f.Path, err)
		}
	}
	if name == "" {
		// Unnamed: linked straight to its name when nothing is there (a fresh
		// restore), else named in the temp dir and placed like the others.
		err := t.link(int(file.Fd()), f.Path)
		if err == nil {
			placed = true
			file.Close()
			r.counted(f)
			return nil
		}
		if !errors.Is(err, unix.EEXIST) {
			return err
		}
		name = tmpName()
		if err := safefs.LinkFd(int(file.Fd()), tmp, name); err != nil {
			name = ""
			return fmt.Errorf("name temp file of %q: %w", f.Path, err)
		}
	}
	if err := file.Close(); err != nil {
		return fmt.Errorf("close temp file of %q: %w", f.Path, err)
	}
	placed = true
	if err := t.place(tmp, name, f.Path); err != nil {
		unix.Unlinkat(tmp, name, 0)
		return err
	}
	r.counted(f)
	return nil
}

func (r *Restorer) counted(f snapshot.File) {
	if f.Size < r.rangeThreshold {
		r.prog.smallFetched.Add(1)
	}
	r.prog.files.Add(1)
}

// createTemp creates the file a download goes to: unnamed (O_TMPFILE) in the
// temp dir where the filesystem can (name ""), else under a random name.
// Many downloads creating names in one directory at once contend on it: an
// unnamed file costs no directory entry until it is linked into place.
func createTemp(tmp int) (*os.File, string, error) {
	fd, ok, err := safefs.CreateUnnamed(tmp)
	if err != nil {
		return nil, "", err
	}
	if ok {
		return os.NewFile(uintptr(fd), "(unnamed)"), "", nil
	}
	name := tmpName()
	fd, err = unix.Openat(tmp, name, unix.O_RDWR|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, "", err
	}
	return os.NewFile(uintptr(fd), name), name, nil
}

func tmpName() string {
	var b [12]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:]) + tmpSuffix
}

// get opens the object of f (the snapshot's version when it has one), retrying
// transient failures until ctx ends: an outage delays the restore, it does not
// fail it.
func (r *Restorer) get(ctx context.Context, f snapshot.File, opts store.GetOptions, body func(io.Reader, store.ObjectInfo) error) error {
	key := snapshot.DataKey(f.Path)
	opts.VersionID = f.VersionID
	return backoff.Retry(ctx, backoff.Default, store.IsRetryable, r.onRetry(ctx, key), func(ctx context.Context) error {
		rc, info, err := r.st.Get(ctx, key, opts)
		if err != nil {
			return err
		}
		defer rc.Close()
		if got := info.Metadata[snapshot.MetaEncoding]; info.Metadata != nil && got != f.Encoding {
			return &ChangedError{Path: f.Path, Key: key, Want: "encoding " + encodingText(f.Encoding), Got: "an object stored with encoding " + encodingText(got), VersionID: f.VersionID}
		}
		if f.Encoding == codec.None && info.Size != f.Size {
			return &ChangedError{Path: f.Path, Key: key, Want: fmt.Sprintf("size %d", f.Size), Got: fmt.Sprintf("size %d", info.Size), VersionID: f.VersionID}
		}
		return body(rc, info)
	})
}

// downloadWhole streams the object into file, hashing on the way.
func (r *Restorer) downloadWhole(ctx context.Context, file *os.File, f snapshot.File) (string, error) {
	var h hash.Hash
	key := snapshot.DataKey(f.Path)
	attempt := 0
	err := r.get(ctx, f, store.GetOptions{}, func(body io.Reader, _ store.ObjectInfo) error {
		// Truncating only on a retry matters: ext4 flushes a file on close
		// when it was truncated (auto_da_alloc), which costs more than the GET.
		if attempt++; attempt > 1 {
			if _, err := file.Seek(0, io.SeekStart); err != nil {
				return err
			}
			if err := file.Truncate(0); err != nil {
				return err
			}
		}
		h = sha256.New()
		var w io.Writer = file
		if r.cfg.Verify {
			w = io.MultiWriter(file, h)
		}
		pool := &bufPool
		if f.Size < smallBufSize {
			pool = &smallBufPool
		}
		bp := pool.Get().(*[]byte)
		defer pool.Put(bp)
		src := io.LimitReader(body, f.Size+1)
		if f.Encoding != codec.None {
			// Decoded while it downloads; the decoder stops one byte past
			// the recorded size (a bomb costs at most that much).
			rc, err := codec.DecodeSized(f.Encoding, body, f.Size)
			if err != nil {
				return r.undecodable(f, err)
			}
			defer rc.Close()
			src = rc
		}
		n, err := copyCounted(w, src, *bp, &r.prog)
		if err != nil {
			return r.undecodable(f, err)
		}
		if n > f.Size {
			return &ChangedError{Path: f.Path, Key: key, Want: fmt.Sprintf("size %d", f.Size), Got: "more bytes", VersionID: f.VersionID}
		}
		if n < f.Size {
			r.prog.bytes.Add(-n)
			return retryableRead("get", key, fmt.Errorf("body ended after %d of %d bytes", n, f.Size))
		}
		return nil
	})
	if err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// undecodable turns the decoder's refusal of an object into a ChangedError
// (permanent: the stored bytes are not the recorded content); other errors,
// the network's, pass unchanged.
func (r *Restorer) undecodable(f snapshot.File, err error) error {
	var ie *codec.InvalidError
	if !errors.As(err, &ie) {
		return err
	}
	return &ChangedError{Path: f.Path, Key: snapshot.DataKey(f.Path), Want: fmt.Sprintf("%s-encoded content of %d bytes", f.Encoding, f.Size),
		Got: ie.Error(), VersionID: f.VersionID}
}

func encodingText(enc string) string {
	if enc == codec.None {
		return "none"
	}
	return enc
}

// copyCounted copies like io.CopyBuffer and adds progress as it goes. Read
// errors are the network's (retryable), write errors the disk's (not).
func copyCounted(dst io.Writer, src io.Reader, buf []byte, p *progress) (int64, error) {
	var n int64
	for {
		k, rerr := src.Read(buf)
		if k > 0 {
			if _, werr := dst.Write(buf[:k]); werr != nil {
				return n, werr
			}
			n += int64(k)
			p.bytes.Add(int64(k))
		}
		if rerr == io.EOF {
			return n, nil
		}
		if rerr != nil {
			p.bytes.Add(-n)
			return n, retryableRead("get", "", rerr)
		}
	}
}

// downloadRanges fetches a large object in PartSize ranges, Concurrency at a
// time, written with WriteAt. The sha256 is computed in order while later
// parts still download: a hasher goroutine reads each part back (from the page
// cache) as soon as it and all before it are complete, so only the last parts
// are hashed after the network is done.
func (r *Restorer) downloadRanges(ctx context.Context, file *os.File, f snapshot.File) (string, error) {
	if err := file.Truncate(f.Size); err != nil {
		return "", fmt.Errorf("allocate temp file for %q: %w", f.Path, err)
	}
	ps := r.partSize
	nparts := int((f.Size + ps - 1) / ps)
	done := make([]chan struct{}, nparts)
	for i := range done {
		done[i] = make(chan struct{})
	}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)

	h := sha256.New()
	hashErr := make(chan error, 1)
	go func() { hashErr <- r.hashParts(ctx, h, file, f.Size, done) }()

	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(r.cfg.Concurrency)
	for i := range nparts {
		if gctx.Err() != nil {
			break
		}
		g.Go(func() error {
			off := int64(i) * ps
			n := min(ps, f.Size-off)
			if err := r.getRange(gctx, file, f, off, n); err != nil {
				return err
			}
			// Start writing this part to disk now, while later parts still
			// download, so the final flush has little left to do. Only a hint:
			// durability comes from the fsync/syncfs before restored.json.
			_ = unix.SyncFileRange(int(file.Fd()), off, n, unix.SYNC_FILE_RANGE_WRITE)
			close(done[i])
			return nil
		})
	}
	firstErr := g.Wait()
	if firstErr == nil && ctx.Err() != nil {
		// Cancelled between two parts: some were never started, and without
		// RESTORE_VERIFY nothing else would notice the hole.
		firstErr = context.Cause(ctx)
	}
	if firstErr != nil {
		// The hasher may wait for a part that will never come.
		cancel(firstErr)
	}
	herr := <-hashErr
	if firstErr != nil {
		return "", firstErr
	}
	if herr != nil {
		return "", fmt.Errorf("hash %q: %w", f.Path, herr)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// hashParts feeds the parts of file to h in order, each as soon as its done
// channel is closed. Without RESTORE_VERIFY it hashes nothing.
func (r *Restorer) hashParts(ctx context.Context, h hash.Hash, file *os.File, size int64, done []chan struct{}) error {
	if !r.cfg.Verify {
		return nil
	}
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	for i := range done {
		select {
		case <-done[i]:
		case <-ctx.Done():
			return context.Cause(ctx)
		}
		off := int64(i) * r.partSize
		n := min(r.partSize, size-off)
		if _, err := io.CopyBuffer(h, io.NewSectionReader(file, off, n), *bp); err != nil {
			return err
		}
	}
	return nil
}

// getRange downloads bytes off..off+n of f into file at the same offset.
func (r *Restorer) getRange(ctx context.Context, file *os.File, f snapshot.File, off, n int64) error {
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	return r.get(ctx, f, store.GetOptions{Offset: off, Length: n}, func(body io.Reader, _ store.ObjectInfo) error {
		// Reading one byte past the range sees the body's EOF, so the
		// connection goes back to the pool instead of being closed.
		got, err := copyCounted(io.NewOffsetWriter(file, off), io.LimitReader(body, n+1), *bp, &r.prog)
		if err == nil && got > n {
			err = fmt.Errorf("range %d+%d of %q returned more bytes than asked", off, n, f.Path)
		}
		if err == nil && got < n {
			r.prog.bytes.Add(-got)
			err = retryableRead("get", snapshot.DataKey(f.Path), fmt.Errorf("range %d+%d ended after %d bytes", off, n, got))
		}
		return err
	})
}
