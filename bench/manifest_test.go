//go:build bench

// Issue 16 item 4: a legitimate 1 000 000-file manifest within a 256 MiB
// memory limit. For each size in BENCH_MANIFEST_FILES (default
// "100000,1000000") a file:// prefix gets a checkpoint of that many files
// (written directly; the data objects need not exist for planning) and 10
// log batches of 100 changes after it, stamped 30 minutes ago so the
// compactor folds them at once. Then, each under GOMEMLIMIT = 90% of 256 MiB
// (what memlimit.Apply sets in a 256 MiB container), the real binaries:
//
//	restore list                 decodes the checkpoint (files, bytes)
//	restore (plan)               folds checkpoint + log, plans onto an empty
//	                             RESTORE_DIR, then stops at the first fetch
//	                             (the objects are absent)
//	syncer start                 baseline (the fold into its ledger) and one
//	                             compaction (fold + checkpoint written)
//
// Peak RSS is ru_maxrss of the exited child (restore) and VmHWM of
// /proc/PID/status (the syncer, read while it runs): no cgroup needed. Live
// MB is the largest heap a collection left live (GODEBUG=gctrace=1): under
// GOMEMLIMIT with GOGC=100 the heap grows to about twice that before a
// collection, so the peak RSS tracks it.
// BENCH_BIN_DIR / BENCH_BASELINE_BIN_DIR as in the other suites; the
// baseline (the binaries before the compact form) refuses 1 000 000 files
// under the limit, so it also runs without one (BENCH_MANIFEST_NOLIMIT=1).
package bench

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/podkeeper/podkeeper/agents/changelog"
	"github.com/podkeeper/podkeeper/agents/snapshot"
	"github.com/podkeeper/podkeeper/agents/store/file"
	"github.com/podkeeper/podkeeper/test/peers"
)

const manifestMemLimit = int64(256<<20) / 10 * 9

func manifestSizes() []int {
	spec := os.Getenv("BENCH_MANIFEST_FILES")
	if spec == "" {
		spec = "100000,1000000"
	}
	var out []int
	for _, s := range strings.Split(spec, ",") {
		if n, err := strconv.Atoi(strings.TrimSpace(s)); err == nil && n > 0 {
			out = append(out, n)
		}
	}
	return out
}

// manifestPrefix writes the checkpoint and the batches into a new file://
// store and returns its STORE_URL.
func manifestPrefix(t *testing.T, n int) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "store")
	st, err := file.New(dir)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	created := time.Now().Add(-time.Hour).UTC()
	m := &snapshot.Manifest{Format: snapshot.Format, ID: snapshot.NewID(created, ""), Created: created,
		Writer: snapshot.Writer{Pod: "bench", Namespace: "default"}, Files: make([]snapshot.File, n)}
	for i := range m.Files {
		h := sha256.Sum256([]byte(strconv.Itoa(i)))
		m.Files[i] = snapshot.File{Path: fmt.Sprintf("uploads/%04d/%07d.jpg", i/1000, i), Size: int64(1000 + i%5000),
			SHA256: hex.EncodeToString(h[:]), MTime: created.Add(-time.Duration(i) * time.Millisecond), Mode: 0o644,
			ETag: `"` + hex.EncodeToString(h[:16]) + `"`}
	}
	if _, err := snapshot.Write(ctx, st, m); err != nil {
		t.Fatal(err)
	}
	m = nil
	stamp := time.Now().Add(-30 * time.Minute).UTC()
	for b := range 10 {
		batch := &changelog.Batch{Writer: changelog.Writer{Namespace: "default", Pod: "w" + strconv.Itoa(b%3), UID: "u"},
			Time: stamp.Add(time.Duration(b) * time.Second)}
		for c := range 100 {
			k := b*100 + c
			h := sha256.Sum256([]byte("new" + strconv.Itoa(k)))
			p := fmt.Sprintf("uploads/%04d/%07d.jpg", (k*997%n)/1000, k*997%n) // overwrites
			if c%2 == 1 {
				p = fmt.Sprintf("new/%05d.jpg", k)
			}
			batch.Changes = append(batch.Changes, changelog.Change{File: snapshot.File{Path: p, Size: 10, SHA256: hex.EncodeToString(h[:]),
				MTime: stamp.Add(time.Duration(k) * time.Millisecond), Mode: 0o644}})
		}
		if _, err := changelog.Append(ctx, st, batch); err != nil {
			t.Fatal(err)
		}
	}
	return "file://" + dir
}

