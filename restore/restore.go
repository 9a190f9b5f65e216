package restore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/podkeeper/podkeeper/agents/config"
	"github.com/podkeeper/podkeeper/agents/events"
	"github.com/podkeeper/podkeeper/agents/lifecycle"
	"github.com/podkeeper/podkeeper/agents/safefs"
	"github.com/podkeeper/podkeeper/agents/snapshot"
	"github.com/podkeeper/podkeeper/agents/store"
)

// Durability is how restored data is made durable before restored.json.
type Durability int

const (
	// SyncFS flushes the whole filesystem once at the end (syncfs(2)): one
	// call instead of two fsyncs per file; see docs/benchmarks.md for numbers.
	SyncFS Durability = iota
	// FsyncEach fsyncs every file before its rename and every directory touched.
	FsyncEach
)

// Names inside the state dir.
const (
	TmpDirName   = "restore-tmp"
	ResultName   = "restored.json"
	tmpSuffix    = ".part"
	defaultPart  = 8 << 20
	defaultRange = 16 << 20
)

// Restorer restores one directory from one store.
type Restorer struct {
	// Durability is how the restored data is made durable (default SyncFS);
	// the benchmarks compare both.
	Durability Durability

	cfg    *Config
	st     store.Store
	log    *slog.Logger
	events events.Recorder
	// progressEvery is the interval of progress log lines.
	progressEvery time.Duration
	// Files of rangeThreshold bytes or more are fetched in parallel ranges of
	// partSize bytes.
	partSize, rangeThreshold int64
	prog                     progress
}

// New returns a Restorer of cfg's directory from deps.Store. cfg must have
// passed config.Load.
func New(cfg *Config, deps lifecycle.Deps) *Restorer {
	log := deps.Log
	if log == nil {
		log = slog.Default()
	}
	ev := deps.Events
	if ev == nil {
		ev = events.Log{L: log}
	}
	return &Restorer{cfg: cfg, st: deps.Store, log: log, events: ev,
		progressEvery: 2 * time.Second, partSize: defaultPart, rangeThreshold: defaultRange}
}

// Result is what a run did; it is also the content of restored.json.
type Result struct {
	Snapshot     string        `json:"snapshot"`
	Created      time.Time     `json:"created"`
	Files        int           `json:"files"`
	Bytes        int64         `json:"bytes"`
	Fetched      int           `json:"fetched"`
	FetchedBytes int64         `json:"fetched_bytes"`
	Skipped      int           `json:"skipped"`
	Fixed        int           `json:"fixed_metadata"`
	Removed      int           `json:"removed"`
	Duration     time.Duration `json:"-"`
	DurationText string        `json:"duration"`
	Finished     time.Time     `json:"finished"`
	// Outcome is "restored", "no-snapshot" or "not-empty" (skip-if-not-empty).
	Outcome string `json:"outcome"`
}

// ErrNotEmpty is returned under RESTORE_MODE=fail-if-not-empty.
var ErrNotEmpty = errors.New("RESTORE_DIR is not empty and RESTORE_MODE=fail-if-not-empty")

// Run restores and reports the outcome through the log and an event.
func (r *Restorer) Run(ctx context.Context) (*Result, error) {
	start := time.Now()
	res, err := r.run(ctx, start)
	if err != nil {
		r.events.Event(ctx, events.Warning, "RestoreFailed", err.Error())
		return res, err
	}
	switch res.Outcome {
	case "restored":
		r.events.Event(ctx, events.Normal, "Restored", fmt.Sprintf("snapshot %s: %d files, %d bytes (%d files, %d bytes fetched) in %s",
			res.Snapshot, res.Files, res.Bytes, res.Fetched, res.FetchedBytes, res.Duration.Round(time.Millisecond)))
	case "no-snapshot":
		r.events.Event(ctx, events.Normal, "NothingToRestore", "no snapshot in "+r.st.String()+"; starting empty (RESTORE_IF_MISSING=empty)")
	case "not-empty":
		r.events.Event(ctx, events.Normal, "RestoreSkipped", "RESTORE_DIR is not empty (RESTORE_MODE=skip-if-not-empty)")
	}
	return res, nil
}

