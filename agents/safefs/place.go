package safefs

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"io/fs"
	"os"
	"path"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// ErrChanged is returned by Replace when the file at the target is not the
// one the caller judged (the app wrote or replaced it meanwhile): the app's
// version stays.
var ErrChanged = errors.New("changed on disk since it was checked")

// CreateTemp creates a new, empty file directly in r, readable only by its
// owner, under a fresh name starting with prefix.
func (r *Root) CreateTemp(prefix string) (*os.File, string, error) {
	var b [8]byte
	for range 10 {
		rand.Read(b[:])
		name := prefix + hex.EncodeToString(b[:])
		fd, err := unix.Openat(r.fd, name, unix.O_RDWR|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
		if errors.Is(err, unix.EEXIST) {
			continue
		}
		if err != nil {
			return nil, "", r.pathErr("create", name, err)
		}
		return os.NewFile(uintptr(fd), r.name+"/"+name), name, nil
	}
	return nil, "", r.pathErr("create", prefix, unix.EEXIST)
}

// MkdirAll creates the directory rel and its missing parents below r (0755),
// never through a link.
func (r *Root) MkdirAll(rel string) error {
	if rel == "" || rel == "." {
		return nil
	}
	if err := checkRel(rel); err != nil {
		return err
	}
	parent := ""
	for name := range strings.SplitSeq(rel, "/") {
		d, err := r.OpenDir(parent)
		if err != nil {
			return err
		}
		err = unix.Mkdirat(int(d.Fd()), name, 0o755)
		d.Close()
		if err != nil && !errors.Is(err, unix.EEXIST) {
			return r.pathErr("mkdir", path.Join(parent, name), err)
		}
		parent = path.Join(parent, name)
	}
	return nil
}

// SetMeta gives the open file f its permission bits and modification time
// (exact to the nanosecond), through its descriptor.
func SetMeta(f *os.File, mode fs.FileMode, mtime time.Time) error {
	fd := int(f.Fd())
	if err := ChmodFd(fd, uint32(mode.Perm())); err != nil {
		return &os.PathError{Op: "chmod", Path: f.Name(), Err: err}
	}
	ts := []unix.Timespec{unix.NsecToTimespec(mtime.UnixNano()), unix.NsecToTimespec(mtime.UnixNano())}
	if err := TimesFd(fd, ts); err != nil {
		return &os.PathError{Op: "set mtime", Path: f.Name(), Err: err}
	}
	return nil
}

// ChmodFd changes the mode of the inode fd holds, also for an O_PATH
// descriptor (which fchmod refuses): fchmodat2 with AT_EMPTY_PATH (Linux >=
// 6.6), else the descriptor's /proc/self/fd magic link, which names exactly
// that inode. Both act on the same inode, so falling back on any error
// (ENOSYS, EOPNOTSUPP, a seccomp profile's EPERM) is harmless: a real error
// repeats.
func ChmodFd(fd int, mode uint32) error {
	if unix.Fchmodat(fd, "", mode, unix.AT_EMPTY_PATH) == nil {
		return nil
	}
	return unix.Fchmodat(unix.AT_FDCWD, procFd(fd), mode, 0)
}

// TimesFd sets the times of the inode fd holds, the same way.
func TimesFd(fd int, ts []unix.Timespec) error {
	if unix.UtimesNanoAt(fd, "", ts, unix.AT_EMPTY_PATH) == nil {
		return nil
	}
	return unix.UtimesNanoAt(unix.AT_FDCWD, procFd(fd), ts, 0)
}

func procFd(fd int) string { return "/proc/self/fd/" + strconv.Itoa(fd) }

// CreateUnnamed creates an unnamed regular file in the directory dirfd
// (O_TMPFILE): it has no name until LinkFd gives it one, so nothing can see it
// half-written, and creating many at once does not contend on a directory's
// entries. ok is false where the filesystem has no O_TMPFILE (NFS, old
// kernels): the caller falls back to a named temp file.
func CreateUnnamed(dirfd int) (fd int, ok bool, err error) {
	fd, err = unix.Openat(dirfd, ".", unix.O_RDWR|unix.O_TMPFILE|unix.O_CLOEXEC, 0o600)
	if err == nil {
		return fd, true, nil
	}
	if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EISDIR) || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT) {
		return -1, false, nil
	}
	return -1, false, err
}

// LinkFd gives the unnamed file fd the name name in the directory dirfd,
// only if nothing has that name (unix.EEXIST otherwise): the complete file
// appears at once, as a rename would make it. AT_EMPTY_PATH needs
// CAP_DAC_READ_SEARCH; without it the descriptor's /proc/self/fd link names
// the same inode.
func LinkFd(fd, dirfd int, name string) error {
	err := unix.Linkat(fd, "", dirfd, name, unix.AT_EMPTY_PATH)
	if err == nil || errors.Is(err, unix.EEXIST) {
		return err
	}
	return unix.Linkat(unix.AT_FDCWD, procFd(fd), dirfd, name, unix.AT_SYMLINK_FOLLOW)
}

// Expect is what a caller saw at a path before deciding to replace it.
type Expect struct {
	Dev, Ino uint64
	Size     int64
	MTime    time.Time
}

// ExpectOf describes a file as Lstat returned it.
func ExpectOf(fi fs.FileInfo) Expect {
	e := Expect{Size: fi.Size(), MTime: fi.ModTime()}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		e.Dev, e.Ino = uint64(st.Dev), uint64(st.Ino)
	}
	return e
}

