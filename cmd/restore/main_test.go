package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/podkeeper/podkeeper/agents/snapshot"
	"github.com/podkeeper/podkeeper/test/peers"
)

var binPath string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "restore-bin")
	if err != nil {
		panic(err)
	}
	binPath = filepath.Join(dir, "restore")
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w", "-o", binPath, ".")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "build restore: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func runBin(t *testing.T, env []string, args ...string) (int, string, string) {
	t.Helper()
	cmd := exec.Command(binPath, args...)
	cmd.Env = append([]string{"PATH=" + os.Getenv("PATH"), "HOME=" + t.TempDir()}, env...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		return ee.ExitCode(), out.String(), errb.String()
	case err != nil:
		t.Fatal(err)
	}
	return 0, out.String(), errb.String()
}

// SIGKILL in the middle of a restore, then a rerun: it finishes, fetches only
// what was missing, leaves no temp files, and no file was ever visible under
// its final name with partial content.
func TestKillMidRestore(t *testing.T) {
	if testing.Short() {
		t.Skip("needs S3 peers")
	}
	for _, kind := range peers.S3Kinds {
		t.Run(kind, func(t *testing.T) { testKill(t, kind) })
	}
}

func testKill(t *testing.T, kind string) {
	srv := peers.StartS3(t, kind)
	proxy := peers.NewCountingProxy(t, srv.Endpoint)
	const early, late = 60, 40
	want := map[string][]byte{}
	for i := range early {
		want[fmt.Sprintf("a-early/%03d.bin", i)] = bytes.Repeat([]byte{byte(i), 'e'}, 8<<10)
	}
	for i := range late {
		want[fmt.Sprintf("b-late/%03d.bin", i)] = bytes.Repeat([]byte{byte(i), 'l'}, 8<<10)
	}
	big := make([]byte, 40<<20)
	for i := range big {
		big[i] = byte(i * 7 / 5)
	}
	want["c-big/blob"] = big
	putS3Snapshot(t, srv, "kill", want)

	// Requests for the late files and for the big file's later ranges wait at
	// a gate: the restore is provably mid-way, with temp files open, when killed.
	gate := make(chan struct{})
	var gateOnce sync.Once
	open := func() { gateOnce.Do(func() { close(gate) }) }
	defer open()
	proxy.FailWith(http.StatusServiceUnavailable, func(r *http.Request) bool {
		if r.Method == http.MethodGet && (strings.Contains(r.URL.Path, "/b-late/") ||
			strings.Contains(r.URL.Path, "/c-big/") && !strings.HasPrefix(r.Header.Get("Range"), "bytes=0-")) {
			<-gate
		}
		return false
	})

	dir := filepath.Join(t.TempDir(), "data")
	env := append(srv.AgentEnv("kill"), "S3_ENDPOINT="+proxy.URL, "RESTORE_DIR="+dir, "RESTORE_CONCURRENCY=4")
	stopWatch, violations := watchFinalNames(t, dir, want)
	defer stopWatch()

	p := &peers.Process{Name: "restore", Args: []string{binPath}, Env: env, Dir: t.TempDir(), Log: filepath.Join(t.TempDir(), "restore1.log")}
	if err := p.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Stop)
	tmpDir := filepath.Join(dir, ".podkeeper", "restore-tmp")
	err := peers.WaitFor(context.Background(), 60*time.Second, func() error {
		if p.Exited() {
			return errors.New("restore exited before it could be killed")
		}
		done := 0
		for name := range want {
			if strings.HasPrefix(name, "a-early/") {
				if _, err := os.Stat(filepath.Join(dir, name)); err == nil {
					done++
				}
			}
		}
		// Downloads in flight write unnamed temp files (O_TMPFILE) in the
		// temp dir, or named ones where the filesystem has no O_TMPFILE.
		ents, _ := os.ReadDir(tmpDir)
		if n := len(ents) + openUnder(p.Pid(), tmpDir); done < early || n < 4 {
			return fmt.Errorf("%d/%d early files, %d temp files", done, early, n)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("%v\n%s", err, p.Tail())
	}
	p.Stop() // SIGKILL
	open()
	// Unnamed temp files go with the process; named ones are the rerun's to
	// clear.
	ents, _ := os.ReadDir(tmpDir)
	named := len(ents) > 0
	if _, err := os.Stat(filepath.Join(dir, ".podkeeper", "restored.json")); !os.IsNotExist(err) {
		t.Fatalf("restored.json present after a kill: %v", err)
	}
	proxy.FailWith(0, nil)
	proxy.Reset()

	code, _, stderr := runBin(t, env)
	if code != 0 {
		t.Fatalf("rerun: exit %d\n%s", code, stderr)
	}
	if named && !strings.Contains(stderr, "removed temp files of an interrupted run") {
		t.Errorf("rerun did not clear the temp files:\n%s", stderr)
	}
	// Only what was missing is fetched again: the late files (plus the manifest)
	// and the big file's ranges.
	if got := proxy.Count("GET"); got != late+1 {
		t.Errorf("rerun made %d GETs, want %d (%v)", got, late+1, proxy.Counts())
	}
	if got := proxy.Count("GET-range"); got != 5 {
		t.Errorf("rerun made %d ranged GETs, want 5", got)
	}
	stopWatch()
	if v := violations(); len(v) > 0 {
		t.Errorf("partial files seen under final names: %v", v)
	}
	for name, data := range want {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil || !bytes.Equal(b, data) {
			t.Fatalf("%s: %v, %d bytes", name, err, len(b))
		}
	}
	if ents, _ := os.ReadDir(tmpDir); len(ents) != 0 {
		t.Errorf("temp files left: %v", ents)
	}
	if _, err := os.Stat(filepath.Join(dir, ".podkeeper", "restored.json")); err != nil {
		t.Errorf("restored.json: %v", err)
	}
}

// openUnder counts the descriptors of process pid open on files in dir
// (unnamed O_TMPFILE files show as "dir/#INODE (deleted)").
func openUnder(pid int, dir string) int {
	fds, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	n := 0
	for _, fd := range fds {
		if target, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name())); err == nil && strings.HasPrefix(target, dir+"/") {
			n++
		}
	}
	return n
}