type manifestRun struct {
	peakMiB float64
	liveMB  int // the largest heap a GC left live (gctrace), what the agent really holds
	dur     time.Duration
	ok      bool
	note    string
}

// gcLive is the heap a gctrace line ("gc N @t s p%: ... A->B->C MB, ...")
// says the collection left live (C), or -1.
func gcLive(line string) int {
	if !strings.HasPrefix(line, "gc ") {
		return -1
	}
	i := strings.Index(line, " MB,")
	if i < 0 {
		return -1
	}
	j := strings.LastIndex(line[:i], "->")
	if j < 0 {
		return -1
	}
	n, err := strconv.Atoi(line[j+2 : i])
	if err != nil {
		return -1
	}
	return n
}

// manifestRestore runs bin/restore with args and returns its peak RSS.
func manifestRestore(t *testing.T, bin, storeURL string, limit bool, args ...string) manifestRun {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "STORE_URL=" + storeURL, "RESTORE_DIR=" + t.TempDir(), "LOG_LEVEL=info", "GODEBUG=gctrace=1"}
	if limit {
		cmd.Env = append(cmd.Env, "GOMEMLIMIT="+strconv.FormatInt(manifestMemLimit, 10))
	}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	start := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatalf("%s %q: %v", bin, args, err)
	}
	hwm := watchHWM(cmd.Process.Pid)
	err := cmd.Wait()
	r := manifestRun{dur: time.Since(start), peakMiB: float64(hwm()) / 1024}
	var kept []string
	for _, line := range strings.Split(out.String(), "\n") {
		if l := gcLive(line); l >= 0 {
			r.liveMB = max(r.liveMB, l)
			continue
		}
		kept = append(kept, line)
	}
	text := strings.Join(kept, "\n")
	switch {
	case len(args) > 0 && args[0] == "list":
		r.ok = err == nil && !strings.Contains(text, "UNREADABLE")
	default:
		r.ok = strings.Contains(text, `"msg":"plan"`) || strings.Contains(text, "msg=plan")
	}
	if !r.ok {
		r.note = lastLine(text)
	}
	return r
}

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		s = s[i+1:]
	}
	if len(s) > 300 {
		s = s[:300]
	}
	return s
}

// manifestSyncer starts the syncer on an empty directory and waits for its
// baseline and one checkpoint (or a failure), then reads VmHWM.
func manifestSyncer(t *testing.T, bin, storeURL string, limit bool) manifestRun {
	t.Helper()
	cmd := exec.Command(bin)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "STORE_URL=" + storeURL, "SYNC_DIR=" + t.TempDir(), "LOG_LEVEL=info",
		"SYNC_HTTP_ADDR=127.0.0.1:" + strconv.Itoa(peers.FreePort(t)), "POD_NAME=bench-syncer", "POD_NAMESPACE=default", "POD_UID=x",
		"SYNC_SNAPSHOT_INTERVAL=1s", "GODEBUG=gctrace=1"}
	if limit {
		cmd.Env = append(cmd.Env, "GOMEMLIMIT="+strconv.FormatInt(manifestMemLimit, 10))
	}
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = pw, pw
	start := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pw.Close()
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	defer func() { cmd.Process.Kill(); <-exited }()
	timeout := time.AfterFunc(5*time.Minute, func() { cmd.Process.Kill() })
	defer timeout.Stop()
	r := manifestRun{}
	var hwm int64
	sc := bufio.NewScanner(pr)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if h := procHWM(cmd.Process.Pid); h > hwm {
			hwm = h
		}
		if l := gcLive(line); l >= 0 {
			r.liveMB = max(r.liveMB, l)
			continue
		}
		if strings.Contains(line, "checkpoint written") {
			r.ok = true
			break
		}
		if strings.Contains(line, `"level":"ERROR"`) || strings.Contains(line, "compaction failed") || strings.Contains(line, "level=ERROR") {
			r.note = lastLine(line)
			break
		}
	}
	r.dur = time.Since(start)
	if h := procHWM(cmd.Process.Pid); h > hwm {
		hwm = h
	}
	if !r.ok && r.note == "" {
		r.note = "exited without a checkpoint"
	}
	r.peakMiB = float64(hwm) / 1024
	cmd.Process.Signal(syscall.SIGTERM)
	go func() {
		for sc.Scan() {
		}
	}()
	select {
	case <-exited:
	case <-time.After(time.Minute):
	}
	return r
}

