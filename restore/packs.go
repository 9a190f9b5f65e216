package restore

import (
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/podkeeper/podkeeper/agents/adaptive"
	"github.com/podkeeper/podkeeper/agents/backoff"
	"github.com/podkeeper/podkeeper/agents/pack"
	"github.com/podkeeper/podkeeper/agents/snapshot"
	"github.com/podkeeper/podkeeper/agents/store"
)

// Reading small files from packs (agents/pack): one ranged GET brings a run
// of files that lie next to each other in a pack, instead of one GET each.
// A pack is only an accelerator: an entry is used when its path, size and
// sha256 are the snapshot's, every file read is checked against that sha256
// whatever RESTORE_VERIFY says, and a file a pack cannot give (gone, stale,
// damaged) is fetched from data/ like any other.
const (
	// minPackedFiles: below this many small files the pack listing is not
	// worth its round trips.
	minPackedFiles = 16
	// runBytes bounds one ranged GET: big enough that a round trip is small
	// beside the transfer, small enough that a few dozen runs keep the
	// downloads parallel.
	runBytes = 1 << 20
	// maxGap is the most bytes of other entries a run reads and drops
	// rather than start another GET.
	maxGap = 64 << 10
	// indexReads is how many pack indexes are read at a time.
	indexReads = 16
	// runAttempts bounds the tries of one run: a pack shorter than its
	// index says looks like a body cut short, which is transient for a
	// data object but not here. After that the files come from data/, whose
	// GETs retry through an outage for as long as it lasts.
	runAttempts = 4
)

// packRun is one ranged GET of a pack: bytes start..end, holding files.
type packRun struct {
	id         string
	start, end int64
	files      []packed // in offset order
}

type packed struct {
	i   int32 // position in the snapshot's index
	off int64
}

// errPackMismatch marks a pack entry whose bytes are not the snapshot's.
var errPackMismatch = errors.New("pack entry does not hold the snapshot's content")

// packRuns finds the files of small (positions in p.files) that packs hold
// and groups them into runs; rest are the others. Any trouble reading the
// packs' indexes only costs speed: the files are then fetched one by one.
func (r *Restorer) packRuns(ctx context.Context, files *snapshot.Index, small []int32) (runs []packRun, rest []int32) {
	want := make([]bool, files.Len())
	for _, i := range small {
		want[i] = true
	}
	infos, err := pack.List(ctx, r.st)
	if err != nil {
		r.log.Warn("cannot list packs; fetching every file on its own", "err", err)
		return nil, small
	}
	var ids []string
	for _, in := range infos {
		if in.Indexed {
			ids = append(ids, in.ID)
		}
	}
	found := make([][]packed, len(ids))
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(indexReads)
	for k, id := range ids {
		g.Go(func() error {
			_, err := pack.ReadIndex(gctx, r.st, id, func(e pack.Entry) error {
				i, ok := files.Find(e.Path)
				if !ok || !want[i] || files.Size(i) != e.Size {
					return nil
				}
				if sum := files.SHA256(i); hex.EncodeToString(sum[:]) != e.SHA256 {
					return nil
				}
				found[k] = append(found[k], packed{i: int32(i), off: e.Offset})
				return nil
			})
			if err != nil && ctx.Err() == nil {
				r.log.Warn("pack index unreadable; its files are fetched on their own", "pack", id, "err", err)
				found[k] = nil
			}
			return nil
		})
	}
	g.Wait()
	if ctx.Err() != nil {
		return nil, small
	}
	// A file in several packs (a pack being rewritten) is taken from the
	// newest; ids sort by age.
	taken := make([]bool, files.Len())
	npacked := 0
	for k := len(ids) - 1; k >= 0; k-- {
		var mine []packed
		for _, pf := range found[k] {
			if !taken[pf.i] {
				taken[pf.i] = true
				mine = append(mine, pf)
			}
		}
		npacked += len(mine)
		runs = append(runs, splitRuns(ids[k], mine, files)...)
	}
	for _, i := range small {
		if !taken[i] {
			rest = append(rest, i)
		}
	}
	r.log.Debug("packs", "packs", len(ids), "files_in_packs", npacked, "runs", len(runs), "files_alone", len(rest))
	return runs, rest
}

// splitRuns cuts the files of one pack (offset order) into runs of at most
// runBytes, starting a new run at a gap larger than maxGap.
func splitRuns(id string, fs []packed, files *snapshot.Index) []packRun {
	var runs []packRun
	for _, pf := range fs {
		end := pf.off + files.Size(int(pf.i))
		if n := len(runs); n > 0 && pf.off-runs[n-1].end <= maxGap && end-runs[n-1].start <= runBytes {
			runs[n-1].end = end
			runs[n-1].files = append(runs[n-1].files, pf)
			continue
		}
		runs = append(runs, packRun{id: id, start: pf.off, end: end, files: []packed{pf}})
	}
	return runs
}

