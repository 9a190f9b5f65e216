package logshipper_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/podkeeper/podkeeper/test/peers"
)

var (
	binOnce sync.Once
	binPath string
	binErr  error
	binDir  string
)

func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
}

// shipperBin builds cmd/logshipper once per test run with the release flags.
func shipperBin(t *testing.T) string {
	t.Helper()
	binOnce.Do(func() {
		binDir, binErr = os.MkdirTemp("", "logshipper-bin-")
		if binErr != nil {
			return
		}
		binPath = filepath.Join(binDir, "logshipper")
		cmd := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w", "-o", binPath, "./cmd/logshipper")
		cmd.Dir = peers.Root()
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			binErr = fmt.Errorf("build logshipper: %v\n%s", err, out)
		}
	})
	if binErr != nil {
		t.Fatal(binErr)
	}
	return binPath
}

// proc is the logshipper binary running as a child process.
type proc struct {
	t       *testing.T
	env     []string
	logPath string
	http    string
	cmd     *exec.Cmd
	done    chan struct{}
	exit    int
}

// startShipper runs the binary with env plus a random health port and waits
// for /readyz.
func startShipper(t *testing.T, env ...string) *proc {
	t.Helper()
	p := &proc{t: t, env: env, logPath: filepath.Join(t.TempDir(), "logshipper.log")}
	p.start()
	t.Cleanup(p.kill)
	return p
}