// probeWritable checks that dir takes new files, before anything is
// fetched: an emptyDir owned by another user fails with a clear error, not
// midway with a bare "permission denied". The probe is an unnamed O_TMPFILE,
// so neither the app nor the syncer ever sees it; a filesystem without
// O_TMPFILE is not probed (a refusal then shows when a file is placed).
func probeWritable(dir int) error {
	fd, err := unix.Openat(dir, ".", unix.O_TMPFILE|unix.O_WRONLY|unix.O_CLOEXEC, 0o600)
	if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EISDIR) || errors.Is(err, unix.EINVAL) {
		return nil
	}
	if err != nil {
		return err
	}
	return unix.Close(fd)
}

func (r *Restorer) run(ctx context.Context, start time.Time) (*Result, error) {
	cfg := r.cfg
	if r.st == nil {
		return nil, errors.New("restore: no store in Deps")
	}
	if err := os.MkdirAll(cfg.Dir, 0o755); err != nil {
		return nil, fmt.Errorf("RESTORE_DIR: %w", err)
	}
	t, err := openTree(cfg.Dir)
	if err != nil {
		return nil, fmt.Errorf("RESTORE_DIR: %w", err)
	}
	defer t.Close()
	stateRel := cfg.stateRel()
	if res, err := r.skipNotEmpty(t, stateRel, start); res != nil || err != nil {
		return res, err
	}
	if err := probeWritable(t.root); err != nil {
		if config.IsNotWritable(err) {
			return nil, config.NotWritable("RESTORE_DIR", cfg.Dir, err)
		}
		return nil, fmt.Errorf("RESTORE_DIR: %w", err)
	}
	m, err := r.manifest(ctx, stateRel)
	if err != nil {
		return nil, err
	}
	if m == nil {
		return &Result{Outcome: "no-snapshot", Duration: time.Since(start)}, nil
	}
	state, err := r.openState(t, stateRel)
	if err != nil {
		return nil, err
	}
	defer unix.Close(state.dir)
	defer unix.Close(state.tmp)
	p, err := r.plan(t, m, stateRel)
	if err != nil {
		return nil, err
	}
	r.log.Info("plan", "snapshot", m.ID, "created", m.Created, "files", m.Files.Len(),
		"fetch_files", len(p.fetch), "fetch_bytes", p.fetchBytes, "skip_files", p.skip, "skip_bytes", p.skipBytes,
		"fix_metadata", len(p.fix), "remove", len(p.remove))
	if err := checkSpace(t.root, p.fetchBytes); err != nil {
		return nil, err
	}
	syncTime, err := r.apply(ctx, t, state, p)
	if err != nil {
		return nil, err
	}
	return r.finish(state, m, p, start, syncTime)
}

// skipNotEmpty applies RESTORE_MODE=skip-if-not-empty and fail-if-not-empty:
// a result or an error when the directory holds anything but the state dir.
func (r *Restorer) skipNotEmpty(t *tree, stateRel string, start time.Time) (*Result, error) {
	cfg := r.cfg
	if cfg.Mode != ModeSkipIfNotEmpty && cfg.Mode != ModeFailIfNotEmpty {
		return nil, nil
	}
	name, err := firstEntry(t, stateRel)
	if err != nil || name == "" {
		return nil, err
	}
	if cfg.Mode == ModeFailIfNotEmpty {
		return nil, fmt.Errorf("%w (found %q)", ErrNotEmpty, name)
	}
	r.log.Info("RESTORE_DIR is not empty, nothing restored (RESTORE_MODE=skip-if-not-empty)", "dir", cfg.Dir, "found", name)
	return &Result{Outcome: "not-empty", Duration: time.Since(start)}, nil
}

// manifest finds and loads the snapshot to restore; nil without an error
// means there is none and RESTORE_IF_MISSING=empty allows that.
func (r *Restorer) manifest(ctx context.Context, stateRel string) (*snapshot.Compact, error) {
	cfg := r.cfg
	m, err := Resolve(ctx, r.st, cfg.Snapshot)
	if errors.Is(err, snapshot.ErrNoSnapshot) {
		if cfg.IfMissing == IfMissingEmpty {
			r.log.Info("no snapshot to restore; starting empty (RESTORE_IF_MISSING=empty)", "store", r.st.String(), "snapshot", cfg.Snapshot, "why", err.Error())
			return nil, nil
		}
		return nil, fmt.Errorf("RESTORE_IF_MISSING=fail: %w in %s (RESTORE_SNAPSHOT=%s)", err, r.st, cfg.Snapshot)
	}
	if err != nil {
		return nil, fmt.Errorf("find snapshot: %w", err)
	}
	if stateRel != "" {
		// Paths are sorted: the state dir's would start where stateRel would be.
		for i, _ := m.Files.Find(stateRel); i < m.Files.Len(); i++ {
			p := m.Files.Path(i)
			if p == stateRel || strings.HasPrefix(p, stateRel+"/") {
				return nil, fmt.Errorf("refusing snapshot %s: file %q lies in the state directory %s", m.ID, p, cfg.StateDir)
			}
			if !strings.HasPrefix(p, stateRel) {
				break
			}
		}
	}
	return m, nil
}

