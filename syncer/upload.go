package syncer

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"io/fs"
	"mime"
	"os"
	"path"
	"sync"
	"syscall"
	"time"

	"github.com/podkeeper/podkeeper/agents/backoff"
	"github.com/podkeeper/podkeeper/agents/events"
	"github.com/podkeeper/podkeeper/agents/snapshot"
	"github.com/podkeeper/podkeeper/agents/store"
)

var (
	fsErrNoSpace          error = syscall.ENOSPC
	fsErrTooManyInstances error = syscall.EMFILE
)

// copyBufs recycles hashing buffers: a backfill of small files would
// otherwise allocate one per file and keep the GC busy.
var copyBufs = sync.Pool{New: func() any { b := make([]byte, 64<<10); return &b }}

func (s *Syncer) worker(ctx context.Context) {
	for j := range s.jobs {
		r := s.upload(ctx, j.rel)
		r.gen = j.gen
		s.results <- r
	}
}

// upload sends one file. The file is hashed first (the hash travels as
// metadata), then streamed from disk; its stat is compared before and after,
// so content that changed meanwhile is reported as changed and uploaded again
// rather than recorded.
func (s *Syncer) upload(ctx context.Context, rel string) result {
	r := result{rel: rel}
	f, err := os.OpenFile(s.abs(rel), os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ELOOP) {
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
	if !fi.Mode().IsRegular() {
		r.gone = true
		return r
	}
	st := statOf(fi)
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
	opts := store.PutOptions{Metadata: file.Metadata(), ContentType: mime.TypeByExtension(path.Ext(rel))}
	key := snapshot.DataKey(rel)
	var info store.ObjectInfo
	err = backoff.Retry(ctx, backoff.Default, store.IsRetryable, func(attempt int, err error, wait time.Duration) {
		s.m.retries.Inc()
		if attempt == 0 || attempt%10 == 9 {
			s.log.Warn("upload failed, retrying", "path", rel, "err", err, "attempt", attempt+1, "wait", wait)
		}
		if attempt >= 2 {
			s.rec.Event(ctx, events.Warning, "UploadsFailing", "uploads are failing and being retried: "+err.Error())
		}
	}, func(ctx context.Context) error {
		var err error
		if s.s3 != nil && st.size >= s.opts.MultipartThreshold {
			info, err = s.multipart(ctx, f, file, opts)
		} else {
			info, err = s.st.Put(ctx, key, io.NewSectionReader(f, 0, st.size), st.size, opts)
		}
		return err
	})
	if err != nil {
		r.err = err
		return r
	}
	r.bytesSent = st.size
	after, err := os.Lstat(s.abs(rel))
	switch {
	case err != nil:
		r.gone = true
		return r
	case !statOf(after).same(st):
		r.changed, r.stat = true, statOf(after)
		return r
	}
	file.ETag, file.VersionID = info.ETag, info.VersionID
	r.file = file
	return r
}

// multipart uploads a large file resumably: the journal in the state dir
// survives a SIGKILL, and the next attempt (or process) reuses the parts the
// server still has, as long as the file is the same one (size, mtime, hash).
func (s *Syncer) multipart(ctx context.Context, f *os.File, file snapshot.File, opts store.PutOptions) (store.ObjectInfo, error) {
	key := snapshot.DataKey(file.Path)
	jp := store.JournalPath(s.journal, key)
	j, err := store.LoadJournal(jp)
	if err == nil && (j.Key != key || j.Size != file.Size || j.MTimeNS != file.MTime.UnixNano() || j.SHA256 != file.SHA256) {
		if j.UploadID != "" {
			if err := s.s3.AbortMultipart(ctx, j.Key, j.UploadID); err != nil {
				s.log.Warn("cannot abort outdated multipart upload", "key", j.Key, "err", err)
			}
		}
		j = nil
	}
	if j == nil {
		j = &store.MultipartJournal{Key: key, Size: file.Size, MTimeNS: file.MTime.UnixNano(), SHA256: file.SHA256}
	} else if j.UploadID != "" {
		// Killed between Complete and removing the journal: the object is
		// already there and the upload id is gone.
		if h, err := s.st.Head(ctx, key, store.HeadOptions{}); err == nil && h.Size == file.Size && h.Metadata[snapshot.MetaSHA256] == file.SHA256 {
			_ = os.Remove(jp)
			return h, nil
		}
		s.log.Info("resuming multipart upload", "path", file.Path, "parts_done", j.PartCount())
	}
	info, err := s.s3.UploadFileResumable(ctx, key, f, file.Size, j, store.MultipartOptions{
		PartSize: s.opts.PartSize, Concurrency: s.opts.PartConcurrency, Metadata: opts.Metadata, ContentType: opts.ContentType,
		Persist:  func(j *store.MultipartJournal) error { return j.Save(jp) },
		PartDone: func(int32) { s.m.parts.Inc() },
	})
	if err == nil {
		_ = os.Remove(jp)
	}
	return info, err
}
