package pack

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/podkeeper/podkeeper/agents/backoff"
	"github.com/podkeeper/podkeeper/agents/codec"
	"github.com/podkeeper/podkeeper/agents/snapshot"
	"github.com/podkeeper/podkeeper/agents/store"
)

// Defaults of Options.
const (
	// DefaultMaxFileSize: at 20 ms a round trip costs what 256 KiB take on a
	// 100 MB/s connection; larger files gain little from sharing a GET.
	DefaultMaxFileSize = 256 << 10
	DefaultPackSize    = 8 << 20
	DefaultMaxRunBytes = 256 << 20
	DefaultMinFiles    = 32
	DefaultConcurrency = 32
	// sparseShare: a pack less than half of whose entries are still live is
	// rewritten, so what a restore downloads from packs is mostly useful.
	sparseShare = 0.5
	// orphanAge: a pack object without an index older than this is left by
	// a writer that died between its two Puts.
	orphanAge = time.Hour
	// catalogEntryCost is what one entry of the catalog costs in memory
	// beside its path (map slot, string header, sha256, pack number).
	catalogEntryCost = 96
)

// Options tune Update; zero values take the defaults.
type Options struct {
	MaxFileSize int64 // files of 1..MaxFileSize bytes are packed
	PackSize    int64 // content bytes per pack
	MaxRunBytes int64 // content packed per run; the rest waits for the next run
	MinFiles    int   // fewer files to pack than this are left to per-file GETs
	Concurrency int   // data GETs at a time
	// BudgetBytes bounds the catalog (every packed path) in memory; a prefix
	// over it is not packed (snapshot.BudgetBytes by default).
	BudgetBytes int64
	Log         *slog.Logger
	Now         func() time.Time
}