// apply changes the directory to match the plan and makes it durable; it
// returns how long making it durable took.
func (r *Restorer) apply(ctx context.Context, t *tree, state stateDirs, p *plan) (time.Duration, error) {
	// From here on the directory changes: restored.json must not claim a
	// snapshot that is only half there.
	if err := unlinkIgnoreMissing(state.dir, ResultName); err != nil {
		return 0, fmt.Errorf("state dir: %w", err)
	}
	for _, rm := range p.remove {
		if err := t.remove(rm.path, rm.dir); err != nil {
			return 0, err
		}
	}
	for _, i := range p.fix {
		f := p.files.At(int(i))
		if err := t.setMeta(f.Path, os.FileMode(f.Mode), f.MTime); err != nil {
			return 0, err
		}
	}
	if err := r.fetchAll(ctx, t, state.tmp, p); err != nil {
		return 0, err
	}
	fetched := time.Now()
	if err := r.makeDurable(t, state.tmp); err != nil {
		return 0, err
	}
	return time.Since(fetched), nil
}

// finish writes restored.json and logs the outcome.
func (r *Restorer) finish(state stateDirs, m *snapshot.Compact, p *plan, start time.Time, syncTime time.Duration) (*Result, error) {
	var total int64
	for i := range m.Files.Len() {
		total += m.Files.Size(i)
	}
	res := &Result{Snapshot: m.ID, Created: m.Created, Files: m.Files.Len(), Bytes: total, Fetched: len(p.fetch),
		FetchedBytes: p.fetchBytes, Skipped: p.skip, Fixed: len(p.fix), Removed: len(p.remove), Outcome: "restored"}
	res.Finished = time.Now().UTC()
	res.Duration = time.Since(start)
	res.DurationText = res.Duration.Round(time.Millisecond).String()
	if err := writeResult(state.dir, res); err != nil {
		return nil, err
	}
	r.log.Info("restored", "snapshot", m.ID, "files", res.Files, "bytes", res.Bytes, "fetched_files", res.Fetched,
		"fetched_bytes", res.FetchedBytes, "skipped", res.Skipped, "fixed_metadata", res.Fixed, "removed", res.Removed,
		"duration", res.DurationText, "sync", syncTime.Round(time.Millisecond).String(), "rate_mb_s", rate(res.FetchedBytes, res.Duration))
	return res, nil
}

type stateDirs struct{ dir, tmp int }

