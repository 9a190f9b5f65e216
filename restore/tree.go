package restore

import (
	"errors"
	"fmt"
	"os"
	"path"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/podkeeper/podkeeper/agents/safefs"
)

// LinkError is returned when a symbolic link sits where a snapshot path needs
// a directory or a file. Restore never follows such a link (it could point
// anywhere) and never silently replaces it (someone put it there).
type LinkError struct {
	Path string // the snapshot path being restored
	Link string // the element of it that is a link on disk
}

func (e *LinkError) Error() string {
	return fmt.Sprintf("refusing to restore %q: %q on disk is a symbolic link; restore never writes through links (remove it and run again)", e.Path, e.Link)
}

// ConflictError is returned when a local file or directory is in the way of a
// snapshot path and the mode does not allow removing it.
type ConflictError struct {
	Path   string
	Reason string
}

func (e *ConflictError) Error() string {
	return fmt.Sprintf("cannot restore %q: %s (RESTORE_MODE=mirror removes it)", e.Path, e.Reason)
}

// tree is RESTORE_DIR opened once. Every path below it is reached with openat
// one element at a time and O_NOFOLLOW, so a symlink anywhere on the way,
// whether planted before the restore or during it, stops the walk instead of
// being followed: nothing is ever created outside the root.
type tree struct {
	root int
	mu   sync.Mutex
	dirs map[string]int // open directory fds by '/'-separated relative path
}

// maxCachedDirs bounds the fds kept open; beyond it directories are reopened,
// which only costs a walk, while running out of fds would fail the restore.
const maxCachedDirs = 512

func openTree(dir string) (*tree, error) {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: dir, Err: err}
	}
	return &tree{root: fd, dirs: map[string]int{}}, nil
}

func (t *tree) Close() {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, fd := range t.dirs {
		unix.Close(fd)
	}
	t.dirs = map[string]int{}
	unix.Close(t.root)
}

// dir returns an fd for the directory rel ("" is the root) and a release func.
// With create, missing directories are made (0755). want names the snapshot
// path the caller works on, for error messages.
func (t *tree) dir(rel, want string, create bool) (int, func(), error) {
	if rel == "" || rel == "." {
		return t.root, func() {}, nil
	}
	t.mu.Lock()
	if fd, ok := t.dirs[rel]; ok {
		t.mu.Unlock()
		return fd, func() {}, nil
	}
	t.mu.Unlock()
	parent, base := path.Split(rel)
	pfd, release, err := t.dir(path.Clean(parent), want, create)
	if err != nil {
		return -1, nil, err
	}
	defer release()
	fd, err := openDirAt(pfd, base)
	if errors.Is(err, unix.ENOENT) && create {
		if err = unix.Mkdirat(pfd, base, 0o755); err == nil || errors.Is(err, unix.EEXIST) {
			fd, err = openDirAt(pfd, base)
		}
	}
	if err != nil {
		if errors.Is(err, unix.ELOOP) || errors.Is(err, unix.ENOTDIR) {
			var st unix.Stat_t
			if unix.Fstatat(pfd, base, &st, unix.AT_SYMLINK_NOFOLLOW) == nil {
				if st.Mode&unix.S_IFMT == unix.S_IFLNK {
					return -1, nil, &LinkError{Path: want, Link: rel}
				}
				return -1, nil, &ConflictError{Path: want, Reason: fmt.Sprintf("%q on disk is a file, the snapshot needs a directory there", rel)}
			}
		}
		return -1, nil, &os.PathError{Op: "open directory", Path: rel, Err: err}
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if old, ok := t.dirs[rel]; ok {
		unix.Close(fd)
		return old, func() {}, nil
	}
	if len(t.dirs) >= maxCachedDirs {
		return fd, func() { unix.Close(fd) }, nil
	}
	t.dirs[rel] = fd
	return fd, func() {}, nil
}

func openDirAt(dirfd int, name string) (int, error) {
	for {
		fd, err := unix.Openat(dirfd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		return fd, err
	}
}

// open opens the regular file rel for reading without following a link in
// any element (a FIFO is refused without blocking).
func (t *tree) open(rel string) (*os.File, error) {
	parent, base := path.Split(rel)
	pfd, release, err := t.dir(path.Clean(parent), rel, false)
	if err != nil {
		return nil, err
	}
	defer release()
	fd, err := unix.Openat(pfd, base, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: rel, Err: err}
	}
	f := os.NewFile(uintptr(fd), rel)
	if fi, err := f.Stat(); err != nil || !fi.Mode().IsRegular() {
		f.Close()
		return nil, &os.PathError{Op: "open", Path: rel, Err: unix.EINVAL}
	}
	return f, nil
}

// lstat stats rel without following a final link; parents are walked safely.
func (t *tree) lstat(rel string) (unix.Stat_t, error) {
	var st unix.Stat_t
	parent, base := path.Split(rel)
	pfd, release, err := t.dir(path.Clean(parent), rel, false)
	if err != nil {
		return st, err
	}
	defer release()
	err = unix.Fstatat(pfd, base, &st, unix.AT_SYMLINK_NOFOLLOW)
	return st, err
}

// place renames the temp file tmpName in tmpDir to rel, creating parents. A
// link or directory at rel is refused: rename would replace a link (not follow
// it), but a link there means someone planted it.
func (t *tree) place(tmpDir int, tmpName, rel string) error {
	parent, base := path.Split(rel)
	pfd, release, err := t.dir(path.Clean(parent), rel, true)
	if err != nil {
		return err
	}
	defer release()
	var st unix.Stat_t
	if err := unix.Fstatat(pfd, base, &st, unix.AT_SYMLINK_NOFOLLOW); err == nil {
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFLNK:
			return &LinkError{Path: rel, Link: rel}
		case unix.S_IFDIR:
			return &ConflictError{Path: rel, Reason: "a directory is in the way of the file"}
		}
	}
	if err := unix.Renameat(tmpDir, tmpName, pfd, base); err != nil {
		if errors.Is(err, unix.EXDEV) {
			return fmt.Errorf("rename into %q: RESTORE_STATE_DIR must be on the same filesystem as RESTORE_DIR: %w", rel, err)
		}
		return &os.PathError{Op: "rename into place", Path: rel, Err: err}
	}
	return nil
}

