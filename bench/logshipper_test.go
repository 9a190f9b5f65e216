//go:build bench

// Logshipper benchmark, side by side in one run, each sender into its own
// fresh OpenTelemetry Collector fluent_forward receiver (file exporter, acks
// after the pipeline accepted the data):
//
//	logshipper:                 1 M lines of ~200 bytes appended to 2 files, end to end (file -> ack)
//	hand-built PackedForward:   1 M records, 1000 per frame, one chunk + ack per frame (the ceiling)
//	fluent-logger-golang:       sync + RequestAck, one record per Post (fewer records: ~13 k/s)
//
// in BENCH_ROUNDS (default 3) rounds with the order rotating, medians reported,
// plus the logshipper's RSS idle and under that load (VmRSS / VmHWM from /proc)
// and its stripped binary size. Nothing is asserted: targets are printed as met
// or missed, with ratios against the senders measured in the same run.
package bench

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/fluent/fluent-logger-golang/fluent"
	"github.com/tinylib/msgp/msgp"

	"github.com/podkeeper/podkeeper/test/peers"
)

const (
	logshipLines    = 1_000_000
	logshipLineSize = 200
	logshipFLGLines = 30_000
)

func logshipLine(i int) string {
	s := fmt.Sprintf("2026-11-26T10:00:00.000Z INFO upload id=%09d user=u%05d bytes=%d msg=", i, i%99991, i*7)
	return s + strings.Repeat("x", logshipLineSize-len(s))
}

// logshipCounter counts records in the collector's output file as it grows
// (the whole file would be hundreds of MB of OTLP JSON to parse each poll).
type logshipCounter struct {
	path string
	off  int64
	n    int
}

var logshipMarker = []byte(`"timeUnixNano"`)

func (c *logshipCounter) count() int {
	f, err := os.Open(c.path)
	if err != nil {
		return c.n
	}
	defer f.Close()
	buf := make([]byte, 4<<20)
	for {
		k, _ := f.ReadAt(buf, c.off)
		if k == 0 {
			return c.n
		}
		chunk := buf[:k]
		end := bytes.LastIndexByte(chunk, '\n')
		if end < 0 {
			if k == len(buf) {
				buf = make([]byte, 2*len(buf)) // one exporter line longer than the buffer
				continue
			}
			return c.n
		}
		c.n += bytes.Count(chunk[:end+1], logshipMarker)
		c.off += int64(end + 1)
	}
}

func (c *logshipCounter) wait(t *testing.T, want int, timeout time.Duration) time.Time {
	t.Helper()
	if err := peers.WaitFor(context.Background(), timeout, func() error {
		if n := c.count(); n < want {
			return fmt.Errorf("%d of %d records", n, want)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return time.Now()
}

func logshipProcStatus(pid int, field string) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return -1
	}
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, field+":") {
			f := strings.Fields(l)
			kb, _ := strconv.ParseInt(f[1], 10, 64)
			return kb << 10
		}
	}
	return -1
}

// logshipCeiling sends n records as PackedForward frames of 1000 with one ack
// each: the fastest an acked forward sender can go on this machine.
func logshipCeiling(t *testing.T, addr string, n int) {
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	rd := msgp.NewReader(conn)
	var entries, frame []byte
	for i := 0; i < n; {
		entries = entries[:0]
		k := 0
		for ; k < 1000 && i < n; k, i = k+1, i+1 {
			entries = msgp.AppendArrayHeader(entries, 2)
			et := fluent.EventTime(time.Now())
			entries, _ = msgp.AppendExtension(entries, &et)
			// The same record the logshipper sends, so the receiver does the same work.
			entries = msgp.AppendMapHeader(entries, 4)
			entries = msgp.AppendString(entries, "log")
			entries = msgp.AppendString(entries, logshipLine(i))
			entries = msgp.AppendString(entries, "file")
			entries = msgp.AppendString(entries, "/var/log/app/app-0.log")
			entries = msgp.AppendString(entries, "pod")
			entries = msgp.AppendString(entries, "bench-0")
			entries = msgp.AppendString(entries, "namespace")
			entries = msgp.AppendString(entries, "bench")
		}
		chunk := "c" + strconv.Itoa(i)
		frame = msgp.AppendArrayHeader(frame[:0], 3)
		frame = msgp.AppendString(frame, "bench.ceiling")
		frame = msgp.AppendBytes(frame, entries)
		frame = msgp.AppendMapHeader(frame, 2)
		frame = msgp.AppendString(frame, "size")
		frame = msgp.AppendInt(frame, k)
		frame = msgp.AppendString(frame, "chunk")
		frame = msgp.AppendString(frame, chunk)
		if _, err := conn.Write(frame); err != nil {
			t.Fatal(err)
		}
		var ack fluent.AckResp
		if err := ack.DecodeMsg(rd); err != nil || ack.Ack != chunk {
			t.Fatalf("ack %q: %v", ack.Ack, err)
		}
	}
}