// watchHWM reads VmHWM of pid every 2 ms until it is gone; the returned
// function waits for that and is the last value read. (ru_maxrss of a child
// is no use here: Go starts children with vfork, and the child's high-water
// mark starts at this test's RSS.)
func watchHWM(pid int) func() int64 {
	done := make(chan int64, 1)
	go func() {
		var max int64
		tick := time.NewTicker(2 * time.Millisecond)
		defer tick.Stop()
		for ; ; <-tick.C {
			h := procHWM(pid)
			if h == 0 {
				done <- max
				return
			}
			max = h
		}
	}()
	return func() int64 { return <-done }
}

// procHWM is VmHWM (KiB) of a running process, 0 once it is gone.
func procHWM(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmHWM:" {
			v, _ := strconv.ParseInt(f[1], 10, 64)
			return v
		}
	}
	return 0
}

func TestBenchManifestMillion(t *testing.T) {
	bins := map[string]string{"restore": agentBin(t, "restore"), "syncer": agentBin(t, "syncer")}
	contenders := []struct{ name, restore, syncer string }{{"this", bins["restore"], bins["syncer"]}}
	if b := baselineBin(t, "restore"); b != "" {
		contenders = append(contenders, struct{ name, restore, syncer string }{"baseline", b, baselineBin(t, "syncer")})
	}
	limits := []bool{true}
	if os.Getenv("BENCH_MANIFEST_NOLIMIT") != "" {
		limits = append(limits, false)
	}
	t.Logf("GOMEMLIMIT %d (90%% of 256 MiB); peak RSS in MiB", manifestMemLimit)
	t.Logf("%-9s %-9s %-8s %-16s %9s %8s %8s  %s", "files", "binary", "limit", "step", "peak MiB", "live MB", "time", "outcome")
	for _, n := range manifestSizes() {
		for _, c := range contenders {
			for _, lim := range limits {
				// A fresh prefix each time: the syncer's compaction folds the batches.
				setup := time.Now()
				url := manifestPrefix(t, n)
				t.Logf("prefix of %d files + 10 batches written in %s", n, time.Since(setup).Round(time.Millisecond))
				limText := "256MiB"
				if !lim {
					limText = "none"
				}
				for _, step := range []string{"restore list", "restore plan", "syncer start"} {
					var r manifestRun
					switch step {
					case "restore list":
						r = manifestRestore(t, c.restore, url, lim, "list")
					case "restore plan":
						r = manifestRestore(t, c.restore, url, lim)
					case "syncer start":
						r = manifestSyncer(t, c.syncer, url, lim)
					}
					outcome := "ok"
					if !r.ok {
						outcome = "FAILED: " + r.note
					}
					t.Logf("%-9d %-9s %-8s %-16s %9.1f %8d %8s  %s", n, c.name, limText, step, r.peakMiB, r.liveMB, r.dur.Round(time.Millisecond), outcome)
					if c.name == "this" && lim && (!r.ok || r.peakMiB >= 256) {
						t.Errorf("%d files, %s: peak %.1f MiB, ok=%v %s", n, step, r.peakMiB, r.ok, r.note)
					}
				}
			}
		}
	}
}
