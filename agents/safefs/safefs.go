// Package safefs opens paths below a directory that an untrusted process (the
// app container next to the agents) can change at any moment. No symbolic link
// is followed in any element of a path, and nothing outside the root is ever
// reached: a check followed by an open by full path is a race the app can win
// (swap a directory for a link in between), so the check is the open itself.
//
// openat2(2) with RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS does this in the kernel
// (Linux >= 5.6); elsewhere, or where a seccomp profile refuses it, a walk
// opens one element at a time with O_NOFOLLOW, which is just as safe and costs
// one syscall per element.
package safefs

import (
	"errors"
	"io/fs"
	"os"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// ErrLink is wrapped by every error caused by a symbolic link on the path.
var ErrLink = errors.New("symbolic link on the path (never followed)")

// ErrNotRegular is wrapped when Open finds something other than a regular file
// (a FIFO would block the reader forever, a device could be anything).
var ErrNotRegular = errors.New("not a regular file")

// ErrOutside is wrapped when a relative path is absolute, empty or has '..'.
var ErrOutside = errors.New("path does not stay below the root")

// Root is a directory opened once; every path is resolved beneath it.
type Root struct {
	fd   int
	name string
}

// OpenRoot opens dir. dir itself comes from configuration (a mount point the
// app cannot replace), so it is opened normally.
func OpenRoot(dir string) (*Root, error) {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: dir, Err: err}
	}
	return &Root{fd: fd, name: dir}, nil
}

// OpenRootNoFollow opens dir like OpenRoot, but refuses it (ErrLink) when its
// last element is a symbolic link: for a directory the app itself creates or
// may replace, such as a log directory below the volume's mount point.
func OpenRootNoFollow(dir string) (*Root, error) {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		var st unix.Stat_t
		if errors.Is(err, unix.ELOOP) || (errors.Is(err, unix.ENOTDIR) && unix.Lstat(dir, &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFLNK) {
			err = ErrLink
		}
		return nil, &os.PathError{Op: "open", Path: dir, Err: err}
	}
	return &Root{fd: fd, name: dir}, nil
}

// Stat describes the root directory itself (through its descriptor).
func (r *Root) Stat() (fs.FileInfo, error) {
	fd, err := unix.Openat(r.fd, ".", unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "stat", Path: r.name, Err: err}
	}
	f := os.NewFile(uintptr(fd), r.name)
	defer f.Close()
	return f.Stat()
}

// Name is the directory OpenRoot was given.
func (r *Root) Name() string { return r.name }

// Close releases the root's descriptor.
func (r *Root) Close() error { return unix.Close(r.fd) }