// openState opens the state dir and its temp subdir (created when missing)
// and clears temp files a crashed run left behind.
func (r *Restorer) openState(t *tree, stateRel string) (stateDirs, error) {
	var dir int
	if stateRel != "" {
		fd, release, err := t.dir(stateRel, stateRel, true)
		if err != nil {
			return stateDirs{}, fmt.Errorf("state dir %s: %w", r.cfg.StateDir, err)
		}
		// Dup so the tree's cache and this handle close independently.
		dir, err = unix.Dup(fd)
		release()
		if err != nil {
			return stateDirs{}, err
		}
	} else {
		if err := os.MkdirAll(r.cfg.StateDir, 0o755); err != nil {
			return stateDirs{}, fmt.Errorf("RESTORE_STATE_DIR: %w", err)
		}
		fd, err := unix.Open(r.cfg.StateDir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if err != nil {
			return stateDirs{}, fmt.Errorf("RESTORE_STATE_DIR %s: %w", r.cfg.StateDir, err)
		}
		var a, b unix.Stat_t
		if unix.Fstat(fd, &a) == nil && unix.Fstat(t.root, &b) == nil && a.Dev != b.Dev {
			unix.Close(fd)
			return stateDirs{}, fmt.Errorf("RESTORE_STATE_DIR %s is on another filesystem than RESTORE_DIR %s; temp files must be renamed into place atomically", r.cfg.StateDir, r.cfg.Dir)
		}
		dir = fd
	}
	tmp, err := openDirAt(dir, TmpDirName)
	if errors.Is(err, unix.ENOENT) {
		if err = unix.Mkdirat(dir, TmpDirName, 0o700); err == nil || errors.Is(err, unix.EEXIST) {
			tmp, err = openDirAt(dir, TmpDirName)
		}
	}
	if err != nil {
		unix.Close(dir)
		return stateDirs{}, fmt.Errorf("state dir %s/%s: %w", r.cfg.StateDir, TmpDirName, err)
	}
	n, err := clearTmp(tmp)
	if err != nil {
		unix.Close(dir)
		unix.Close(tmp)
		return stateDirs{}, fmt.Errorf("clear temp files: %w", err)
	}
	if n > 0 {
		r.log.Info("removed temp files of an interrupted run", "count", n)
	}
	return stateDirs{dir: dir, tmp: tmp}, nil
}

func clearTmp(tmp int) (int, error) {
	d, err := unix.Dup(tmp)
	if err != nil {
		return 0, err
	}
	f := os.NewFile(uintptr(d), TmpDirName)
	defer f.Close()
	names, err := f.Readdirnames(-1)
	if err != nil {
		return 0, err
	}
	n := 0
	for _, name := range names {
		if err := unix.Unlinkat(tmp, name, 0); err != nil && !errors.Is(err, unix.ENOENT) {
			return n, fmt.Errorf("%s: %w", name, err)
		}
		n++
	}
	return n, nil
}

func unlinkIgnoreMissing(dir int, name string) error {
	if err := unix.Unlinkat(dir, name, 0); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("remove %s: %w", name, err)
	}
	return nil
}

// firstEntry returns the name of an entry of dir other than the state dir,
// or "" when there is none.
func firstEntry(t *tree, stateRel string) (string, error) {
	fd, err := unix.Dup(t.root)
	if err != nil {
		return "", fmt.Errorf("RESTORE_DIR: %w", err)
	}
	f := os.NewFile(uintptr(fd), "RESTORE_DIR")
	defer f.Close()
	for {
		names, err := f.Readdirnames(64)
		for _, n := range names {
			// A state dir nested deeper (a/.podkeeper) does not make "a" ignorable:
			// "a" may hold data, so it counts.
			if n == stateRel {
				continue
			}
			return n, nil
		}
		if err != nil {
			return "", nil
		}
	}
}

type removal struct {
	path string
	dir  bool
}

// plan names files by their position in the manifest's index (4 bytes, not
// a File of about 260).
type plan struct {
	files      *snapshot.Index
	fetch      []int32
	fetchBytes int64
	skip       int
	skipBytes  int64
	fix        []int32
	remove     []removal
}

type localEntry struct {
	mode  fs.FileMode // type bits + permissions
	size  int64
	mtime time.Time
}

// scan lists RESTORE_DIR without following links (WalkDir uses lstat), leaving
// out the state dir.
func scan(dir, stateRel string) (map[string]localEntry, error) {
	out := map[string]localEntry{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if p == dir {
			return nil
		}
		rel := filepath.ToSlash(p[len(dir)+1:])
		if stateRel != "" && rel == stateRel {
			// The state dir is not part of the tree; SkipDir on a non-directory
			// would skip its siblings, so only directories get it.
			if d.IsDir() {
				return filepath.SkipDir
			}
			return nil
		}
		fi, err := d.Info()
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		out[rel] = localEntry{mode: fi.Mode(), size: fi.Size(), mtime: fi.ModTime()}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("scan RESTORE_DIR: %w", err)
	}
	return out, nil
}

// plan compares the snapshot with the disk. Links in the way are refused in
// every mode; files or directories in the way are removed only under mirror.
func (r *Restorer) plan(t *tree, m *snapshot.Compact, stateRel string) (*plan, error) {
	local, err := scan(r.cfg.Dir, stateRel)
	if err != nil {
		return nil, err
	}
	pl := &planner{r: r, t: t, m: m, local: local, mirror: r.cfg.Mode == ModeMirror,
		needed: neededDirs(m.Files), remove: map[string]bool{}, p: &plan{files: m.Files}}
	if err := pl.dirs(); err != nil {
		return nil, err
	}
	for i, f := range m.Files.All() {
		if err := pl.file(int32(i), f); err != nil {
			return nil, err
		}
	}
	if pl.mirror {
		pl.extras()
	}
	return pl.p, nil
}

