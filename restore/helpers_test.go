package restore

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/podkeeper/podkeeper/agents/config"
	"github.com/podkeeper/podkeeper/agents/events"
	"github.com/podkeeper/podkeeper/agents/lifecycle"
	"github.com/podkeeper/podkeeper/agents/snapshot"
	"github.com/podkeeper/podkeeper/agents/store"
	_ "github.com/podkeeper/podkeeper/agents/store/backends"
	"github.com/podkeeper/podkeeper/agents/store/file"
	"github.com/podkeeper/podkeeper/test/peers"
)

// target is where a test's snapshots live: a prefix on an S3 peer (possibly
// reached through a counting proxy) or a file:// directory.
type target struct {
	env map[string]string // STORE_URL and S3 variables
	st  store.Store
}

// s3Target opens prefix on srv, through endpoint when not empty (a proxy).
func s3Target(t *testing.T, srv *peers.S3Server, prefix, endpoint string) *target {
	t.Helper()
	env := lifecycle.EnvMap(srv.AgentEnv(prefix))
	if endpoint != "" {
		env["S3_ENDPOINT"] = endpoint
	}
	var c struct{ Store config.Store }
	if err := config.Load(&c, env); err != nil {
		t.Fatal(err)
	}
	st, err := store.Open(context.Background(), &c.Store, testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	return &target{env: env, st: st}
}

func fileTarget(t *testing.T) *target {
	t.Helper()
	dir := t.TempDir()
	st, err := file.New(dir)
	if err != nil {
		t.Fatal(err)
	}
	return &target{env: map[string]string{"STORE_URL": "file://" + dir}, st: st}
}

func testLog(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(b), "\n"))
	return len(b), nil
}

// recorder keeps events for assertions.
type recorder struct {
	mu  sync.Mutex
	got []string
}

func (r *recorder) Event(_ context.Context, t events.Type, reason, msg string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.got = append(r.got, string(t)+" "+reason+": "+msg)
}

func (r *recorder) all() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return strings.Join(r.got, "\n")
}

// cfg loads a Config the way the binary does, from variables.
func (tg *target) cfg(t *testing.T, dir string, kv ...string) *Config {
	t.Helper()
	env := config.Env{"RESTORE_DIR": dir}
	for k, v := range tg.env {
		env[k] = v
	}
	for i := 0; i+1 < len(kv); i += 2 {
		env[kv[i]] = kv[i+1]
	}
	var c Config
	if err := config.Load(&c, env); err != nil {
		t.Fatal(err)
	}
	return &c
}

// run restores dir from tg with extra variables.
func (tg *target) run(t *testing.T, dir string, kv ...string) (*Result, *recorder, error) {
	t.Helper()
	rec := &recorder{}
	r := New(tg.cfg(t, dir, kv...), lifecycle.Deps{Store: tg.st, Log: testLog(t), Events: rec})
	// Small parts, so that a few MiB exercise the ranged path.
	r.partSize, r.rangeThreshold = 1<<20, 3<<20
	res, err := r.Run(context.Background())
	return res, rec, err
}

// entry is a file of a hand-built snapshot.
type entry struct {
	data  []byte
	mode  snapshot.Mode
	mtime time.Time
}

var baseTime = time.Date(2026, 3, 4, 5, 6, 7, 123456789, time.UTC)

// sampleFiles is a small tree with nested dirs, an empty file and odd modes.
func sampleFiles(seed string) map[string]entry {
	m := map[string]entry{
		"a.txt":               {data: []byte("alpha " + seed), mode: 0o644},
		"empty":               {data: nil, mode: 0o600},
		"dir/b.bin":           {data: bytes.Repeat([]byte{1, 2, 3, seed[0]}, 5000), mode: 0o640},
		"dir/sub/c.txt":       {data: []byte("gamma " + seed), mode: 0o755},
		"dir/sub/deep/d.json": {data: []byte(`{"d":"` + seed + `"}`), mode: 0o444},
		"uploads/ü ñ spaced":  {data: []byte("unicode " + seed), mode: 0o644},
	}
	i := 0
	for _, p := range sortedKeys(m) {
		e := m[p]
		e.mtime = baseTime.Add(time.Duration(i) * 1001 * time.Microsecond)
		m[p] = e
		i++
	}
	return m
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

func sum(b []byte) string {
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:])
}

