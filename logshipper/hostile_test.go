package logshipper_test

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/podkeeper/podkeeper/test/peers"
)

// The app container is untrusted (docs/security.md): a link to a file outside
// the log directory, a FIFO, a log directory swapped for a link to an outside
// directory 1000 times while the shipper scans, and a glob's own directory
// swapped for a link: not one line of the outside file reaches the receiver,
// the shipper never blocks, and the app's real lines all arrive.
func TestHostileLogDirs(t *testing.T) {
	if testing.Short() {
		t.Skip("needs the otelfwd peer")
	}
	r := peers.StartOtelFwd(t)
	vol, outside := t.TempDir(), t.TempDir()
	secretLines := make([]string, 200)
	for i := range secretLines {
		secretLines[i] = fmt.Sprintf("SECRET-%04d aws_secret_access_key=hunter2", i)
	}
	secret := filepath.Join(outside, "secret.log")
	must(t, os.WriteFile(secret, []byte(strings.Join(secretLines, "\n")+"\n"), 0o600))

	app, nested, own := filepath.Join(vol, "app"), filepath.Join(vol, "nested"), filepath.Join(vol, "own")
	for _, d := range []string{app, nested + "/d", nested + "/d-real", own} {
		must(t, os.MkdirAll(d, 0o755))
	}
	must(t, os.Symlink(secret, app+"/evil.log"))                 // a link to a file outside
	must(t, os.Symlink(outside, app+"/dir.log"))                 // a link to a directory named like a log
	must(t, syscall.Mkfifo(app+"/pipe.log", 0o644))              // would block a plain open forever
	must(t, os.Symlink(outside, nested+"/d-link"))               // the swap partner of nested/d
	must(t, os.Symlink(outside, filepath.Join(vol, "own-link"))) // the swap partner of a glob's directory
	good := newWriter(t, app+"/good.log", "good", 0)
	inner := newWriter(t, nested+"/d/inner.log", "inner", 0)
	good.write(100)
	inner.write(100)

	env := baseEnv(t, r, app)
	env[0] = "LOGSHIP_PATHS=" + strings.Join([]string{app + "/*.log", nested + "/*/*.log", own + "/*.log"}, ",")
	p := startShipper(t, append(env, "LOGSHIP_BATCH_RECORDS=50")...)

	// 1000 swaps of nested/d (a glob's inner directory) and 1000 of own (a
	// glob's static directory) with a link to the outside directory, each an
	// atomic RENAME_EXCHANGE, while the shipper rescans on every rename event.
	const swaps = 1000
	for i := range swaps {
		must(t, unix.Renameat2(unix.AT_FDCWD, nested+"/d", unix.AT_FDCWD, nested+"/d-link", unix.RENAME_EXCHANGE))
		must(t, unix.Renameat2(unix.AT_FDCWD, own, unix.AT_FDCWD, filepath.Join(vol, "own-link"), unix.RENAME_EXCHANGE))
		if i%100 == 0 {
			// Paced by the shipper, not the clock: it has shipped what was
			// written so far (rescanning on every swap meanwhile) before the
			// next hundred swaps.
			good.write(10)
			waitAll(t, r, p, good.expected(), 60*time.Second)
		}
	}
	// Even number of exchanges: every path is back to what it was.
	inner.write(50)
	good.write(50)
	waitAll(t, r, p, append(good.expected(), inner.expected()...), 60*time.Second)
	if n := p.metric(`podkeeper_logshipper_files_skipped_total{reason="symlink"}`); n < 3 {
		t.Errorf(`files_skipped_total{reason="symlink"} = %v, want >= 3 (evil.log, dir.log, the swapped directories)`, n)
	}
	if n := p.metric(`podkeeper_logshipper_files_skipped_total{reason="not_regular"}`); n < 1 {
		t.Errorf(`files_skipped_total{reason="not_regular"} = %v, want >= 1 (pipe.log)`, n)
	}
	if code := p.term(30 * time.Second); code != 0 {
		t.Fatalf("exit %d after SIGTERM\n%s", code, p.tail())
	}
	recs, err := r.Records()
	if err != nil {
		t.Fatal(err)
	}
	leaked := 0
	for _, rec := range recs {
		if strings.Contains(rec.Log, "SECRET-") {
			leaked++
		}
	}
	t.Logf("%d swaps of each directory, %d records received, %d lines of the outside file among them", swaps, len(recs), leaked)
	if leaked > 0 {
		t.Fatalf("%d lines of a file outside the log directories were shipped", leaked)
	}
	b, _ := os.ReadFile(p.logPath)
	logs := string(b)
	for _, want := range []string{"evil.log", "pipe.log"} {
		if !strings.Contains(logs, want) {
			t.Errorf("the log does not report the skipped %s", want)
		}
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