// planner is the state of one plan: what the snapshot needs, what the disk
// has, and what is already marked for removal.
type planner struct {
	r      *Restorer
	t      *tree
	m      *snapshot.Compact
	local  map[string]localEntry
	mirror bool
	needed map[string]bool // directories above the snapshot's files
	remove map[string]bool
	p      *plan
}

func neededDirs(files *snapshot.Index) map[string]bool {
	needed := map[string]bool{}
	for i := range files.Len() {
		for d := path.Dir(files.Path(i)); d != "."; d = path.Dir(d) {
			if needed[d] {
				break
			}
			needed[d] = true
		}
	}
	return needed
}

// dirs checks what is on disk where the snapshot needs directories.
func (pl *planner) dirs() error {
	for d := range pl.needed {
		e, ok := pl.local[d]
		switch {
		case !ok || e.mode.IsDir():
		case e.mode&fs.ModeSymlink != 0:
			return &LinkError{Path: firstUnder(pl.m, d), Link: d}
		case pl.mirror:
			pl.remove[d] = true
		default:
			return &ConflictError{Path: firstUnder(pl.m, d), Reason: fmt.Sprintf("%q on disk is a file, the snapshot needs a directory there", d)}
		}
	}
	return nil
}

// file decides whether f is fetched, only gets its mode and mtime fixed, or
// is already there.
func (pl *planner) file(i int32, f snapshot.File) error {
	p := pl.p
	e, ok := pl.local[f.Path]
	switch {
	case !ok:
	case e.mode&fs.ModeSymlink != 0:
		return &LinkError{Path: f.Path, Link: f.Path}
	case e.mode.IsDir():
		if !pl.mirror {
			return &ConflictError{Path: f.Path, Reason: "a directory is in the way of the file"}
		}
		pl.remove[f.Path] = true
		ok = false
	case !e.mode.IsRegular():
		if !pl.mirror {
			return &ConflictError{Path: f.Path, Reason: "a special file is in the way"}
		}
		pl.remove[f.Path] = true
		ok = false
	}
	if !ok || pl.remove[f.Path] {
		p.fetch = append(p.fetch, i)
		p.fetchBytes += f.Size
		return nil
	}
	same, metaOK, err := pl.r.compare(pl.t, f, e)
	if err != nil {
		return err
	}
	switch {
	case !same:
		p.fetch = append(p.fetch, i)
		p.fetchBytes += f.Size
	case !metaOK:
		p.fix = append(p.fix, i)
		p.skip++
		p.skipBytes += f.Size
	default:
		p.skip++
		p.skipBytes += f.Size
	}
	return nil
}

// extras marks for removal, under mirror, everything on disk the snapshot
// lacks, deepest first.
func (pl *planner) extras() {
	inSnap := func(p string) bool { _, ok := pl.m.Files.Find(p); return ok }
	for rel, e := range pl.local {
		if e.mode.IsDir() && !pl.remove[rel] {
			if !pl.needed[rel] {
				pl.remove[rel] = true
			}
			continue
		}
		if !inSnap(rel) && !pl.remove[rel] {
			pl.remove[rel] = true
		}
	}
	// Removing a directory that is in the way means removing its content
	// first; everything below it is extra by construction, so it is in the set.
	for rel := range pl.remove {
		pl.p.remove = append(pl.p.remove, removal{path: rel, dir: pl.local[rel].mode.IsDir()})
	}
	slices.SortFunc(pl.p.remove, func(a, b removal) int {
		if da, db := strings.Count(a.path, "/"), strings.Count(b.path, "/"); da != db {
			return db - da
		}
		return strings.Compare(a.path, b.path)
	})
}

func firstUnder(m *snapshot.Compact, dir string) string {
	if i, _ := m.Files.Find(dir + "/"); i < m.Files.Len() {
		if p := m.Files.Path(i); strings.HasPrefix(p, dir+"/") {
			return p
		}
	}
	return dir
}

