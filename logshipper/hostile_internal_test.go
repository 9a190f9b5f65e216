package logshipper

import (
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"
)

// TestScanSwapRace scans while a directory below the glob's base and the
// glob's base itself are swapped with links to an outside directory (at
// least 1000 times each, during at least 500 scans): the tailer never holds the outside file open, while a plain
// glob + stat (the old scan) reaches it.
func TestScanSwapRace(t *testing.T) {
	vol, outside := t.TempDir(), t.TempDir()
	secret := filepath.Join(outside, "secret.log")
	if err := os.WriteFile(secret, []byte("SECRET\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	var sst unix.Stat_t
	if err := unix.Stat(secret, &sst); err != nil {
		t.Fatal(err)
	}
	secretID := fileID{Dev: uint64(sst.Dev), Ino: sst.Ino}
	for _, d := range []string{vol + "/n/d", vol + "/own"} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(d+"/ok.log", []byte("ok\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(outside, d+"-link"); err != nil {
			t.Fatal(err)
		}
	}
	tt, _ := newTestTailer(t, vol, nil)
	tt.cfg.Paths = []string{vol + "/n/*/*.log", vol + "/own/*.log"}
	tt.roots = newGlobRoots(tt.cfg.Paths)

	const minSwaps, minScans = 1000, 500
	var swaps atomic.Int64
	stop, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			default:
			}
			for _, d := range []string{vol + "/n/d", vol + "/own"} {
				if err := unix.Renameat2(unix.AT_FDCWD, d, unix.AT_FDCWD, d+"-link", unix.RENAME_EXCHANGE); err != nil {
					panic(err)
				}
			}
			swaps.Add(1)
		}
	}()
	scans, escapes, plainScans, plainEscapes := 0, 0, 0, 0
	for swaps.Load() < minSwaps || scans < minScans {
		tt.scan()
		scans++
		if tt.files[secretID] != nil {
			escapes++
			tt.files[secretID].f.Close()
			delete(tt.files, secretID)
		}
		// What the scan did before: filepath.Glob and os.Stat by path.
		for _, g := range tt.cfg.Paths {
			paths, _ := filepath.Glob(g)
			for _, p := range paths {
				plainScans++
				if fi, err := os.Stat(p); err == nil && statID(fi) == secretID {
					plainEscapes++
				}
			}
		}
	}
	close(stop)
	<-done
	t.Logf("%d swaps of each directory: %d scans, %d opened the outside file; a plain glob+stat reached it %d times in %d looks",
		swaps.Load(), scans, escapes, plainEscapes, plainScans)
	if escapes > 0 {
		t.Fatalf("the outside file was opened in %d of %d scans", escapes, scans)
	}
}