func logshipFLG(t *testing.T, port, n int) {
	f, err := fluent.New(fluent.Config{FluentHost: "127.0.0.1", FluentPort: port, RequestAck: true, Timeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for i := range n {
		rec := map[string]string{"log": logshipLine(i), "file": "/var/log/app/app-0.log", "pod": "bench-0", "namespace": "bench"}
		if err := f.Post("bench.flg", rec); err != nil {
			t.Fatal(err)
		}
	}
}

// benchRounds() runs of each sender, in a rotating order, so a change of the
// machine's load between phases does not decide the ratios; medians are reported.

func TestBenchLogshipper(t *testing.T) {
	bin := agentBin(t, "logshipper")
	base := baselineBin(t, "logshipper")
	fi, _ := os.Stat(bin)
	binSize := fi.Size()

	var ceils, flgs, ships, bases []float64
	var idle, peak int64
	phases := []func(){
		func() {
			r := peers.StartOtelFwd(t)
			defer r.Stop()
			defer os.Remove(r.Out)
			c := &logshipCounter{path: r.Out}
			start := time.Now()
			logshipCeiling(t, r.Addr, logshipLines)
			ceils = append(ceils, float64(logshipLines)/c.wait(t, logshipLines, 5*time.Minute).Sub(start).Seconds())
			t.Logf("hand-built PackedForward + ack: %.0f records/s", ceils[len(ceils)-1])
		},
		func() {
			r := peers.StartOtelFwd(t)
			defer r.Stop()
			defer os.Remove(r.Out)
			c := &logshipCounter{path: r.Out}
			start := time.Now()
			logshipFLG(t, r.Port, logshipFLGLines)
			flgs = append(flgs, float64(logshipFLGLines)/c.wait(t, logshipFLGLines, 5*time.Minute).Sub(start).Seconds())
			t.Logf("fluent-logger-golang sync + RequestAck: %.0f records/s", flgs[len(flgs)-1])
		},
		func() {
			rate, i, p := logshipRun(t, bin)
			ships = append(ships, rate)
			idle, peak = max(idle, i), max(peak, p)
		},
	}
	if base != "" {
		phases = append(phases, func() {
			rate, _, _ := logshipRun(t, base)
			bases = append(bases, rate)
		})
	}
	logshipRounds := benchRounds()
	for round := range logshipRounds {
		for k := range phases {
			phases[(round+k)%len(phases)]()
		}
	}
	ceil, flg, ship := logshipMedian(ceils), logshipMedian(flgs), logshipMedian(ships)

	mib := func(b int64) string { return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20)) }
	yes := func(ok bool) string {
		if ok {
			return "met"
		}
		return "MISSED"
	}
	rates := func(v []float64) string {
		var s []string
		for _, x := range v {
			s = append(s, fmt.Sprintf("%.0f", x))
		}
		return strings.Join(s, ", ")
	}
	var b strings.Builder
	fmt.Fprintf(&b, "\n| logshipper, %d lines of %d B into otelfwd with acks, median of %d rounds | value | ratio | target |\n|---|---|---|---|\n", logshipLines, logshipLineSize+1, logshipRounds)
	fmt.Fprintf(&b, "| logshipper (files -> ack, end to end; rounds: %s) | %.0f rec/s | 1.00 | |\n", rates(ships), ship)
	if base != "" {
		fmt.Fprintf(&b, "| logshipper, baseline binary (BENCH_BASELINE_BIN_DIR; rounds: %s) | %.0f rec/s | logshipper = %.2f x | |\n", rates(bases), logshipMedian(bases), ship/logshipMedian(bases))
	}
	fmt.Fprintf(&b, "| hand-built PackedForward + ack, 1000/frame, the ceiling (rounds: %s) | %.0f rec/s | logshipper = %.2f x | >= 0.8 x: %s |\n", rates(ceils), ceil, ship/ceil, yes(ship >= 0.8*ceil))
	fmt.Fprintf(&b, "| fluent-logger-golang sync + RequestAck, %d records (rounds: %s) | %.0f rec/s | logshipper = %.1f x | >= 10 x: %s |\n", logshipFLGLines, rates(flgs), flg, ship/flg, yes(ship >= 10*flg))
	fmt.Fprintf(&b, "| logshipper RSS idle (VmRSS, highest round) | %s | | <= 20 MiB: %s |\n", mib(idle), yes(idle <= 20<<20))
	fmt.Fprintf(&b, "| logshipper RSS peak under load (VmHWM, highest round) | %s | | <= 64 MiB: %s |\n", mib(peak), yes(peak <= 64<<20))
	fmt.Fprintf(&b, "| logshipper stripped binary | %s | | <= 20 MiB: %s |\n", mib(binSize), yes(binSize <= 20<<20))
	t.Log(b.String())
}

