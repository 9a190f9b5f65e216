package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/podkeeper/podkeeper/agents/config"
	"github.com/podkeeper/podkeeper/agents/snapshot"
	"github.com/podkeeper/podkeeper/agents/store"
	"github.com/podkeeper/podkeeper/test/peers"
)

// The real round trip: the syncer binary uploads a directory and writes its
// final snapshot on SIGTERM, the directory is wiped (the Pod is gone), and the
// restore binary brings back every file byte-identical with mode and mtime.
func TestSyncerRoundTrip(t *testing.T) {
	syncer := buildSyncer(t)
	t.Run("file", func(t *testing.T) {
		dir := t.TempDir()
		testSyncerRoundTrip(t, syncer, []string{"STORE_URL=file://" + dir})
	})
	if testing.Short() {
		return
	}
	for _, kind := range peers.S3Kinds {
		t.Run(kind, func(t *testing.T) {
			srv := peers.StartS3(t, kind)
			testSyncerRoundTrip(t, syncer, srv.AgentEnv("roundtrip"))
		})
	}
}

func buildSyncer(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "syncer")
	cmd := exec.Command("go", "build", "-trimpath", "-o", bin, "./cmd/syncer")
	cmd.Dir = peers.Root()
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build the syncer (needed for the round trip): %v\n%s", err, out)
	}
	return bin
}

type localFile struct {
	data  []byte
	mode  fs.FileMode
	mtime time.Time
}

func snapshotTree(t *testing.T, dir string) map[string]localFile {
	t.Helper()
	out := map[string]localFile{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		if rel == ".podkeeper" && d.IsDir() {
			return filepath.SkipDir
		}
		if d.IsDir() {
			return nil
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		out[filepath.ToSlash(rel)] = localFile{data: b, mode: fi.Mode(), mtime: fi.ModTime()}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func testSyncerRoundTrip(t *testing.T, syncerBin string, storeEnv []string) {
	dir := filepath.Join(t.TempDir(), "uploads")
	os.MkdirAll(dir, 0o755)
	big := make([]byte, 20<<20+777) // ranged download on restore, multipart upload on the syncer
	rand.Read(big)
	files := map[string][]byte{
		"hello.txt":              []byte("hello\n"),
		"nested/a/b/c/deep.json": []byte(`{"deep":true}`),
		"nested/a/sibling.bin":   bytes.Repeat([]byte{0, 1, 2}, 10000),
		"big/video.mp4":          big,
		"empty.dat":              {},
	}
	// Some files exist before the syncer starts, the rest arrive while it runs.
	write := func(p string) {
		fp := filepath.Join(dir, p)
		os.MkdirAll(filepath.Dir(fp), 0o755)
		if err := os.WriteFile(fp, files[p], 0o640); err != nil {
			t.Fatal(err)
		}
	}
	write("hello.txt")
	write("empty.dat")

	env := append([]string{"PATH=" + os.Getenv("PATH"), "HOME=" + t.TempDir(), "SYNC_DIR=" + dir, "SYNC_HTTP_ADDR=off",
		"SYNC_SETTLE=200ms", "SYNC_SNAPSHOT_INTERVAL=0", "LOG_FORMAT=text"}, storeEnv...)
	var logb bytes.Buffer
	cmd := exec.Command(syncerBin)
	cmd.Env = env
	cmd.Stdout, cmd.Stderr = &logb, &logb
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() { syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) })
	for p := range files {
		if p != "hello.txt" && p != "empty.dat" {
			write(p)
		}
	}
	// Wait until every file is uploaded, then stop the syncer like the kubelet.
	st := openStore(t, storeEnv)
	err := peers.WaitFor(context.Background(), 60*time.Second, func() error {
		select {
		case err := <-exited:
			return fmt.Errorf("syncer exited early: %v\n%s", err, logb.String())
		default:
		}
		for p := range files {
			if _, err := st.Head(context.Background(), snapshot.DataKey(p), store.HeadOptions{}); err != nil {
				return fmt.Errorf("%s not uploaded yet: %v", p, err)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	want := snapshotTree(t, dir)
	syscall.Kill(cmd.Process.Pid, syscall.SIGTERM)
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("syncer after SIGTERM: %v\n%s", err, logb.String())
		}
	case <-time.After(60 * time.Second):
		t.Fatalf("syncer did not exit after SIGTERM\n%s", logb.String())
	}

	// The Pod is gone: so is its emptyDir.
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	code, _, stderr := runBin(t, append(storeEnv, "RESTORE_DIR="+dir))
	if code != 0 {
		t.Fatalf("restore: exit %d\n%s\nsyncer log:\n%s", code, stderr, logb.String())
	}
	got := snapshotTree(t, dir)
	if len(got) != len(want) {
		t.Fatalf("restored %d files, the syncer had %d", len(got), len(want))
	}
	for p, w := range want {
		g, ok := got[p]
		switch {
		case !ok:
			t.Errorf("%s not restored", p)
		case !bytes.Equal(g.data, w.data):
			t.Errorf("%s: content differs", p)
		case g.mode != w.mode:
			t.Errorf("%s: mode %v, want %v", p, g.mode, w.mode)
		case !g.mtime.Equal(w.mtime):
			t.Errorf("%s: mtime %v, want %v (ns precision)", p, g.mtime, w.mtime)
		}
	}
	if !strings.Contains(stderr, `"fetched_files":5`) {
		t.Errorf("restore summary: %s", stderr)
	}
}

func openStore(t *testing.T, env []string) store.Store {
	t.Helper()
	m := config.Env{}
	for _, kv := range env {
		k, v, _ := strings.Cut(kv, "=")
		m[k] = v
	}
	var c struct{ Store config.Store }
	if err := config.Load(&c, m); err != nil {
		t.Fatal(err)
	}
	st, err := store.Open(context.Background(), &c.Store, nil)
	if err != nil {
		t.Fatal(err)
	}
	return st
}
