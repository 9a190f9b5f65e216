package syncer

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"io/fs"
	"log/slog"
	"mime"
	"os"
	"path"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/podkeeper/podkeeper/agents/adaptive"
	"github.com/podkeeper/podkeeper/agents/backoff"
	"github.com/podkeeper/podkeeper/agents/codec"
	"github.com/podkeeper/podkeeper/agents/events"
	"github.com/podkeeper/podkeeper/agents/safefs"
	"github.com/podkeeper/podkeeper/agents/snapshot"
	"github.com/podkeeper/podkeeper/agents/store"
)

// Multipart tuning of the syncer's uploads: files from multipartThreshold on
// go up resumably in parts of partSize, partConcurrency of them at a time
// (the kit's defaults, the same the S3 backend's Put uses).
const (
	multipartThreshold = store.DefaultMultipartThreshold
	partSize           = store.DefaultPartSize
	partConcurrency    = store.DefaultPartConcurrency
)

// copyBufs recycles hashing buffers: a backfill of small files would
// otherwise allocate one per file and keep the GC busy.
var copyBufs = sync.Pool{New: func() any { b := make([]byte, 64<<10); return &b }}

// uploader is what the workers share: it reads files under SYNC_DIR and
// writes them to the store, and keeps the multipart journals.
type uploader struct {
	writer  string       // namespace/pod/uid, in every object's metadata
	root    *safefs.Root // SYNC_DIR: files are opened below it, never through a link
	journal string       // multipart journal directory, for messages
	jr      *safefs.Root // the same, opened without links
	st      store.Store
	mp      store.Multiparter // nil: the store has no resumable uploads
	lim     *adaptive.Limiter // uploads in flight, adaptive
	// compress is the encoding of SYNC_COMPRESS (codec.None: off). Only
	// files below multipartThreshold are encoded: a multipart upload reads
	// its parts straight from the file, by offset, which an encoded stream
	// of unknown length cannot give.
	compress string
	log      *slog.Logger
	rec      events.Recorder
	m        *metrics
	// retrying counts the sends retrying through failures right now: the
	// loop's readiness reads it, so /readyz shows an outage while it lasts.
	retrying atomic.Int32
}

// work uploads jobs while the adaptive limit gives it a slot: the pool has
// SYNC_MAX_CONCURRENCY workers, SYNC_CONCURRENCY of them to start with.
func (u *uploader) work(ctx context.Context, jobs <-chan job, results chan<- result) {
	for {
		if u.lim.Acquire(ctx) != nil {
			return
		}
		j, ok := <-jobs
		if !ok {
			u.lim.Release()
			return
		}
		r := u.upload(ctx, j)
		r.gen = j.gen
		if r.err == nil {
			u.lim.Done(time.Now())
		}
		u.lim.Release()
		results <- r
	}
}

// upload sends one file. The file is hashed first (the hash travels as
// metadata), then streamed from disk; its stat is compared before and after,
// so content that changed meanwhile is reported as changed and uploaded again
// rather than recorded.
func (u *uploader) upload(ctx context.Context, j job) result {
	rel := j.rel
	r := result{rel: rel}
	// A link anywhere on the path (a parent directory swapped for one
	// between the check and the open included) is never followed.
	f, err := u.root.Open(rel)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) || errors.Is(err, safefs.ErrLink) || errors.Is(err, safefs.ErrNotRegular) {
			r.gone = true
			return r
		}
		r.err = err
		return r
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		r.err = err
		return r
	}
	st := statOf(fi) // a regular file: Root.Open refuses anything else
	r.stat = st
	h := sha256.New()
	buf := copyBufs.Get().(*[]byte)
	n, err := io.CopyBuffer(h, io.NewSectionReader(f, 0, st.size), *buf)
	copyBufs.Put(buf)
	if err != nil {
		r.err = err
		return r
	}
	if fi2, err := f.Stat(); err != nil || n != st.size || !statOf(fi2).same(st) {
		r.changed = true
		if err == nil {
			r.stat = statOf(fi2)
		}
		return r
	}
	file := snapshot.File{Path: rel, Size: st.size, SHA256: hex.EncodeToString(h.Sum(nil)), MTime: st.mtime, Mode: snapshot.Mode(st.mode)}
	body := codec.Raw(f, st.size)
	if u.compress != codec.None && st.size < multipartThreshold {
		if body, err = codec.Encode(u.compress, rel, f, st.size); err != nil {
			return u.failed(r, rel, st, err)
		}
	}
	file.Encoding = body.Encoding
	info, c, err := u.send(ctx, f, body, file, j.seen)
	if err != nil {
		return u.failed(r, rel, st, err)
	}
	r.conflict = c
	r.bytesSent = st.size
	after, err := u.root.Lstat(rel)
	switch {
	case err != nil:
		r.gone = true
		return r
	case !statOf(after).same(st):
		r.changed, r.stat = true, statOf(after)
		return r
	}
	file.ETag, file.VersionID = info.ETag, info.VersionID
	if info.Metadata != nil {
		// The object there: ours, or the same content stored by another
		// writer, perhaps otherwise encoded.
		file.Encoding = info.Metadata[snapshot.MetaEncoding]
	}
	r.file = file
	return r
}

