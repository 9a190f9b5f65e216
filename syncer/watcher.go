package syncer

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"path"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/fsnotify/fsnotify"

	"github.com/podkeeper/podkeeper/agents/safefs"
)

// notifier is the part of fsnotify the watcher uses. It is an interface so
// that a test can stop the delivery of events (and overflow the kernel queue
// as a real burst does) without a switch in the syncer.
type notifier interface {
	Add(dir string) error
	Remove(path string) error
	Events() <-chan fsnotify.Event
	Errors() <-chan error
	Close() error
}

type fsNotifier struct{ *fsnotify.Watcher }

func (n fsNotifier) Events() <-chan fsnotify.Event { return n.Watcher.Events }
func (n fsNotifier) Errors() <-chan error          { return n.Watcher.Errors }

func newFSNotifier() (notifier, error) {
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return nil, err
	}
	return fsNotifier{w}, nil
}

// watcher turns the tree under SYNC_DIR and its fsnotify events into
// changes of files: it owns the watches, and knows which paths count.
type watcher struct {
	dir      string
	root     *safefs.Root // SYNC_DIR, set by Run: stats never follow a link
	stateDir string
	exclude  []string
	pull     bool // SYNC_PULL: its conflict files are excluded
	log      *slog.Logger
	m        *metrics

	n       notifier
	watches int
	// renameHint is set after a bare Rename event: fsnotify reports the
	// MOVED_TO half of a rename inside the tree as the next Create.
	renameHint bool
	// rescanAt is set when a watch could not be added or a rescan failed: the
	// tree is walked again then, so a directory without a watch is still
	// covered.
	rescanAt time.Time
}

func newWatcher(cfg *Config, log *slog.Logger, m *metrics) *watcher {
	return &watcher{dir: cfg.Dir, stateDir: cfg.StateDir, exclude: cfg.Exclude, pull: cfg.Pull, log: log, m: m}
}

func (w *watcher) open(newNotifier func() (notifier, error)) error {
	n, err := newNotifier()
	if err != nil {
		return fmt.Errorf("fsnotify: %w", watchErr(err))
	}
	w.n = n
	return nil
}

func (w *watcher) close() {
	if w.n != nil {
		w.n.Close()
	}
}

func absPath(dir, rel string) string { return filepath.Join(dir, filepath.FromSlash(rel)) }

// rel maps an absolute path under SYNC_DIR to its '/'-separated relative
// path; ok is false for the directory itself, paths outside it and the state
// directories.
func (w *watcher) rel(abs string) (string, bool) {
	r, err := filepath.Rel(w.dir, abs)
	if err != nil || r == "." || strings.HasPrefix(r, "..") {
		return "", false
	}
	r = filepath.ToSlash(r)
	if r == StateDirName || strings.HasPrefix(r, StateDirName+"/") || w.isStateDir(abs) {
		return "", false
	}
	return r, true
}

func (w *watcher) isStateDir(abs string) bool {
	return abs == w.stateDir || strings.HasPrefix(abs, w.stateDir+string(filepath.Separator))
}

// excluded reports whether rel matches SYNC_EXCLUDE by full relative path or
// by base name. With SYNC_PULL the conflict files it keeps are excluded too.
func (w *watcher) excluded(rel string) bool { return excluded(w.exclude, w.pull, rel) }

func excluded(patterns []string, pull bool, rel string) bool {
	base := path.Base(rel)
	if pull && strings.Contains(base, conflictMarker) {
		return true
	}
	for _, p := range patterns {
		if ok, _ := path.Match(p, rel); ok {
			return true
		}
		if ok, _ := path.Match(p, base); ok {
			return true
		}
	}
	return false
}

// watchErr names the sysctl to raise when inotify runs out of watches or
// instances: the default limits are easy to hit on a node with many Pods.
func watchErr(err error) error {
	if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EMFILE) {
		return fmt.Errorf("%w: the inotify limit is reached; raise fs.inotify.max_user_watches (and fs.inotify.max_user_instances) on the node, e.g. sysctl -w fs.inotify.max_user_watches=524288", err)
	}
	return err
}

