package restore

import (
	"errors"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestSetMetaSwapRace: while setMeta gives a restored file its mode and
// mtime, another process swaps the file with a link to a file outside the
// tree (RENAME_EXCHANGE, at least 1000 swaps during 100 000 calls). The outside file's mode and
// mtime never change.
func TestSetMetaSwapRace(t *testing.T) {
	dir, outside := t.TempDir(), t.TempDir()
	secret := filepath.Join(outside, "secret")
	if err := os.WriteFile(secret, []byte("SECRET"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(secret, 0o600); err != nil {
		t.Fatal(err)
	}
	old := time.Date(2001, 1, 1, 0, 0, 0, 0, time.UTC)
	if err := os.Chtimes(secret, old, old); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(dir+"/d", 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dir+"/d/f", []byte("restored"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(secret, dir+"/d/f-link"); err != nil {
		t.Fatal(err)
	}
	tr, err := openTree(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()

	const minSwaps = 1000
	var swaps atomic.Int64
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			default:
			}
			if err := unix.Renameat2(unix.AT_FDCWD, dir+"/d/f", unix.AT_FDCWD, dir+"/d/f-link", unix.RENAME_EXCHANGE); err != nil {
				panic(err)
			}
			swaps.Add(1)
		}
	}()
	mtime := time.Date(2020, 2, 2, 0, 0, 0, 0, time.UTC)
	calls, refused := 0, 0
	for swaps.Load() < minSwaps || calls < 100_000 {
		var ce *ConflictError
		if err := tr.setMeta("d/f", 0o777, mtime); errors.As(err, &ce) {
			refused++
		} else if err != nil {
			t.Fatal(err)
		}
		calls++
	}
	close(stop)
	<-done
	fi, err := os.Stat(secret)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%d swaps, %d setMeta calls (%d refused: a link was there); outside file mode %v mtime %v",
		swaps.Load(), calls, refused, fi.Mode().Perm(), fi.ModTime().UTC())
	if fi.Mode().Perm() != 0o600 || !fi.ModTime().Equal(old) {
		t.Fatalf("setMeta changed a file outside the tree through a swapped link: mode %v mtime %v", fi.Mode().Perm(), fi.ModTime())
	}
}

// Both ways of changing an O_PATH descriptor's inode set what was asked, on
// the file itself.