func logshipMedian(v []float64) float64 {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	return s[len(s)/2]
}

// logshipRun times the logshipper end to end: 1 M lines appended to 2 files
// until the receiver holds them all. It returns the rate, idle RSS and peak RSS.
func logshipRun(t *testing.T, bin string) (float64, int64, int64) {
	r := peers.StartOtelFwd(t)
	defer r.Stop()
	defer os.Remove(r.Out) // hundreds of MB of OTLP JSON per phase
	c := &logshipCounter{path: r.Out}
	dir, state := t.TempDir(), t.TempDir()
	httpAddr := "127.0.0.1:" + strconv.Itoa(peers.FreePort(t))
	cmd := exec.Command(bin)
	cmd.Env = []string{"LOGSHIP_PATHS=" + filepath.Join(dir, "*.log"), "LOGSHIP_STATE_DIR=" + state, "FLUENT_ADDR=" + r.Addr,
		"LOGSHIP_HTTP_ADDR=" + httpAddr, "POD_NAME=bench-0", "POD_NAMESPACE=bench", "LOG_LEVEL=warn"}
	logf, _ := os.Create(filepath.Join(t.TempDir(), "logshipper.log"))
	defer logf.Close()
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	if err := peers.WaitFor(context.Background(), 30*time.Second, func() error {
		resp, err := http.Get("http://" + httpAddr + "/readyz")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			return fmt.Errorf("%s", resp.Status)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	// Idle: ready, watching, nothing to read, after the start-up garbage settled.
	idleAt := time.Now().Add(2 * time.Second)
	peers.WaitFor(context.Background(), 5*time.Second, func() error {
		if time.Now().Before(idleAt) {
			return fmt.Errorf("settling")
		}
		return nil
	})
	idle := logshipProcStatus(cmd.Process.Pid, "VmRSS")

	start := time.Now()
	files := make([]*bufio.Writer, 2)
	for i := range files {
		f, err := os.OpenFile(filepath.Join(dir, fmt.Sprintf("app-%d.log", i)), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		files[i] = bufio.NewWriterSize(f, 256<<10)
	}
	for i := range logshipLines {
		w := files[i%len(files)]
		w.WriteString(logshipLine(i))
		w.WriteByte('\n')
	}
	for _, w := range files {
		w.Flush()
	}
	written := time.Since(start)
	rate := float64(logshipLines) / c.wait(t, logshipLines, 10*time.Minute).Sub(start).Seconds()
	peak := logshipProcStatus(cmd.Process.Pid, "VmHWM")
	cmd.Process.Signal(syscall.SIGTERM)
	werr := cmd.Wait()
	if n := c.count(); n != logshipLines {
		t.Errorf("receiver holds %d records after shutdown, want %d", n, logshipLines)
	}
	t.Logf("logshipper: %.0f records/s (the writer took %s), exit after SIGTERM: %v", rate, written.Round(time.Millisecond), werr)
	return rate, idle, peak
}