// compare reports whether the local file has the snapshot's content, and if
// so whether its mode and mtime match too. Size and mtime (ns) equal means
// same content without reading it: that is how the syncer leaves files and
// how restore leaves them. Otherwise an equal size is settled by sha256.
func (r *Restorer) compare(t *tree, f snapshot.File, e localEntry) (same, metaOK bool, err error) {
	if e.size != f.Size {
		return false, false, nil
	}
	metaOK = e.mtime.Equal(f.MTime) && uint32(e.mode.Perm()) == uint32(f.Mode)
	if e.mtime.Equal(f.MTime) {
		return true, metaOK, nil
	}
	// Opened below RESTORE_DIR's descriptor: a link swapped in by another
	// writer on the volume is not followed to hash a file elsewhere.
	lf, err := t.open(f.Path)
	if err != nil {
		// Unreadable (e.g. mode 0000 as non-root) or no longer a file: fetch it again.
		return false, false, nil
	}
	defer lf.Close()
	sum, _, err := snapshot.HashReader(lf)
	if err != nil {
		return false, false, nil
	}
	return sum == f.SHA256, false, nil
}

// checkSpace refuses a snapshot whose files cannot fit, before writing any:
// a manifest can claim sizes up to 5 TiB per file.
func checkSpace(root int, need int64) error {
	var sfs unix.Statfs_t
	if err := unix.Fstatfs(root, &sfs); err != nil {
		return nil // unknown: the writes will tell
	}
	free := int64(sfs.Bavail) * int64(sfs.Bsize)
	if need > free {
		return fmt.Errorf("refusing to restore: the snapshot needs %d bytes to fetch, only %d bytes are free under RESTORE_DIR", need, free)
	}
	return nil
}

func (r *Restorer) makeDurable(t *tree, tmp int) error {
	// Without small files every fetched file was fsynced already: only the
	// directories that received renames are left, which is cheaper than a
	// syncfs of a filesystem other writers share.
	if r.Durability == FsyncEach || r.prog.smallFetched.Load() == 0 {
		for _, fd := range t.openedDirs() {
			if err := unix.Fsync(fd); err != nil {
				return fmt.Errorf("fsync directory: %w", err)
			}
		}
		return nil
	}
	if err := unix.Syncfs(t.root); err != nil {
		return fmt.Errorf("syncfs RESTORE_DIR: %w", err)
	}
	return nil
}

// writeResult writes restored.json atomically and durably.
func writeResult(dir int, res *Result) error {
	b, err := json.MarshalIndent(res, "", "  ")
	if err != nil {
		return err
	}
	tmpName := ResultName + tmpSuffix
	fd, err := unix.Openat(dir, tmpName, unix.O_WRONLY|unix.O_CREAT|unix.O_TRUNC|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o644)
	if err != nil {
		return fmt.Errorf("write %s: %w", ResultName, err)
	}
	f := os.NewFile(uintptr(fd), tmpName)
	_, err = f.Write(append(b, '\n'))
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = unix.Renameat(dir, tmpName, dir, ResultName)
	}
	if err == nil {
		err = unix.Fsync(dir)
	}
	if err != nil {
		return fmt.Errorf("write %s: %w", ResultName, err)
	}
	return nil
}

// ReadResult reads restored.json from a state dir.
func ReadResult(stateDir string) (*Result, error) {
	root, err := safefs.OpenRootNoFollow(stateDir)
	if err != nil {
		return nil, err
	}
	defer root.Close()
	b, err := root.ReadFile(ResultName)
	if err != nil {
		return nil, err
	}
	var res Result
	if err := json.Unmarshal(b, &res); err != nil {
		return nil, err
	}
	return &res, nil
}

func rate(bytes int64, d time.Duration) string {
	if d <= 0 {
		return "0"
	}
	return fmt.Sprintf("%.1f", float64(bytes)/d.Seconds()/1e6)
}

// progress counts work for the periodic log line.
type progress struct {
	files, bytes           atomic.Int64
	smallFetched           atomic.Int64
	totalFiles, totalBytes int64
}

func (r *Restorer) logProgress(ctx context.Context, start time.Time) func() {
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		tick := time.NewTicker(r.progressEvery)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
				files, bytes := r.prog.files.Load(), r.prog.bytes.Load()
				el := time.Since(start)
				eta := "unknown"
				if bytes > 0 {
					left := float64(r.prog.totalBytes-bytes) / (float64(bytes) / el.Seconds())
					eta = (time.Duration(left) * time.Second).Round(time.Second).String()
				}
				r.log.Info("progress", "files", files, "files_total", r.prog.totalFiles, "bytes", bytes,
					"bytes_total", r.prog.totalBytes, "rate_mb_s", rate(bytes, el), "eta", eta)
			}
		}
	}()
	return func() { cancel(); wg.Wait() }
}
