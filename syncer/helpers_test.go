package syncer

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/fsnotify/fsnotify"
	dto "github.com/prometheus/client_model/go"

	"github.com/podkeeper/podkeeper/agents/changelog"
	"github.com/podkeeper/podkeeper/agents/config"
	"github.com/podkeeper/podkeeper/agents/events"
	"github.com/podkeeper/podkeeper/agents/health"
	"github.com/podkeeper/podkeeper/agents/lifecycle"
	"github.com/podkeeper/podkeeper/agents/snapshot"
	"github.com/podkeeper/podkeeper/agents/store"
	_ "github.com/podkeeper/podkeeper/agents/store/backends"
	"github.com/podkeeper/podkeeper/test/peers"
)

var syncerBin string

func TestMain(m *testing.M) {
	code := func() int {
		flag.Parse()
		if testing.Short() {
			return m.Run()
		}
		dir, err := os.MkdirTemp("", "syncer-bin-")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer os.RemoveAll(dir)
		syncerBin = filepath.Join(dir, "syncer")
		cmd := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w", "-o", syncerBin, "../cmd/syncer")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "build syncer: %v\n%s", err, out)
			return 1
		}
		return m.Run()
	}()
	os.Exit(code)
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	return ctx
}

// testConfig is a loaded configuration for dir on endpoint under prefix.
func testConfig(t *testing.T, srv *peers.S3Server, endpoint, prefix, dir string, extra ...string) *Config {
	t.Helper()
	env := lifecycle.EnvMap(srv.AgentEnv(prefix))
	env["S3_ENDPOINT"] = endpoint
	env["SYNC_DIR"] = dir
	env["SYNC_HTTP_ADDR"] = "off"
	env["POD_NAME"] = "pod-test"
	env["SYNC_SETTLE"] = "300ms"
	env["SYNC_SNAPSHOT_INTERVAL"] = "0"
	for k, v := range lifecycle.EnvMap(extra) {
		env[k] = v
	}
	var c Config
	if err := config.Load(&c, env); err != nil {
		t.Fatal(err)
	}
	return &c
}

// recorder keeps every event for assertions.
type recorder struct {
	mu     sync.Mutex
	events []string
}

func (r *recorder) Event(_ context.Context, t events.Type, reason, message string) {
	r.mu.Lock()
	r.events = append(r.events, string(t)+" "+reason+": "+message)
	r.mu.Unlock()
}

func (r *recorder) has(reason string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, e := range r.events {
		if strings.Contains(e, " "+reason+":") {
			return true
		}
	}
	return false
}

// running is an in-process syncer.
type running struct {
	s    *Syncer
	rec  *recorder
	st   *recordingStore
	errc chan error
	stop context.CancelFunc
}

// startSyncer runs a syncer in-process with real dependencies, as the binary
// does, except that the recorder and the store record what they are told;
// with is applied to the syncer before Run.
func startSyncer(t *testing.T, cfg *Config, with ...func(*Syncer)) *running {
	t.Helper()
	r := &running{rec: &recorder{}, errc: make(chan error, 1)}
	log := slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo}))
	st, err := store.Open(context.Background(), &cfg.Store, log)
	if err != nil {
		t.Fatal(err)
	}
	r.st = &recordingStore{Store: st}
	s, err := New(cfg, lifecycle.Deps{Log: log, Events: r.rec, Health: health.New("syncer"), Store: r.st.wrap(),
		DrainTimeout: cfg.DrainTimeout()})
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range with {
		f(s)
	}
	r.s = s
	ctx, cancel := context.WithCancel(context.Background())
	r.stop = cancel
	go func() { r.errc <- s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-r.errc:
		case <-time.After(time.Minute):
			t.Error("syncer did not stop")
		}
	})
	waitReady(t, r)
	return r
}

// recordingStore is the syncer's store, noting every data object written
// as the file its metadata describes: what was uploaded, and when, without a
// hook in the syncer.
type recordingStore struct {
	store.Store
	mu      sync.Mutex
	uploads []snapshot.File
}

// wrap keeps the multipart capability of the store underneath, so the
// syncer takes the same paths as with the real one.
func (r *recordingStore) wrap() store.Store {
	if mp, ok := r.Store.(store.Multiparter); ok {
		return &recordingMultiparter{recordingStore: r, mp: mp}
	}
	return r
}

func (r *recordingStore) note(key string, size int64, meta map[string]string) {
	rel, ok := strings.CutPrefix(key, snapshot.DataDir)
	if !ok {
		return
	}
	f, err := snapshot.FileFromMetadata(rel, size, meta)
	if err != nil {
		f = snapshot.File{Path: rel, Size: size, SHA256: meta[snapshot.MetaSHA256]}
	}
	r.mu.Lock()
	r.uploads = append(r.uploads, f)
	r.mu.Unlock()
}

func (r *recordingStore) Put(ctx context.Context, key string, rd io.Reader, size int64, opts store.PutOptions) (store.ObjectInfo, error) {
	info, err := r.Store.Put(ctx, key, rd, size, opts)
	if err == nil {
		r.note(key, size, opts.Metadata)
	}
	return info, err
}

