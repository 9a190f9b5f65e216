package safefs

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// resolvers runs a test against both resolvers whatever this kernel has: the
// fallback must hold the same line as openat2.
func resolvers(t *testing.T, f func(t *testing.T, open func(root int, rel string, flags int) (int, error))) {
	if haveOpenat2() {
		t.Run("openat2", func(t *testing.T) { f(t, openBeneath) })
	} else {
		t.Log("this kernel has no usable openat2; only the walk runs")
	}
	t.Run("walk", func(t *testing.T) { f(t, openWalk) })
}

func setup(t *testing.T) (root, outside string) {
	base := t.TempDir()
	root, outside = filepath.Join(base, "root"), filepath.Join(base, "outside")
	for _, d := range []string{root + "/d/e", outside} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	write := func(p, s string) {
		if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write(root+"/d/e/ok.txt", "inside")
	write(outside+"/ok.txt", "SECRET")
	write(outside+"/token", "SECRET")
	must(t, os.Symlink(outside+"/token", root+"/final-link"))
	must(t, os.Symlink(outside, root+"/dir-link"))
	must(t, os.Symlink("e", root+"/d/rel-link"))
	must(t, syscall.Mkfifo(root+"/fifo", 0o644))
	return root, outside
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func TestOpenRefusesLinks(t *testing.T) {
	root, _ := setup(t)
	resolvers(t, func(t *testing.T, open func(int, string, int) (int, error)) {
		r, err := OpenRoot(root)
		must(t, err)
		defer r.Close()
		fd, err := open(r.fd, "d/e/ok.txt", unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC)
		if err != nil {
			t.Fatalf("plain file: %v", err)
		}
		unix.Close(fd)
		for _, rel := range []string{"final-link", "dir-link/ok.txt", "d/rel-link/ok.txt"} {
			fd, err := open(r.fd, rel, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC)
			if err == nil {
				unix.Close(fd)
				t.Errorf("%s: opened through a link", rel)
			} else if !errors.Is(err, unix.ELOOP) {
				t.Errorf("%s: %v, want ELOOP", rel, err)
			}
		}
	})
}

func TestRootAPI(t *testing.T) {
	root, _ := setup(t)
	r, err := OpenRoot(root)
	must(t, err)
	defer r.Close()
	f, err := r.Open("d/e/ok.txt")
	must(t, err)
	b, _ := io.ReadAll(f)
	f.Close()
	if string(b) != "inside" {
		t.Fatalf("read %q", b)
	}
	for rel, want := range map[string]error{
		"final-link": ErrLink, "dir-link/ok.txt": ErrLink, "d/rel-link/ok.txt": ErrLink,
		"fifo": ErrNotRegular, "d": ErrNotRegular, "../outside/ok.txt": ErrOutside, "/etc/passwd": ErrOutside,
		"d//e/ok.txt": ErrOutside, "": ErrOutside, "missing": os.ErrNotExist,
	} {
		done := make(chan error, 1)
		go func() {
			f, err := r.Open(rel)
			if err == nil {
				f.Close()
			}
			done <- err
		}()
		select {
		case err := <-done:
			if !errors.Is(err, want) {
				t.Errorf("Open(%q) = %v, want %v", rel, err, want)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("Open(%q) blocked (a FIFO must not block the reader)", rel)
		}
	}
	fi, err := r.Lstat("final-link")
	if err != nil || fi.Mode()&os.ModeSymlink == 0 {
		t.Errorf("Lstat(final-link) = %v, %v; want the link itself", fi, err)
	}
	if _, err := r.Lstat("dir-link/ok.txt"); !errors.Is(err, ErrLink) {
		t.Errorf("Lstat through a parent link = %v, want ErrLink", err)
	}
	if fi, err := r.Lstat("d/e"); err != nil || !fi.IsDir() {
		t.Errorf("Lstat(d/e) = %v, %v", fi, err)
	}
	d, err := r.OpenDir("d")
	must(t, err)
	names, _ := d.Readdirnames(-1)
	d.Close()
	if len(names) != 2 {
		t.Errorf("OpenDir(d) lists %v", names)
	}
	if _, err := r.OpenDir("dir-link"); !errors.Is(err, ErrLink) {
		t.Errorf("OpenDir(dir-link) = %v, want ErrLink", err)
	}
}

// TestSwapRace is the attack: the app renames a directory away and a link to
// an outside directory into its place, over and over, while the agent opens a
// file below it. Every open must see the real file or fail; none may read the
// outside one.
func TestSwapRace(t *testing.T) {
	resolvers(t, func(t *testing.T, open func(int, string, int) (int, error)) {
		root, outside := setup(t)
		must(t, os.WriteFile(root+"/d/token", []byte("inside"), 0o644))
		r, err := OpenRoot(root)
		must(t, err)
		defer r.Close()
		const swaps = 1000
		var escapes, opened atomic.Int64
		stop := make(chan struct{})
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 16)
			for {
				select {
				case <-stop:
					return
				default:
				}
				fd, err := open(r.fd, "d/token", unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC)
				if err != nil {
					continue
				}
				n, _ := unix.Read(fd, buf)
				unix.Close(fd)
				opened.Add(1)
				if string(buf[:n]) == "SECRET" {
					escapes.Add(1)
				}
			}
		}()
		for i := 0; i < swaps; i++ {
			must(t, os.Rename(root+"/d", root+"/d.real"))
			must(t, os.Symlink(outside, root+"/d"))
			must(t, os.Remove(root+"/d"))
			must(t, os.Rename(root+"/d.real", root+"/d"))
		}
		close(stop)
		wg.Wait()
		t.Logf("%d swaps, %d successful opens, %d escapes", swaps, opened.Load(), escapes.Load())
		if opened.Load() == 0 {
			t.Fatal("no open succeeded: the race was never run")
		}
		if escapes.Load() != 0 {
			t.Fatalf("%d of %d opens read the outside file", escapes.Load(), opened.Load())
		}
	})
}

func TestOpenRootNoFollow(t *testing.T) {
	root, _ := setup(t)
	if _, err := OpenRootNoFollow(root + "/dir-link"); !errors.Is(err, ErrLink) {
		t.Fatalf("a root that is a link: %v, want ErrLink", err)
	}
	r, err := OpenRootNoFollow(root + "/d")
	must(t, err)
	defer r.Close()
	fi, err := r.Stat()
	must(t, err)
	want, _ := os.Stat(root + "/d")
	if !os.SameFile(fi, want) {
		t.Fatal("Stat does not describe the root")
	}
}