// watchFinalNames polls dir until stopped and records every file seen under a
// final name whose size or content is not the complete one.
func watchFinalNames(t *testing.T, dir string, want map[string][]byte) (stop func(), violations func() []string) {
	ctx, cancel := context.WithCancel(context.Background())
	var mu sync.Mutex
	var bad []string
	checked := map[string]bool{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		peers.WaitFor(ctx, time.Hour, func() error {
			filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
				if err != nil {
					return nil
				}
				rel, _ := filepath.Rel(dir, p)
				if rel == ".podkeeper" {
					return filepath.SkipDir
				}
				if d.IsDir() || checked[rel] {
					return nil
				}
				data, ok := want[filepath.ToSlash(rel)]
				b, rerr := os.ReadFile(p)
				if rerr != nil {
					return nil
				}
				if !ok || !bytes.Equal(b, data) {
					mu.Lock()
					bad = append(bad, fmt.Sprintf("%s (%d of %d bytes)", rel, len(b), len(data)))
					mu.Unlock()
				}
				checked[rel] = true
				return nil
			})
			return errors.New("keep watching")
		})
	}()
	var once sync.Once
	return func() { once.Do(func() { cancel(); <-done }) }, func() []string {
		mu.Lock()
		defer mu.Unlock()
		return append([]string(nil), bad...)
	}
}

func putS3Snapshot(t *testing.T, srv *peers.S3Server, prefix string, files map[string][]byte) {
	t.Helper()
	ctx := context.Background()
	c := srv.Client()
	m := &snapshot.Manifest{Format: snapshot.Format, ID: snapshot.NewID(time.Now(), "kill"), Created: time.Now().UTC(), Files: []snapshot.File{}}
	sem := make(chan struct{}, 8)
	var wg sync.WaitGroup
	var mu sync.Mutex
	for p, data := range files {
		h := sha256.Sum256(data)
		f := snapshot.File{Path: p, Size: int64(len(data)), SHA256: hex.EncodeToString(h[:]), MTime: time.Unix(1700000000, 123), Mode: 0o640}
		m.Files = append(m.Files, f)
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			_, err := c.PutObject(ctx, &s3.PutObjectInput{Bucket: aws.String(peers.Bucket), Key: aws.String(prefix + "/" + snapshot.DataKey(p)),
				Body: bytes.NewReader(data), Metadata: f.Metadata()})
			if err != nil {
				mu.Lock()
				t.Errorf("put %s: %v", p, err)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	// Manifest order is download order: early files first.
	slices.SortFunc(m.Files, func(a, b snapshot.File) int { return strings.Compare(a.Path, b.Path) })
	var buf bytes.Buffer
	if err := snapshot.Encode(&buf, m, true); err != nil {
		t.Fatal(err)
	}
	if _, err := c.PutObject(ctx, &s3.PutObjectInput{Bucket: aws.String(peers.Bucket), Key: aws.String(prefix + "/" + snapshot.Key(m.ID, true)), Body: bytes.NewReader(buf.Bytes())}); err != nil {
		t.Fatal(err)
	}
}