func (e Expect) matches(st *unix.Stat_t) bool {
	return st.Mode&unix.S_IFMT == unix.S_IFREG && st.Dev == e.Dev && st.Ino == e.Ino && st.Size == e.Size &&
		time.Unix(st.Mtim.Unix()).Equal(e.MTime)
}

// Place moves the file name of from (a temp file on the same filesystem) to
// rel below r, creating parents, only if nothing is at rel: a file the app
// created there meanwhile wins (fs.ErrExist).
func (r *Root) Place(from *Root, name, rel string) error {
	pfd, base, done, err := r.parentOf(rel)
	if err != nil {
		return err
	}
	defer done()
	err = unix.Renameat2(from.fd, name, pfd, base, unix.RENAME_NOREPLACE)
	if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOSYS) {
		// No RENAME_NOREPLACE here (some network filesystems): check, then
		// rename; the window is the app's to win or lose.
		var st unix.Stat_t
		if unix.Fstatat(pfd, base, &st, unix.AT_SYMLINK_NOFOLLOW) == nil {
			return r.pathErr("place", rel, fs.ErrExist)
		}
		err = unix.Renameat(from.fd, name, pfd, base)
	}
	if errors.Is(err, unix.EEXIST) {
		return r.pathErr("place", rel, fs.ErrExist)
	}
	if err != nil {
		return r.pathErr("place", rel, err)
	}
	return nil
}

// Replace atomically puts the file name of from at rel below r in place of
// the regular file the caller saw there (want). The two are exchanged; if
// what came out is not want (the app replaced or wrote it meanwhile), they
// are exchanged back and ErrChanged is returned. Otherwise the old file is
// now at name in from: keepAs, if not empty, moves it next to rel under that
// name (never over an existing file), else it is removed.
func (r *Root) Replace(from *Root, name, rel string, want Expect, keepAs string) error {
	pfd, base, done, err := r.parentOf(rel)
	if err != nil {
		return err
	}
	defer done()
	if err := unix.Renameat2(from.fd, name, pfd, base, unix.RENAME_EXCHANGE); err != nil {
		if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOSYS) {
			return r.replaceByRename(from, name, pfd, base, rel, want, keepAs)
		}
		return r.pathErr("replace", rel, err)
	}
	var st unix.Stat_t
	if err := unix.Fstatat(from.fd, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil || !want.matches(&st) {
		if err := unix.Renameat2(from.fd, name, pfd, base, unix.RENAME_EXCHANGE); err != nil {
			return r.pathErr("replace (swapping back)", rel, err)
		}
		return r.pathErr("replace", rel, ErrChanged)
	}
	if keepAs == "" {
		unix.Unlinkat(from.fd, name, 0)
		return nil
	}
	if err := unix.Renameat2(from.fd, name, pfd, keepAs, unix.RENAME_NOREPLACE); err != nil {
		return r.pathErr("keep the replaced file as", path.Join(path.Dir(rel), keepAs), err)
	}
	return nil
}

// replaceByRename is Replace where the filesystem cannot exchange: the old
// file is checked, moved aside, and the new one renamed in.
func (r *Root) replaceByRename(from *Root, name string, pfd int, base, rel string, want Expect, keepAs string) error {
	var st unix.Stat_t
	if err := unix.Fstatat(pfd, base, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil || !want.matches(&st) {
		return r.pathErr("replace", rel, ErrChanged)
	}
	if keepAs != "" {
		if err := unix.Renameat(pfd, base, pfd, keepAs); err != nil {
			return r.pathErr("keep the replaced file as", keepAs, err)
		}
	}
	if err := unix.Renameat(from.fd, name, pfd, base); err != nil {
		return r.pathErr("replace", rel, err)
	}
	return nil
}

// RemoveFile unlinks the regular file rel below r if it is still want; a
// file the app changed meanwhile stays (ErrChanged). The check and the
// unlink are two steps: a write landing between them is lost with the file,
// as it would be with any delete.
func (r *Root) RemoveFile(rel string, want Expect) error {
	pfd, base, done, err := r.parentOf(rel)
	if err != nil {
		return err
	}
	defer done()
	var st unix.Stat_t
	if err := unix.Fstatat(pfd, base, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil
		}
		return r.pathErr("remove", rel, err)
	}
	if !want.matches(&st) {
		return r.pathErr("remove", rel, ErrChanged)
	}
	if err := unix.Unlinkat(pfd, base, 0); err != nil && !errors.Is(err, unix.ENOENT) {
		return r.pathErr("remove", rel, err)
	}
	return nil
}

// parentOf opens the parent directory of rel (created when missing) and
// returns its descriptor and rel's last element.
func (r *Root) parentOf(rel string) (fd int, base string, done func(), err error) {
	if err := checkRel(rel); err != nil {
		return -1, "", nil, r.pathErr("open", rel, err)
	}
	dir, base := path.Split(rel)
	dir = strings.TrimSuffix(dir, "/")
	if err := r.MkdirAll(dir); err != nil {
		return -1, "", nil, err
	}
	d, err := r.OpenDir(dir)
	if err != nil {
		return -1, "", nil, err
	}
	return int(d.Fd()), base, func() { d.Close() }, nil
}