func (o *Options) defaults() {
	def := func(v *int64, d int64) {
		if *v <= 0 {
			*v = d
		}
	}
	def(&o.MaxFileSize, DefaultMaxFileSize)
	def(&o.PackSize, DefaultPackSize)
	def(&o.MaxRunBytes, DefaultMaxRunBytes)
	def(&o.BudgetBytes, snapshot.BudgetBytes())
	o.MaxFileSize = min(o.MaxFileSize, MaxFileSize)
	if o.MinFiles <= 0 {
		o.MinFiles = DefaultMinFiles
	}
	if o.Concurrency <= 0 {
		o.Concurrency = DefaultConcurrency
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.Now == nil {
		o.Now = time.Now
	}
}

func (o *Options) packable(f snapshot.File) bool { return f.Size > 0 && f.Size <= o.MaxFileSize }

// Report says what one Update did.
type Report struct {
	Packs    int   // packs written
	Files    int   // files written into them
	Bytes    int64 // their content
	Deleted  int   // packs deleted: sparse, without a live entry, or orphaned
	Covered  int   // small files of the snapshot found in a pack before the run
	Unpacked int   // small files of the snapshot in no pack after the run
}

// Files hands a snapshot's files to fn; Update calls it twice.
type Files func(fn func(snapshot.File) error) error

// ErrBudget marks a prefix whose packs list more files than the catalog may
// hold in this process's memory.
var ErrBudget = errors.New("pack catalog over the memory budget")

// Update brings the packs of st in line with a snapshot's files: files of
// 1..MaxFileSize bytes that no pack holds in the snapshot's version are
// fetched from their data objects (checked against size and sha256) and
// written into new packs; packs with less than half of their entries live
// are rewritten, packs with none and orphaned pack objects deleted. One run
// packs at most MaxRunBytes; the next run goes on.
func Update(ctx context.Context, st store.Store, files Files, o Options) (Report, error) {
	o.defaults()
	var rep Report
	infos, err := List(ctx, st)
	if err != nil {
		return rep, err
	}
	cat, err := loadCatalog(ctx, st, infos, o)
	if err != nil {
		return rep, err
	}
	uncovered := 0
	err = files(func(f snapshot.File) error {
		if !o.packable(f) {
			return nil
		}
		if p, ok := cat.match(f); ok {
			cat.packs[p].live++
			rep.Covered++
		} else {
			uncovered++
		}
		return nil
	})
	if err != nil {
		return rep, err
	}
	repack, dead := cat.sparse()
	work, complete, err := collect(files, cat, repack, o)
	if err != nil {
		return rep, err
	}
	if len(work) < o.MinFiles {
		// Too few to be worth a pack; the sparse packs go, their few live
		// files are fetched one by one.
		work, complete = nil, true
	}
	newly := 0
	isNew := func(f snapshot.File) {
		if _, ok := cat.match(f); !ok {
			newly++
		}
	}
	if err := write(ctx, st, work, o, &rep, isNew); err != nil {
		return rep, err
	}
	if complete {
		dead = append(dead, repack...)
	}
	for _, p := range dead {
		if err := Delete(ctx, st, cat.packs[p].id); err != nil {
			return rep, fmt.Errorf("delete pack %s: %w", cat.packs[p].id, err)
		}
		rep.Deleted++
	}
	n, err := deleteOrphans(ctx, st, infos, o.Now())
	rep.Deleted += n
	rep.Unpacked = uncovered - newly
	return rep, err
}

// catalog is every pack's entries by path: the newest pack's when a path is
// in several (the older entry then counts as not live).
type catalog struct {
	byPath map[string]slot
	packs  []packState
}

type slot struct {
	sha  [32]byte
	pack int32
}

type packState struct {
	id          string
	total, live int
}

func loadCatalog(ctx context.Context, st store.Store, infos []Info, o Options) (*catalog, error) {
	var ids []string
	for _, in := range infos {
		if in.Indexed {
			ids = append(ids, in.ID)
		}
	}
	type kv struct {
		path string
		sha  [32]byte
	}
	entries := make([][]kv, len(ids))
	unreadable := make([]bool, len(ids))
	var cost int64
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(8)
	for i, id := range ids {
		g.Go(func() error {
			_, err := ReadIndex(gctx, st, id, func(e Entry) error {
				var s [32]byte
				hex.Decode(s[:], []byte(e.SHA256))
				entries[i] = append(entries[i], kv{e.Path, s})
				return nil
			})
			var ie *InvalidError
			if errors.Is(err, store.ErrNotExist) || errors.As(err, &ie) {
				// Deleted meanwhile, or not a format this version reads
				// (a newer writer's): left alone, not counted.
				o.Log.Warn("pack index skipped", "pack", id, "err", err)
				entries[i], unreadable[i] = nil, true
				return nil
			}
			return err
		})
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}
	c := &catalog{byPath: map[string]slot{}}
	for i, id := range ids {
		if unreadable[i] {
			continue
		}
		c.packs = append(c.packs, packState{id: id, total: len(entries[i])})
		for _, e := range entries[i] {
			if cost += int64(len(e.path)) + catalogEntryCost; cost > o.BudgetBytes {
				return nil, fmt.Errorf("%w: more than %d bytes of entries (GOMEMLIMIT sets the budget)", ErrBudget, o.BudgetBytes)
			}
			c.byPath[e.path] = slot{sha: e.sha, pack: int32(len(c.packs) - 1)}
		}
		entries[i] = nil
	}
	return c, nil
}

// match returns the pack holding f's content, if any.
func (c *catalog) match(f snapshot.File) (int, bool) {
	s, ok := c.byPath[f.Path]
	if !ok {
		return 0, false
	}
	var want [32]byte
	if _, err := hex.Decode(want[:], []byte(f.SHA256)); err != nil || want != s.sha {
		return 0, false
	}
	return int(s.pack), true
}

// sparse returns the packs to rewrite (some live entries, under half) and
// those without any live entry.
func (c *catalog) sparse() (repack, dead []int) {
	for i, p := range c.packs {
		switch {
		case p.live == 0:
			dead = append(dead, i)
		case float64(p.live) < sparseShare*float64(p.total):
			repack = append(repack, i)
		}
	}
	return repack, dead
}

// collect returns the files to write this run: those in no pack and the live
// ones of the packs to rewrite, up to MaxRunBytes; complete says all fit.
func collect(files Files, cat *catalog, repack []int, o Options) (work []snapshot.File, complete bool, err error) {
	again := map[int]bool{}
	for _, p := range repack {
		again[p] = true
	}
	var bytes int64
	complete = true
	err = files(func(f snapshot.File) error {
		if !o.packable(f) {
			return nil
		}
		if p, ok := cat.match(f); ok && !again[p] {
			return nil
		}
		if bytes+f.Size > o.MaxRunBytes {
			complete = false
			return nil
		}
		bytes += f.Size
		work = append(work, f)
		return nil
	})
	return work, complete, err
}

// write fetches work in packs of PackSize and uploads each; written sees
// every file that went into an uploaded pack.
func write(ctx context.Context, st store.Store, work []snapshot.File, o Options, rep *Report, written func(snapshot.File)) error {
	var b Builder
	for len(work) > 0 {
		n, size := 0, int64(0)
		for n < len(work) && (n == 0 || size+work[n].Size <= o.PackSize) {
			size += work[n].Size
			n++
		}
		chunk := work[:n]
		work = work[n:]
		bodies := make([][]byte, len(chunk))
		g, gctx := errgroup.WithContext(ctx)
		g.SetLimit(o.Concurrency)
		for i, f := range chunk {
			g.Go(func() error {
				var err error
				bodies[i], err = fetchChecked(gctx, st, f, o.Log)
				return err
			})
		}
		if err := g.Wait(); err != nil {
			return err
		}
		b.Reset()
		for i, f := range chunk {
			if bodies[i] != nil {
				b.Add(f.Path, f.SHA256, bodies[i])
			}
		}
		if b.Len() == 0 {
			continue
		}
		id, err := b.Upload(ctx, st, o.Now())
		if err != nil {
			return fmt.Errorf("upload pack: %w", err)
		}
		o.Log.Debug("pack written", "pack", id, "files", b.Len(), "bytes", b.Size())
		rep.Packs++
		rep.Files += b.Len()
		rep.Bytes += b.Size()
		for i, f := range chunk {
			if bodies[i] != nil {
				written(f)
			}
		}
	}
	return nil
}

// fetchChecked downloads f's content (decoded), retrying transient errors;
// nil without an error when the object is gone or no longer f's version:
// the snapshot moved on, and that file is left out of the pack.
func fetchChecked(ctx context.Context, st store.Store, f snapshot.File, log *slog.Logger) ([]byte, error) {
	var body []byte
	err := backoff.Retry(ctx, backoff.Default, store.IsRetryable, nil, func(ctx context.Context) error {
		var err error
		body, err = fetchOnce(ctx, st, f)
		return err
	})
	var ce changedError
	if errors.Is(err, store.ErrNotExist) || errors.As(err, &ce) {
		log.Debug("file left out of the pack", "path", f.Path, "why", err)
		return nil, nil
	}
	return body, err
}

type changedError struct{ reason string }

func (e changedError) Error() string { return e.reason }

func fetchOnce(ctx context.Context, st store.Store, f snapshot.File) ([]byte, error) {
	key := snapshot.DataKey(f.Path)
	rc, info, err := st.Get(ctx, key, store.GetOptions{VersionID: f.VersionID})
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	if got := info.Metadata[snapshot.MetaEncoding]; info.Metadata != nil && got != f.Encoding {
		return nil, changedError{"stored with another encoding"}
	}
	dec, err := codec.DecodeSized(f.Encoding, rc, f.Size)
	if err != nil {
		return nil, changedError{err.Error()}
	}
	defer dec.Close()
	b, err := io.ReadAll(io.LimitReader(dec, f.Size+1))
	var ie *codec.InvalidError
	switch {
	case errors.As(err, &ie):
		return nil, changedError{err.Error()}
	case err != nil:
		return nil, &store.Error{Op: "get", Key: key, Err: err, Retryable: true}
	}
	if sum := sha256.Sum256(b); int64(len(b)) != f.Size || hex.EncodeToString(sum[:]) != f.SHA256 {
		return nil, changedError{fmt.Sprintf("%d bytes with another sha256 than the snapshot's %d", len(b), f.Size)}
	}
	return b, nil
}

// deleteOrphans deletes pack objects whose index never came.
func deleteOrphans(ctx context.Context, st store.Store, infos []Info, now time.Time) (int, error) {
	n := 0
	for _, in := range infos {
		if in.Packed && !in.Indexed && now.Sub(in.Modified) > orphanAge {
			if err := st.Delete(ctx, Key(in.ID)); err != nil {
				return n, fmt.Errorf("delete orphaned pack %s: %w", in.ID, err)
			}
			n++
		}
	}
	return n, nil
}