// Open opens the regular file rel ('/'-separated, relative) for reading.
func (r *Root) Open(rel string) (*os.File, error) {
	fd, err := r.openat(rel, unix.O_RDONLY|unix.O_NONBLOCK)
	if err != nil {
		return nil, r.pathErr("open", rel, err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return nil, r.pathErr("stat", rel, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		unix.Close(fd)
		return nil, r.pathErr("open", rel, ErrNotRegular)
	}
	// O_NONBLOCK only kept a FIFO from blocking the open; a regular file reads
	// the same either way, but the runtime poller must not see the flag.
	if err := unix.SetNonblock(fd, false); err != nil {
		unix.Close(fd)
		return nil, r.pathErr("open", rel, err)
	}
	return os.NewFile(uintptr(fd), r.name+"/"+rel), nil
}

// OpenDir opens the directory rel ("" or "." is the root) for ReadDir.
func (r *Root) OpenDir(rel string) (*os.File, error) {
	if rel == "" || rel == "." {
		fd, err := unix.Openat(r.fd, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			return nil, r.pathErr("open", rel, err)
		}
		return os.NewFile(uintptr(fd), r.name), nil
	}
	fd, err := r.openat(rel, unix.O_RDONLY|unix.O_DIRECTORY)
	if errors.Is(err, unix.ENOTDIR) {
		// O_DIRECTORY answers ENOTDIR for a final link before O_NOFOLLOW's
		// ELOOP; say which it was.
		if fi, lerr := r.Lstat(rel); lerr == nil && fi.Mode()&fs.ModeSymlink != 0 {
			err = ErrLink
		}
	}
	if err != nil {
		return nil, r.pathErr("open", rel, err)
	}
	return os.NewFile(uintptr(fd), r.name+"/"+rel), nil
}

// Lstat describes rel itself (a final link is described, not followed); a
// link in any parent element is an ErrLink.
func (r *Root) Lstat(rel string) (fs.FileInfo, error) {
	fd, err := r.openat(rel, unix.O_PATH)
	if err != nil {
		return nil, r.pathErr("lstat", rel, err)
	}
	f := os.NewFile(uintptr(fd), rel[strings.LastIndexByte(rel, '/')+1:])
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, r.pathErr("lstat", rel, err)
	}
	return fi, nil
}

func (r *Root) pathErr(op, rel string, err error) error {
	if errors.Is(err, unix.ELOOP) {
		err = ErrLink
	}
	return &os.PathError{Op: op, Path: r.name + "/" + rel, Err: err}
}

// openat opens rel with flags plus O_NOFOLLOW|O_CLOEXEC, links refused in
// every element.
func (r *Root) openat(rel string, flags int) (int, error) {
	if err := checkRel(rel); err != nil {
		return -1, err
	}
	flags |= unix.O_NOFOLLOW | unix.O_CLOEXEC
	if haveOpenat2() {
		return openBeneath(r.fd, rel, flags)
	}
	return openWalk(r.fd, rel, flags)
}

func checkRel(rel string) error {
	if rel == "" || strings.HasPrefix(rel, "/") {
		return ErrOutside
	}
	for el := range strings.SplitSeq(rel, "/") {
		if el == "" || el == "." || el == ".." {
			return ErrOutside
		}
	}
	return nil
}

// resolve is what openat2 enforces: no link anywhere (magic /proc links
// included), nothing above the root.
const resolve = unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS

func openBeneath(root int, rel string, flags int) (int, error) {
	how := &unix.OpenHow{Flags: uint64(flags), Resolve: resolve}
	for {
		fd, err := unix.Openat2(root, rel, how)
		if errors.Is(err, unix.EINTR) || errors.Is(err, unix.EAGAIN) {
			// EAGAIN: a concurrent rename made the kernel's lookup unsafe to
			// finish; retrying is what the man page asks for.
			continue
		}
		if errors.Is(err, unix.EXDEV) {
			err = ErrOutside
		}
		return fd, err
	}
}

// openWalk is the fallback: each directory element opened with O_NOFOLLOW
// from the previous one's descriptor, so a link swapped in at any moment is
// met by the open that would cross it.
func openWalk(root int, rel string, flags int) (int, error) {
	els := strings.Split(rel, "/")
	dir := root
	defer func() {
		if dir != root {
			unix.Close(dir)
		}
	}()
	for _, el := range els[:len(els)-1] {
		fd, err := openat(dir, el, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC)
		if err != nil {
			if errors.Is(err, unix.ENOTDIR) && isLink(dir, el) {
				err = unix.ELOOP
			}
			return -1, err
		}
		if dir != root {
			unix.Close(dir)
		}
		dir = fd
	}
	last := els[len(els)-1]
	fd, err := openat(dir, last, flags)
	if err != nil && errors.Is(err, unix.ENOTDIR) && isLink(dir, last) {
		err = unix.ELOOP
	}
	return fd, err
}

func openat(dir int, name string, flags int) (int, error) {
	for {
		fd, err := unix.Openat(dir, name, flags, 0)
		if !errors.Is(err, unix.EINTR) {
			return fd, err
		}
	}
}

func isLink(dir int, name string) bool {
	var st unix.Stat_t
	return unix.Fstatat(dir, name, &st, unix.AT_SYMLINK_NOFOLLOW) == nil && st.Mode&unix.S_IFMT == unix.S_IFLNK
}

var openat2Once = sync.OnceValue(func() bool {
	fd, err := unix.Openat2(unix.AT_FDCWD, ".", &unix.OpenHow{Flags: unix.O_RDONLY | unix.O_DIRECTORY | unix.O_CLOEXEC, Resolve: resolve})
	if err == nil {
		unix.Close(fd)
	}
	// ENOSYS: kernel < 5.6, or a seccomp profile that hides the syscall.
	// EPERM: a profile that refuses it outright.
	return err == nil || !(errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EPERM))
})

func haveOpenat2() bool { return openat2Once() }

// Mode names the resolver in use, for the agents' start-up log line.
func Mode() string {
	if haveOpenat2() {
		return "openat2"
	}
	return "walk"
}
