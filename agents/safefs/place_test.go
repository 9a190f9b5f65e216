package safefs

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestPlaceNeverReplaces(t *testing.T) {
	dir := t.TempDir()
	r, tmp := roots(t, dir)
	name := tempWith(t, tmp, "new")
	if err := r.Place(tmp, name, "a/b/c.txt"); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "a/b/c.txt")); string(b) != "new" {
		t.Fatalf("placed %q", b)
	}
	// The app created the file first: it wins.
	name = tempWith(t, tmp, "late")
	if err := r.Place(tmp, name, "a/b/c.txt"); !errors.Is(err, fs.ErrExist) {
		t.Fatalf("Place over an existing file: %v, want fs.ErrExist", err)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "a/b/c.txt")); string(b) != "new" {
		t.Fatalf("the app's file was replaced: %q", b)
	}
	// A link as a parent is never followed.
	out := t.TempDir()
	os.Symlink(out, filepath.Join(dir, "l"))
	if err := r.Place(tmp, name, "l/x"); !errors.Is(err, ErrLink) {
		t.Fatalf("Place through a link: %v, want ErrLink", err)
	}
	if ents, _ := os.ReadDir(out); len(ents) != 0 {
		t.Fatalf("written through the link: %v", ents)
	}
}

func TestReplaceOnlyWhatWasJudged(t *testing.T) {
	dir := t.TempDir()
	r, tmp := roots(t, dir)
	p := filepath.Join(dir, "f")
	os.WriteFile(p, []byte("old"), 0o644)
	fi, _ := r.Lstat("f")
	want := ExpectOf(fi)

	// The app rewrote the file after it was judged: it stays.
	os.WriteFile(p+".new", []byte("app's"), 0o644)
	os.Rename(p+".new", p)
	name := tempWith(t, tmp, "pulled")
	if err := r.Replace(tmp, name, "f", want, ""); !errors.Is(err, ErrChanged) {
		t.Fatalf("Replace of a changed file: %v, want ErrChanged", err)
	}
	if b, _ := os.ReadFile(p); string(b) != "app's" {
		t.Fatalf("the app's version was replaced: %q", b)
	}
	// Unchanged since judged: replaced, the old one kept beside it.
	fi, _ = r.Lstat("f")
	if err := r.Replace(tmp, name, "f", ExpectOf(fi), "f.sync-conflict"); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(p); string(b) != "pulled" {
		t.Fatalf("not replaced: %q", b)
	}
	if b, _ := os.ReadFile(p + ".sync-conflict"); string(b) != "app's" {
		t.Fatalf("old version not kept: %q", b)
	}
	if _, err := tmp.Lstat(name); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("temp left behind: %v", err)
	}
}

func TestRemoveFileOnlyWhatWasJudged(t *testing.T) {
	dir := t.TempDir()
	r, _ := roots(t, dir)
	p := filepath.Join(dir, "f")
	os.WriteFile(p, []byte("v1"), 0o644)
	fi, _ := r.Lstat("f")
	want := ExpectOf(fi)
	os.Chtimes(p, time.Now(), time.Now().Add(time.Hour))
	if err := r.RemoveFile("f", want); !errors.Is(err, ErrChanged) {
		t.Fatalf("RemoveFile of a changed file: %v", err)
	}
	fi, _ = r.Lstat("f")
	if err := r.RemoveFile("f", ExpectOf(fi)); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(p); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("not removed: %v", err)
	}
}

func roots(t *testing.T, dir string) (*Root, *Root) {
	t.Helper()
	r, err := OpenRoot(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	tmp, err := r.Sub(".state")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tmp.Close() })
	return r, tmp
}

func tempWith(t *testing.T, tmp *Root, content string) string {
	t.Helper()
	f, name, err := tmp.CreateTemp(".t-")
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString(content)
	if err := SetMeta(f, 0o640, time.Unix(1e9, 5)); err != nil {
		t.Fatal(err)
	}
	f.Close()
	return name
}

func TestMetaThroughDescriptor(t *testing.T) {
	p := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(p, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	fd, err := unix.Open(p, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	mt := time.Date(2020, 2, 2, 3, 4, 5, 600, time.UTC)
	ts := []unix.Timespec{unix.NsecToTimespec(mt.UnixNano()), unix.NsecToTimespec(mt.UnixNano())}
	check := func(how string, mode os.FileMode) {
		t.Helper()
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != mode || !fi.ModTime().Equal(mt) {
			t.Fatalf("%s: mode %v mtime %v, want %v %v", how, fi.Mode().Perm(), fi.ModTime(), mode, mt)
		}
	}
	if err := ChmodFd(fd, 0o640); err != nil {
		t.Fatal(err)
	}
	if err := TimesFd(fd, ts); err != nil {
		t.Fatal(err)
	}
	check("fchmodat2/utimensat", 0o640)
	mt = mt.Add(time.Hour)
	ts = []unix.Timespec{unix.NsecToTimespec(mt.UnixNano()), unix.NsecToTimespec(mt.UnixNano())}
	if err := unix.Fchmodat(unix.AT_FDCWD, procFd(fd), 0o600, 0); err != nil {
		t.Fatal(err)
	}
	if err := unix.UtimesNanoAt(unix.AT_FDCWD, procFd(fd), ts, 0); err != nil {
		t.Fatal(err)
	}
	check("/proc/self/fd", 0o600)
}