// failed reports an upload that did not complete: as changed when the file
// no longer reads as it was hashed (its encoding came out another length, or
// its stat moved), as an error otherwise.
func (u *uploader) failed(r result, rel string, st fileStat, err error) result {
	if after, lerr := u.root.Lstat(rel); errors.Is(err, codec.ErrChanged) || (lerr == nil && !statOf(after).same(st)) {
		r.changed = true
		if lerr == nil {
			r.stat = statOf(after)
		}
		return r
	}
	r.err = err
	return r
}

// send writes the object of file from f, retrying through outages. The
// write is conditional on the object this writer saw (sn): a new path only
// if absent, a known one only if unchanged; otherwise resolve decides.
func (u *uploader) send(ctx context.Context, f *os.File, body *codec.Body, file snapshot.File, sn seen) (store.ObjectInfo, *conflict, error) {
	opts := store.PutOptions{Metadata: file.Metadata(), ContentType: mime.TypeByExtension(path.Ext(file.Path)),
		ContentEncoding: codec.ContentEncoding(body.Encoding)}
	opts.Metadata[MetaWriter] = u.writer
	var info store.ObjectInfo
	counted := false
	defer func() {
		if counted {
			u.retrying.Add(-1)
		}
	}()
	var c *conflict
	// A body that no longer encodes as measured is a changed file, not an
	// outage: the next attempt would fail the same way.
	retryable := func(err error) bool { return store.IsRetryable(err) && !errors.Is(err, codec.ErrChanged) }
	err := backoff.Retry(ctx, backoff.Default, retryable, func(attempt int, err error, wait time.Duration) {
		u.m.retries.Inc()
		if adaptive.IsThrottle(err) {
			u.lim.Throttled(time.Now())
		}
		if !counted {
			counted = true
			u.retrying.Add(1)
		}
		if attempt == 0 || attempt%10 == 9 {
			u.log.Warn("upload failed, retrying", "path", file.Path, "err", err, "attempt", attempt+1, "wait", wait)
		}
		if attempt >= 2 {
			u.rec.Event(ctx, events.Warning, "UploadsFailing", "uploads are failing and being retried: "+err.Error())
		}
	}, func(ctx context.Context) error {
		var err error
		info, c, err = u.sendOnce(ctx, f, body, file, sn, opts)
		return err
	})
	return info, c, err
}

func (u *uploader) sendOnce(ctx context.Context, f *os.File, body *codec.Body, file snapshot.File, sn seen, opts store.PutOptions) (store.ObjectInfo, *conflict, error) {
	if u.mp != nil && file.Size >= multipartThreshold {
		// The completion is conditional like a PUT. The HEAD first is only
		// a cheap early look: content another writer already stored, or a
		// conflict, is settled before any part is sent.
		put := func(ctx context.Context, cond store.PutOptions) (store.ObjectInfo, error) {
			return u.multipart(ctx, f, file, opts, cond)
		}
		key := snapshot.DataKey(file.Path)
		cur, err := u.st.Head(ctx, key, store.HeadOptions{})
		var info store.ObjectInfo
		switch {
		case errors.Is(err, store.ErrNotExist):
			info, err = put(ctx, store.PutOptions{IfNoneMatch: true})
		case err == nil && sn.etag != "" && cur.ETag == sn.etag:
			info, err = put(ctx, store.PutOptions{IfMatch: cur.ETag})
		case err != nil:
			return store.ObjectInfo{}, nil, err
		default:
			err = store.ErrPrecondition
		}
		if !errors.Is(err, store.ErrPrecondition) {
			return info, nil, err
		}
		info, c, err := u.resolve(ctx, body, file, sn, opts, put)
		if err == nil {
			// Our upload was not completed (the same content was there, or
			// we lost the conflict): its parts are of no further use.
			u.dropJournal(ctx, key)
		}
		return info, c, err
	}
	put := func(ctx context.Context, cond store.PutOptions) (store.ObjectInfo, error) {
		o := opts
		o.IfMatch, o.IfNoneMatch = cond.IfMatch, cond.IfNoneMatch
		return u.st.Put(ctx, snapshot.DataKey(file.Path), body.Open(), body.Size, o)
	}
	info, err := put(ctx, store.PutOptions{IfNoneMatch: sn.etag == "", IfMatch: sn.etag})
	if errors.Is(err, store.ErrPrecondition) {
		return u.resolve(ctx, body, file, sn, opts, put)
	}
	return info, nil, err
}

// dropJournal aborts the multipart upload of key this writer journaled, if
// any, and forgets it.
func (u *uploader) dropJournal(ctx context.Context, key string) {
	name := store.JournalName(key)
	j, err := u.loadJournal(name)
	if err != nil {
		return
	}
	if j.UploadID != "" {
		if err := u.mp.AbortMultipart(ctx, j.Key, j.UploadID); err != nil {
			u.log.Warn("cannot abort multipart upload", "key", j.Key, "err", err)
			return // abortStale retries at the next start
		}
	}
	_ = u.jr.Remove(name)
}