// putSnapshot uploads files as data objects (with the metadata the syncer
// writes) and a manifest created at created.
func (tg *target) putSnapshot(t *testing.T, created time.Time, files map[string]entry) *snapshot.Manifest {
	t.Helper()
	ctx := context.Background()
	m := &snapshot.Manifest{Format: snapshot.Format, ID: snapshot.NewID(created, "test"), Created: created, Files: []snapshot.File{}}
	for _, p := range sortedKeys(files) {
		e := files[p]
		f := snapshot.File{Path: p, Size: int64(len(e.data)), SHA256: sum(e.data), MTime: e.mtime, Mode: e.mode}
		info, err := tg.st.Put(ctx, snapshot.DataKey(p), bytes.NewReader(e.data), f.Size, store.PutOptions{Metadata: f.Metadata()})
		if err != nil {
			t.Fatalf("put %s: %v", p, err)
		}
		f.ETag = info.ETag
		m.Files = append(m.Files, f)
	}
	if _, err := snapshot.Write(ctx, tg.st, m); err != nil {
		t.Fatalf("write snapshot: %v", err)
	}
	return m
}

// putRaw stores a manifest body as is (hostile cases bypass Encode).
func (tg *target) putRaw(t *testing.T, id string, body []byte) {
	t.Helper()
	if _, err := tg.st.Put(context.Background(), snapshot.Key(id, false), bytes.NewReader(body), int64(len(body)), store.PutOptions{}); err != nil {
		t.Fatal(err)
	}
}

// assertTree checks that dir holds exactly files (state dir aside), with
// content, mode and nanosecond mtime.
func assertTree(t *testing.T, dir string, files map[string]entry) {
	t.Helper()
	got := listTree(t, dir)
	want := sortedKeys(files)
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("files in %s:\n%s\nwant:\n%s", dir, strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	for _, p := range want {
		e := files[p]
		fp := filepath.Join(dir, filepath.FromSlash(p))
		b, err := os.ReadFile(fp)
		if err != nil && e.mode&0o400 != 0 {
			t.Fatal(err)
		}
		if err == nil && !bytes.Equal(b, e.data) {
			t.Errorf("%s: content differs (%d bytes, want %d)", p, len(b), len(e.data))
		}
		fi, err := os.Lstat(fp)
		if err != nil {
			t.Fatal(err)
		}
		if !fi.Mode().IsRegular() || uint32(fi.Mode().Perm()) != uint32(e.mode) {
			t.Errorf("%s: mode %v, want %v", p, fi.Mode(), e.mode)
		}
		if !fi.ModTime().Equal(e.mtime) {
			t.Errorf("%s: mtime %v, want %v", p, fi.ModTime().UTC(), e.mtime)
		}
	}
}

// listTree lists regular files and links under dir, leaving out the state dir.
func listTree(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		if rel == StateDirName && d.IsDir() {
			return filepath.SkipDir
		}
		if !d.IsDir() {
			out = append(out, filepath.ToSlash(rel))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(out)
	return out
}

// assertNoTemp checks that no temp file is left in the state dir.
func assertNoTemp(t *testing.T, stateDir string) {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join(stateDir, TmpDirName))
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	if len(ents) > 0 {
		t.Errorf("temp files left: %v", ents)
	}
}

// fingerprint describes every entry below dir (path, type, size, content hash,
// link target), to prove a run changed nothing there.
func fingerprint(t *testing.T, dir string) string {
	t.Helper()
	var b strings.Builder
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		fmt.Fprintf(&b, "%s %v %d", p, fi.Mode(), fi.Size())
		switch {
		case fi.Mode()&fs.ModeSymlink != 0:
			l, _ := os.Readlink(p)
			fmt.Fprintf(&b, " -> %s", l)
		case fi.Mode().IsRegular():
			f, err := os.Open(p)
			if err == nil {
				h := sha256.New()
				io.Copy(h, f)
				f.Close()
				fmt.Fprintf(&b, " %x", h.Sum(nil))
			}
		}
		b.WriteByte('\n')
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return b.String()
}

func writeLocal(t *testing.T, dir, rel string, data []byte) {
	t.Helper()
	p := filepath.Join(dir, filepath.FromSlash(rel))
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, data, 0o644); err != nil {
		t.Fatal(err)
	}
}