// addWatch watches dir. It is called before dir's entries are read, so a file
// created in between is seen by the scan or by an event, never by neither.
func (w *watcher) addWatch(dir string) error {
	if err := w.n.Add(dir); err != nil {
		return watchErr(err)
	}
	w.watches++
	w.m.watches.Set(float64(w.watches))
	return nil
}

// scan watches and walks root and reports every regular file that counts to
// found. Only a failure on SYNC_DIR itself or running out of watches is an
// error: anything else is logged and left to events or a later rescan.
func (w *watcher) scan(root string, found func(rel string, st fileStat)) error {
	return filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil // removed while we walk: its events tell the rest
			}
			if p == root && p == w.dir {
				return err
			}
			w.log.Warn("cannot read", "path", p, "err", err)
			return nil
		}
		if d.IsDir() {
			if p != w.dir {
				if _, ok := w.rel(p); !ok {
					return filepath.SkipDir
				}
			}
			if err := w.addWatch(p); err != nil {
				if p == w.dir || errors.Is(err, syscall.ENOSPC) {
					return err
				}
				w.log.Warn("cannot watch", "dir", p, "err", err)
			}
			return nil
		}
		rel, ok := w.rel(p)
		if !ok || !d.Type().IsRegular() || w.excluded(rel) {
			return nil
		}
		if fi, err := d.Info(); err == nil {
			found(rel, statOf(fi))
		}
		return nil
	})
}

type changeKind int

const (
	noChange    changeKind = iota
	fileChanged            // rel was written, created or moved in
	removed                // rel (a file or a directory) is gone
	dirCreated             // a directory appeared at path: scan it
)

type change struct {
	kind changeKind
	rel  string
	path string
	stat fileStat
	// immediate: the file or tree appeared complete (renamed in), no settle.
	immediate bool
}

// change interprets one fsnotify event.
func (w *watcher) change(ev fsnotify.Event) change {
	hint := w.renameHint
	w.renameHint = ev.Op == fsnotify.Rename
	rel, ok := w.rel(ev.Name)
	if !ok {
		return change{}
	}
	if ev.Has(fsnotify.Remove) || ev.Has(fsnotify.Rename) {
		// A directory's watch; files have none and Remove then fails.
		if w.n.Remove(ev.Name) == nil {
			w.watches--
			w.m.watches.Set(float64(w.watches))
		}
		return change{kind: removed, rel: rel}
	}
	fi, err := w.root.Lstat(rel)
	if err != nil {
		return change{} // gone again (its Remove event follows), or below a link: never followed
	}
	if fi.IsDir() {
		if !ev.Has(fsnotify.Create) {
			return change{}
		}
		// A directory renamed into the tree is complete; one just made is
		// about to be filled and its files settle as usual.
		return change{kind: dirCreated, path: ev.Name, immediate: hint || finishedBefore(fi)}
	}
	if !fi.Mode().IsRegular() || w.excluded(rel) {
		return change{}
	}
	// MOVED_FROM followed by MOVED_TO is a rename inside the tree (the
	// write-then-rename pattern): the file is complete now. fsnotify reports a
	// rename from outside the tree as a plain Create; finishedBefore tells it
	// from a file just opened for writing.
	return change{kind: fileChanged, rel: rel, stat: statOf(fi), immediate: ev.Has(fsnotify.Create) && (hint || finishedBefore(fi))}
}

// rescanDue reports whether a rescan asked for by rescanLater is due, and
// clears the request.
func (w *watcher) rescanDue(now time.Time) bool {
	if w.rescanAt.IsZero() || !now.After(w.rescanAt) {
		return false
	}
	w.rescanAt = time.Time{}
	return true
}

func (w *watcher) rescanLater(now time.Time) { w.rescanAt = now.Add(30 * time.Second) }

// finishedBefore reports whether the inode changed metadata (rename, link,
// chmod, utimes) after its last data write: writes set ctime and mtime to the
// same instant, so ctime > mtime at the moment a file appears means it was
// moved or linked in complete rather than created to be written. A rename in
// the same clock tick as the last write is not detected here (the file then
// waits SYNC_SETTLE), and later Write events still restart the settle time.
func finishedBefore(fi fs.FileInfo) bool {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return false
	}
	ctime := time.Unix(st.Ctim.Sec, st.Ctim.Nsec)
	return ctime.After(fi.ModTime())
}