// fetchRuns downloads the runs, as many at a time as lim allows, and returns
// the files they could not give.
func (r *Restorer) fetchRuns(ctx context.Context, lim *adaptive.Limiter, t *tree, tmp int, files *snapshot.Index, runs []packRun) ([]int32, error) {
	var mu sync.Mutex
	var fallback []int32
	err := r.each(ctx, lim, len(runs), func(ctx context.Context, k int) error {
		fb, err := r.fetchRun(ctx, t, tmp, files, runs[k])
		mu.Lock()
		fallback = append(fallback, fb...)
		mu.Unlock()
		return err
	})
	return fallback, err
}

// fetchRun reads one run with a ranged GET, placing each file as it comes.
// A transient failure resumes at the first file not yet placed; a pack that
// is gone or refuses the range leaves the remaining files to the caller.
func (r *Restorer) fetchRun(ctx context.Context, t *tree, tmp int, files *snapshot.Index, run packRun) (fallback []int32, err error) {
	pending := run.files
	key := pack.Key(run.id)
	attempts := 0
	err = backoff.Retry(ctx, backoff.Default, store.IsRetryable, r.onRetry(ctx, key), func(ctx context.Context) error {
		if attempts++; attempts > runAttempts {
			return &store.Error{Op: "get", Key: key, Err: fmt.Errorf("gave up after %d attempts", runAttempts)}
		}
		start := pending[0].off
		rc, _, err := r.st.Get(ctx, key, store.GetOptions{Offset: start, Length: run.end - start})
		if err != nil {
			return err
		}
		defer rc.Close()
		pos := start
		for len(pending) > 0 {
			pf := pending[0]
			if gap := pf.off - pos; gap > 0 {
				if _, err := io.CopyN(io.Discard, rc, gap); err != nil {
					return retryableRead("get", key, err)
				}
			}
			f := files.At(int(pf.i))
			err := r.placePacked(t, tmp, rc, key, f)
			if errors.Is(err, errPackMismatch) {
				r.log.Warn("pack entry does not match the snapshot; fetching the file on its own", "pack", run.id, "path", f.Path)
				fallback = append(fallback, pf.i)
			} else if err != nil {
				return err
			}
			pos = pf.off + f.Size
			pending = pending[1:]
		}
		return nil
	})
	var se *store.Error
	if err != nil && ctx.Err() == nil && errors.As(err, &se) && !se.Retryable {
		r.log.Warn("pack unreadable; fetching its files on their own", "pack", run.id, "files", len(pending), "err", err)
		for _, pf := range pending {
			fallback = append(fallback, pf.i)
		}
		return fallback, nil
	}
	return fallback, err
}

// placePacked reads f's bytes from body into a temp file, checks them
// against the snapshot's sha256 and installs the file.
func (r *Restorer) placePacked(t *tree, tmp int, body io.Reader, key string, f snapshot.File) error {
	file, name, err := createTemp(tmp)
	if err != nil {
		return fmt.Errorf("create temp file for %q: %w", f.Path, err)
	}
	h := sha256.New()
	bp := smallBufPool.Get().(*[]byte)
	n, err := copyCounted(io.MultiWriter(file, h), io.LimitReader(body, f.Size), *bp, &r.prog)
	smallBufPool.Put(bp)
	if err == nil && n < f.Size {
		r.prog.bytes.Add(-n)
		err = retryableRead("get", key, fmt.Errorf("range ended %d bytes into %q", n, f.Path))
	} else if err == nil && hex.EncodeToString(h.Sum(nil)) != f.SHA256 {
		r.prog.bytes.Add(-n)
		err = errPackMismatch
	}
	if err != nil {
		discard(tmp, file, name)
		return err
	}
	return r.install(t, tmp, file, name, f)
}

// onRetry logs a transient failure and tells the limiter about throttling.
func (r *Restorer) onRetry(ctx context.Context, what string) func(int, error, time.Duration) {
	return func(attempt int, err error, wait time.Duration) {
		r.log.Warn("download failed, retrying", "object", what, "attempt", attempt+1, "wait", wait.Round(time.Millisecond), "err", err)
		if lim, ok := ctx.Value(limiterKey{}).(*adaptive.Limiter); ok && adaptive.IsThrottle(err) {
			lim.Throttled(time.Now())
		}
	}
}

// each runs fn(0..n-1), as many at a time as lim allows; the first failure
// cancels the others.
func (r *Restorer) each(ctx context.Context, lim *adaptive.Limiter, n int, fn func(context.Context, int) error) error {
	g, gctx := errgroup.WithContext(ctx)
	for k := range n {
		if lim.Acquire(gctx) != nil {
			break
		}
		g.Go(func() error {
			defer lim.Release()
			if err := fn(gctx, k); err != nil {
				return err
			}
			lim.Done(time.Now())
			return nil
		})
	}
	return g.Wait()
}

// largestFirst orders small files so the tail is the quickest files, not one
// big one alone on the wire.
func largestFirst(files *snapshot.Index, s []int32) {
	slices.SortStableFunc(s, func(a, b int32) int { return cmp.Compare(files.Size(int(b)), files.Size(int(a))) })
}