// link gives the unnamed file fd the name rel, creating parents, only if
// nothing is at rel (unix.EEXIST: the caller places it the checked way). A
// link is never followed: the new name is one element in a directory opened
// without links.
func (t *tree) link(fd int, rel string) error {
	parent, base := path.Split(rel)
	pfd, release, err := t.dir(path.Clean(parent), rel, true)
	if err != nil {
		return err
	}
	defer release()
	if err := safefs.LinkFd(fd, pfd, base); err != nil {
		switch {
		case errors.Is(err, unix.EEXIST):
			return err
		case errors.Is(err, unix.EXDEV):
			return fmt.Errorf("link into %q: RESTORE_STATE_DIR must be on the same filesystem as RESTORE_DIR: %w", rel, err)
		}
		return &os.PathError{Op: "link into place", Path: rel, Err: err}
	}
	return nil
}

// setMeta gives the regular file rel its mode and mtime. The app may swap rel
// for a link at any moment, so nothing is changed by name: the final element
// is opened O_PATH|O_NOFOLLOW (a link is opened as itself, never followed),
// checked to be a regular file through that descriptor, and the mode and
// times are set on the descriptor's inode (fchmodat2/utimensat with
// AT_EMPTY_PATH, or its /proc/self/fd magic link on kernels without them).
// A swap after the open changes nothing: the descriptor still holds the file
// that was checked.
func (t *tree) setMeta(rel string, mode os.FileMode, mtime time.Time) error {
	parent, base := path.Split(rel)
	pfd, release, err := t.dir(path.Clean(parent), rel, false)
	if err != nil {
		return err
	}
	defer release()
	fd, err := unix.Openat(pfd, base, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return &os.PathError{Op: "open", Path: rel, Err: err}
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return &os.PathError{Op: "stat", Path: rel, Err: err}
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return &ConflictError{Path: rel, Reason: "no longer a regular file"}
	}
	if err := safefs.ChmodFd(fd, uint32(mode.Perm())); err != nil {
		return &os.PathError{Op: "chmod", Path: rel, Err: err}
	}
	ts := []unix.Timespec{unix.NsecToTimespec(mtime.UnixNano()), unix.NsecToTimespec(mtime.UnixNano())}
	if err := safefs.TimesFd(fd, ts); err != nil {
		return &os.PathError{Op: "set mtime", Path: rel, Err: err}
	}
	return nil
}

// remove unlinks rel (a file, link or empty directory) without following links.
func (t *tree) remove(rel string, isDir bool) error {
	parent, base := path.Split(rel)
	pfd, release, err := t.dir(path.Clean(parent), rel, false)
	if err != nil {
		return err
	}
	defer release()
	flags := 0
	if isDir {
		flags = unix.AT_REMOVEDIR
		t.mu.Lock()
		if fd, ok := t.dirs[rel]; ok {
			unix.Close(fd)
			delete(t.dirs, rel)
		}
		t.mu.Unlock()
	}
	if err := unix.Unlinkat(pfd, base, flags); err != nil && !errors.Is(err, unix.ENOENT) {
		return &os.PathError{Op: "remove", Path: rel, Err: err}
	}
	return nil
}

// openedDirs returns the fds of every directory touched, for per-file fsync.
func (t *tree) openedDirs() []int {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := []int{t.root}
	for _, fd := range t.dirs {
		out = append(out, fd)
	}
	return out
}