type recordingMultiparter struct {
	*recordingStore
	mp store.Multiparter
}

func (r *recordingMultiparter) UploadFileResumable(ctx context.Context, key string, f io.ReaderAt, size int64, j *store.MultipartJournal, o store.MultipartOptions) (store.ObjectInfo, error) {
	info, err := r.mp.UploadFileResumable(ctx, key, f, size, j, o)
	if err == nil {
		r.note(key, size, o.Metadata)
	}
	return info, err
}

func (r *recordingMultiparter) ListMultipartUploads(ctx context.Context, prefix string) ([]store.MultipartUpload, error) {
	return r.mp.ListMultipartUploads(ctx, prefix)
}

func (r *recordingMultiparter) AbortMultipart(ctx context.Context, key, uploadID string) error {
	return r.mp.AbortMultipart(ctx, key, uploadID)
}

// probe asks the syncer's health handler for path, as the kubelet would.
func probe(r *running, path string) (int, string) {
	w := httptest.NewRecorder()
	r.s.health.Handler().ServeHTTP(w, httptest.NewRequest(http.MethodGet, path, nil))
	return w.Code, w.Body.String()
}

func waitReady(t *testing.T, r *running) {
	t.Helper()
	err := peers.WaitFor(context.Background(), 60*time.Second, func() error {
		select {
		case err := <-r.errc:
			r.errc <- err
			return fmt.Errorf("syncer exited: %v", err)
		default:
		}
		w := httptest.NewRecorder()
		r.s.health.Handler().ServeHTTP(w, httptest.NewRequest(http.MethodGet, "/readyz", nil))
		if w.Code != http.StatusOK {
			return errors.New(w.Body.String())
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// shutdown cancels the syncer (SIGTERM in-process) and returns Run's error.
func (r *running) shutdown(t *testing.T) error {
	t.Helper()
	r.stop()
	select {
	case err := <-r.errc:
		r.errc <- err
		return err
	case <-time.After(time.Minute):
		t.Fatal("syncer did not drain within a minute")
		return nil
	}
}

// uploadsOf lists the objects written for rel (attempts that the syncer
// then found changed included).
func (r *running) uploadsOf(rel string) []snapshot.File {
	r.st.mu.Lock()
	defer r.st.mu.Unlock()
	var out []snapshot.File
	for _, f := range r.st.uploads {
		if f.Path == rel {
			out = append(out, f)
		}
	}
	return out
}

func gaugeValue(h *health.Server, name string) float64 {
	mfs, _ := h.Registry.Gather()
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		var sum float64
		for _, m := range mf.GetMetric() {
			sum += metricValue(m)
		}
		return sum
	}
	return 0
}

func metricValue(m *dto.Metric) float64 {
	switch {
	case m.GetGauge() != nil:
		return m.GetGauge().GetValue()
	case m.GetCounter() != nil:
		return m.GetCounter().GetValue()
	}
	return 0
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(b), "\n"))
	return len(b), nil
}

// getObject returns an object's bytes and metadata through the raw SDK.
func getObject(ctx context.Context, srv *peers.S3Server, key string) ([]byte, map[string]string, error) {
	out, err := srv.Client().GetObject(ctx, &s3.GetObjectInput{Bucket: aws.String(peers.Bucket), Key: aws.String(key)})
	if err != nil {
		return nil, nil, err
	}
	defer out.Body.Close()
	b, err := io.ReadAll(out.Body)
	return b, out.Metadata, err
}

// waitObject waits until prefix/data/rel holds want, with matching metadata.
func waitObject(t *testing.T, srv *peers.S3Server, prefix, rel string, want []byte, timeout time.Duration) {
	t.Helper()
	sum := sha256.Sum256(want)
	err := peers.WaitFor(context.Background(), timeout, func() error {
		got, meta, err := getObject(context.Background(), srv, prefix+"/data/"+rel)
		if err != nil {
			return err
		}
		if !bytes.Equal(got, want) {
			return fmt.Errorf("%s: %d bytes, want %d", rel, len(got), len(want))
		}
		if meta["sha256"] != hex.EncodeToString(sum[:]) {
			return fmt.Errorf("%s: metadata sha256 %q", rel, meta["sha256"])
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func objectExists(srv *peers.S3Server, key string) bool {
	_, err := srv.Client().HeadObject(context.Background(), &s3.HeadObjectInput{Bucket: aws.String(peers.Bucket), Key: aws.String(key)})
	return err == nil
}

func writeFile(t *testing.T, p string, b []byte) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

func randBytes(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// s3Store is the store a syncer on prefix writes, for snapshot assertions.
func s3Store(t *testing.T, srv *peers.S3Server, prefix string) store.Store {
	t.Helper()
	st, err := store.Open(context.Background(), srv.StoreConfig(t, prefix), nil)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func latestSnapshot(t *testing.T, st store.Store) (*snapshot.Manifest, error) {
	t.Helper()
	// What a restore of "latest" plans from: the fold of the change log.
	return changelog.Fold(context.Background(), st, time.Time{})
}

// keyCounter is a reverse proxy that counts writes by key, so a test can say
// which objects a syncer wrote (peers.CountingProxy counts by kind only).
type keyCounter struct {
	URL string
	mu  sync.Mutex
	put map[string]int // "METHOD key"
	ok  map[string]int // the same, answered 2xx
}

type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(code int) { w.status = code; w.ResponseWriter.WriteHeader(code) }

func newKeyCounter(t *testing.T, target string) *keyCounter {
	u, _ := url.Parse(target)
	k := &keyCounter{put: map[string]int{}, ok: map[string]int{}}
	rp := httputil.NewSingleHostReverseProxy(u)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		write := r.Method == http.MethodPut || r.Method == http.MethodPost || r.Method == http.MethodDelete
		name := r.Method + " " + strings.TrimPrefix(r.URL.Path, "/"+peers.Bucket+"/")
		if write {
			k.mu.Lock()
			k.put[name]++
			k.mu.Unlock()
		}
		sw := &statusWriter{ResponseWriter: w, status: http.StatusOK}
		rp.ServeHTTP(sw, r)
		if write && sw.status/100 == 2 {
			k.mu.Lock()
			k.ok[name]++
			k.mu.Unlock()
		}
	}))
	t.Cleanup(srv.Close)
	k.URL = srv.URL
	return k
}

// writes lists the write requests whose key contains part.
func (k *keyCounter) writes(part string) []string {
	k.mu.Lock()
	defer k.mu.Unlock()
	var out []string
	for key, n := range k.put {
		if strings.Contains(key, part) {
			out = append(out, fmt.Sprintf("%s x%d", key, n))
		}
	}
	return out
}

// okWrites counts the write requests to exactly key that succeeded.
func (k *keyCounter) okWrites(method, key string) int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.ok[method+" "+key]
}

// proc runs the syncer binary.
type proc struct {
	cmd  *exec.Cmd
	out  *peers.LockedBuffer
	done chan struct{}
	code int
}

func startBin(t *testing.T, env []string) *proc {
	t.Helper()
	p := &proc{out: &peers.LockedBuffer{}, done: make(chan struct{})}
	p.cmd = exec.Command(syncerBin)
	p.cmd.Env = append([]string{"PATH=" + os.Getenv("PATH"), "HOME=" + t.TempDir(), "LOG_FORMAT=text"}, env...)
	p.cmd.Stdout = p.out
	p.cmd.Stderr = p.out
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		_ = p.cmd.Wait()
		p.code = p.cmd.ProcessState.ExitCode()
		close(p.done)
	}()
	t.Cleanup(func() {
		_ = p.cmd.Process.Kill()
		<-p.done
		if t.Failed() {
			t.Logf("syncer output:\n%s", p.output())
		}
	})
	return p
}

func (p *proc) output() string {
	return p.out.String()
}

// wait waits for the process to exit and returns its exit code.
func (p *proc) wait(t *testing.T, timeout time.Duration) int {
	t.Helper()
	select {
	case <-p.done:
		return p.code
	case <-time.After(timeout):
		t.Fatalf("syncer still running after %s\n%s", timeout, p.output())
		return -1
	}
}

func (p *proc) waitLog(t *testing.T, substr string, timeout time.Duration) {
	t.Helper()
	err := peers.WaitFor(context.Background(), timeout, func() error {
		if strings.Contains(p.output(), substr) {
			return nil
		}
		select {
		case <-p.done:
			return fmt.Errorf("exited with %d before logging %q", p.code, substr)
		default:
		}
		return fmt.Errorf("no %q in the log yet", substr)
	})
	if err != nil {
		t.Fatalf("%v\n%s", err, p.output())
	}
}

// pausedNotifier is fsnotify whose events stop reaching the syncer while mu
// is held: fsnotify's reader then blocks and the kernel queue overflows, as
// under a burst the syncer cannot keep up with.
type pausedNotifier struct {
	notifier
	mu     sync.RWMutex
	events chan fsnotify.Event
	done   chan struct{}
}

// install makes s watch through p.
func (p *pausedNotifier) install(s *Syncer) {
	s.newNotifier = func() (notifier, error) {
		n, err := newFSNotifier()
		if err != nil {
			return nil, err
		}
		p.notifier, p.events, p.done = n, make(chan fsnotify.Event), make(chan struct{})
		go p.forward()
		return p, nil
	}
}

func (p *pausedNotifier) forward() {
	for ev := range p.notifier.Events() {
		p.mu.RLock() // waits while the test holds mu
		p.mu.RUnlock()
		select {
		case p.events <- ev:
		case <-p.done:
			return
		}
	}
}

func (p *pausedNotifier) Events() <-chan fsnotify.Event { return p.events }

func (p *pausedNotifier) Close() error {
	close(p.done)
	return p.notifier.Close()
}
