package safefs

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// Sub opens the directory rel below r (created when missing, 0700) as a root
// of its own: a state directory inside a volume the app can write is reached
// without following a link the app put on the way.
func (r *Root) Sub(rel string) (*Root, error) {
	rel = filepath.ToSlash(filepath.Clean(rel))
	if rel == "." {
		fd, err := unix.Dup(r.fd)
		if err != nil {
			return nil, err
		}
		return &Root{fd: fd, name: r.name}, nil
	}
	parent := ""
	for name := range strings.SplitSeq(rel, "/") {
		d, err := r.OpenDir(parent)
		if err != nil {
			return nil, err
		}
		err = unix.Mkdirat(int(d.Fd()), name, 0o700)
		d.Close()
		if err != nil && !errors.Is(err, unix.EEXIST) {
			return nil, r.pathErr("mkdir", path.Join(parent, name), err)
		}
		parent = path.Join(parent, name)
	}
	f, err := r.OpenDir(rel)
	if err != nil {
		return nil, err
	}
	fd, err := unix.Dup(int(f.Fd()))
	f.Close()
	if err != nil {
		return nil, err
	}
	return &Root{fd: fd, name: r.name + "/" + rel}, nil
}

// ReadFile reads the regular file name directly in r.
func (r *Root) ReadFile(name string) ([]byte, error) {
	f, err := r.Open(name)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	var b bytes.Buffer
	b.Grow(int(fi.Size()))
	if _, err := b.ReadFrom(f); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

// WriteFile replaces the file name directly in r with b: written to a temp
// file beside it and renamed over it, both relative to r's descriptor (a
// rename replaces a link, it never writes through one).
func (r *Root) WriteFile(name string, b []byte, perm os.FileMode) error {
	if strings.ContainsRune(name, '/') || checkRel(name) != nil {
		return r.pathErr("write", name, ErrOutside)
	}
	tmp := fmt.Sprintf(".%s.%d.tmp", name, os.Getpid())
	fd, err := unix.Openat(r.fd, tmp, unix.O_WRONLY|unix.O_CREAT|unix.O_TRUNC|unix.O_NOFOLLOW|unix.O_CLOEXEC, uint32(perm))
	if err != nil {
		return r.pathErr("create", tmp, err)
	}
	f := os.NewFile(uintptr(fd), tmp)
	_, err = f.Write(b)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = unix.Renameat(r.fd, tmp, r.fd, name)
	}
	if err != nil {
		unix.Unlinkat(r.fd, tmp, 0)
		return r.pathErr("write", name, err)
	}
	return nil
}

// Remove unlinks the file name directly in r (a link is removed, not
// followed); a missing file is not an error.
func (r *Root) Remove(name string) error {
	if err := unix.Unlinkat(r.fd, name, 0); err != nil && !errors.Is(err, unix.ENOENT) {
		return r.pathErr("remove", name, err)
	}
	return nil
}