// multipart uploads a large file resumably: the journal in the state dir
// survives a SIGKILL, and the next attempt (or process) reuses the parts the
// server still has, as long as the file is the same one (size, mtime, hash).
func (u *uploader) multipart(ctx context.Context, f *os.File, file snapshot.File, opts, cond store.PutOptions) (store.ObjectInfo, error) {
	key := snapshot.DataKey(file.Path)
	name := store.JournalName(key)
	j, err := u.loadJournal(name)
	if err == nil && (j.Key != key || j.Size != file.Size || j.MTimeNS != file.MTime.UnixNano() || j.SHA256 != file.SHA256) {
		if j.UploadID != "" {
			if err := u.mp.AbortMultipart(ctx, j.Key, j.UploadID); err != nil {
				u.log.Warn("cannot abort outdated multipart upload", "key", j.Key, "err", err)
			}
		}
		j = nil
	}
	if j == nil {
		j = &store.MultipartJournal{Key: key, Size: file.Size, MTimeNS: file.MTime.UnixNano(), SHA256: file.SHA256}
	} else if j.UploadID != "" {
		// Killed between Complete and removing the journal: the object is
		// already there and the upload id is gone.
		if h, err := u.st.Head(ctx, key, store.HeadOptions{}); err == nil && h.Size == file.Size && h.Metadata[snapshot.MetaSHA256] == file.SHA256 {
			_ = u.jr.Remove(name)
			return h, nil
		}
		u.log.Info("resuming multipart upload", "path", file.Path, "parts_done", j.PartCount())
	}
	info, err := u.mp.UploadFileResumable(ctx, key, f, file.Size, j, store.MultipartOptions{
		PartSize: partSize, Concurrency: partConcurrency, Metadata: opts.Metadata, ContentType: opts.ContentType,
		IfNoneMatch: cond.IfNoneMatch, IfMatch: cond.IfMatch,
		Persist:  func(j *store.MultipartJournal) error { return u.saveJournal(name, j) },
		PartDone: func(int32) { u.m.parts.Inc() },
	})
	if err == nil {
		_ = u.jr.Remove(name)
	}
	return info, err
}

// The journals live in the state dir, by default inside SYNC_DIR where the
// app can write: they are read, written and removed relative to the journal
// directory's descriptor (u.jr), never by a path a link could redirect.
func (u *uploader) loadJournal(name string) (*store.MultipartJournal, error) {
	b, err := u.jr.ReadFile(name)
	if err != nil {
		return nil, err
	}
	return store.ParseJournal(b)
}

func (u *uploader) saveJournal(name string, j *store.MultipartJournal) error {
	b, err := j.Bytes()
	if err != nil {
		return err
	}
	return u.jr.WriteFile(name, b, 0o600)
}

// abortStale aborts multipart uploads under data/ that no journal of ours
// will resume (an earlier writer's leftovers, or a journal lost with the
// emptyDir), and the uploads of journals whose file is gone. On MinIO, whose
// listing of multipart uploads needs an exact key, leftovers without a journal
// stay until the bucket's lifecycle rule (AbortIncompleteMultipartUpload)
// removes them.
func (u *uploader) abortStale(ctx context.Context) error {
	keep := map[string]bool{}
	var names []string
	if d, err := u.jr.OpenDir("."); err == nil {
		names, _ = d.Readdirnames(-1)
		d.Close()
	}
	for _, name := range names {
		if !strings.HasSuffix(name, ".json") {
			continue
		}
		p := filepath.Join(u.journal, name)
		j, err := u.loadJournal(name)
		if err != nil {
			u.log.Warn("dropping unreadable multipart journal", "file", p, "err", err)
			u.jr.Remove(name)
			continue
		}
		rel := strings.TrimPrefix(j.Key, snapshot.DataDir)
		if _, err := u.root.Lstat(rel); err != nil {
			// Abort by the journal's own id: listing cannot be relied on to
			// find it (MinIO lists multipart uploads only by exact key).
			u.log.Info("aborting multipart upload of a file that is gone", "key", j.Key)
			if err := u.mp.AbortMultipart(ctx, j.Key, j.UploadID); err != nil {
				return err
			}
			u.jr.Remove(name)
			continue
		}
		keep[j.UploadID] = true
	}
	ups, err := u.mp.ListMultipartUploads(ctx, snapshot.DataDir)
	if err != nil {
		return err
	}
	for _, up := range ups {
		if keep[up.UploadID] {
			continue
		}
		u.log.Info("aborting stale multipart upload", "key", up.Key, "initiated", up.Initiated)
		if err := u.mp.AbortMultipart(ctx, up.Key, up.UploadID); err != nil {
			return err
		}
	}
	return nil
}