func (p *proc) start() {
	t := p.t
	t.Helper()
	p.http = "127.0.0.1:" + strconv.Itoa(peers.FreePort(t))
	logf, err := os.OpenFile(p.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(shipperBin(t))
	cmd.Env = append([]string{"PATH=" + os.Getenv("PATH"), "LOG_FORMAT=text", "LOG_LEVEL=debug", "LOGSHIP_HTTP_ADDR=" + p.http}, p.env...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p.cmd, p.done = cmd, make(chan struct{})
	go func() {
		cmd.Wait()
		logf.Close()
		p.exit = cmd.ProcessState.ExitCode()
		close(p.done)
	}()
	err = peers.WaitFor(context.Background(), 30*time.Second, func() error {
		select {
		case <-p.done:
			return errors.New("logshipper exited during start")
		default:
		}
		resp, err := http.Get("http://" + p.http + "/readyz")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			return errors.New(resp.Status)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("logshipper not ready: %v\n%s", err, p.tail())
	}
}

func (p *proc) tail() string {
	b, _ := os.ReadFile(p.logPath)
	if len(b) > 6000 {
		b = b[len(b)-6000:]
	}
	return string(b)
}

// kill is SIGKILL: a crash.
func (p *proc) kill() {
	if p.cmd == nil {
		return
	}
	p.cmd.Process.Kill()
	<-p.done
	p.cmd = nil
}

// term sends SIGTERM and returns the exit code.
func (p *proc) term(timeout time.Duration) int {
	p.t.Helper()
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(timeout):
		p.t.Fatalf("logshipper did not exit within %s of SIGTERM\n%s", timeout, p.tail())
	}
	p.cmd = nil
	return p.exit
}

var metricLine = regexp.MustCompile(`(?m)^([a-z_]+(?:\{[^}]*\})?) ([0-9.e+-]+)$`)

// metric reads one sample from /metrics, e.g. `podkeeper_logshipper_records_total{stage="acked"}`.
func (p *proc) metric(name string) float64 {
	resp, err := http.Get("http://" + p.http + "/metrics")
	if err != nil {
		return -1
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	for _, m := range metricLine.FindAllStringSubmatch(string(b), -1) {
		if m[1] == name {
			v, _ := strconv.ParseFloat(m[2], 64)
			return v
		}
	}
	return -1
}

// writer appends numbered lines to a log file the way an app does (O_APPEND,
// so copytruncate works), and can be paused for a rotation.
type writer struct {
	mu   sync.Mutex
	path string
	f    *os.File
	bw   *bufio.Writer
	name string
	n    int
	pad  string
}

func newWriter(t *testing.T, path, name string, padTo int) *writer {
	w := &writer{path: path, name: name}
	if padTo > 0 {
		w.pad = " " + strings.Repeat("x", padTo)
	}
	w.reopen(t)
	t.Cleanup(func() { w.f.Close() })
	return w
}

func (w *writer) reopen(t *testing.T) {
	if w.f != nil {
		w.bw.Flush()
		w.f.Close()
	}
	f, err := os.OpenFile(w.path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	w.f, w.bw = f, bufio.NewWriterSize(f, 64<<10)
}

func lineText(name string, i int, pad string) string {
	return fmt.Sprintf("%s line %08d%s", name, i, pad)
}

// write appends k lines and flushes them to the file.
func (w *writer) write(k int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for range k {
		w.bw.WriteString(lineText(w.name, w.n, w.pad))
		w.bw.WriteByte('\n')
		w.n++
	}
	w.bw.Flush()
}

func (w *writer) written() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.n
}

// expected lists every line written so far.
func (w *writer) expected() []string {
	n := w.written()
	out := make([]string, n)
	for i := range n {
		out[i] = lineText(w.name, i, w.pad)
	}
	return out
}

// steady runs w.write(perTick) on every tick until stop is closed; the ticker
// paces the writer like an app, without sleeping.
func (w *writer) steady(every time.Duration, perTick int, stop <-chan struct{}) <-chan struct{} {
	done := make(chan struct{})
	go func() {
		defer close(done)
		tk := time.NewTicker(every)
		defer tk.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tk.C:
				w.write(perTick)
			}
		}
	}()
	return done
}

// counts maps each received log line to how often it arrived.
func counts(recs []peers.LogRecord) map[string]int {
	m := make(map[string]int, len(recs))
	for _, r := range recs {
		m[r.Log]++
	}
	return m
}

// waitAll waits until every expected line arrived at least once.
func waitAll(t *testing.T, r *peers.LogReceiver, p *proc, expected []string, timeout time.Duration) map[string]int {
	t.Helper()
	var got map[string]int
	err := peers.WaitFor(context.Background(), timeout, func() error {
		recs, err := r.Records()
		if err != nil {
			return err
		}
		got = counts(recs)
		missing := 0
		first := ""
		for _, l := range expected {
			if got[l] == 0 {
				if missing == 0 {
					first = l
				}
				missing++
			}
		}
		if missing > 0 {
			return fmt.Errorf("%d of %d lines missing, first %q", missing, len(expected), first)
		}
		return nil
	})
	if err != nil {
		logs := ""
		if p != nil {
			logs = p.tail()
		}
		t.Fatalf("%v\n--- logshipper ---\n%s\n--- receiver ---\n%s", err, logs, r.Tail())
	}
	return got
}

// exactlyOnce fails on every expected line that did not arrive exactly once and
// on every line nobody wrote.
func exactlyOnce(t *testing.T, got map[string]int, expected []string) {
	t.Helper()
	want := make(map[string]bool, len(expected))
	bad := 0
	for _, l := range expected {
		want[l] = true
		if got[l] != 1 && bad < 5 {
			t.Errorf("line %q arrived %d times", l, got[l])
			bad++
		}
	}
	for l := range got {
		if !want[l] && bad < 10 {
			t.Errorf("unexpected line %q", l)
			bad++
		}
	}
}

func baseEnv(t *testing.T, r *peers.LogReceiver, dir string) []string {
	return []string{
		"LOGSHIP_PATHS=" + filepath.Join(dir, "*.log"),
		"LOGSHIP_STATE_DIR=" + filepath.Join(dir, "..", filepath.Base(dir)+"-state"),
		"FLUENT_ADDR=" + r.Addr,
		"POD_NAME=upload-0", "POD_NAMESPACE=files",
		"LOGSHIP_BATCH_WAIT=50ms",
	}
}

// atMostDup fails when more than maxDup lines arrived twice (or any line never).
func atMostDup(t *testing.T, got map[string]int, expected []string, maxDup int) {
	t.Helper()
	dups := 0
	for _, l := range expected {
		if got[l] == 0 {
			t.Errorf("line %q lost", l)
			return
		}
		dups += got[l] - 1
	}
	if dups > maxDup {
		t.Errorf("%d duplicates, want at most %d", dups, maxDup)
	}
}
