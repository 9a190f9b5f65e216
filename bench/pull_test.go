//go:build bench

// SYNC_PULL convergence (issue 13), real binaries on versitygw (BENCH_S3=minio
// for MinIO): 3 replicas, each with its app writing BENCH_PULL_RATE (default
// 50) files/s of 4 KiB for BENCH_PULL_SECONDS (default 20) in place, with the
// syncer's defaults (SYNC_SETTLE=1s, SYNC_LOG_INTERVAL=1s,
// SYNC_PULL_INTERVAL=1s). Latency is from the close(2) on the writing
// replica to the rename into place on each of the other two (inotify
// IN_MOVED_TO), p50/p99/max printed against the target
// SYNC_SETTLE + 2 x SYNC_PULL_INTERVAL + 250 ms. Then the idle cost: the
// requests each replica sends in BENCH_PULL_IDLE (default 30s) with nothing
// written anywhere, per minute.
//
// Nothing is asserted about timings: the figures are printed.
package bench

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fsnotify/fsnotify"

	"github.com/podkeeper/podkeeper/test/peers"
)

// reqCounter is a reverse proxy to the S3 server counting requests by kind.
type reqCounter struct {
	URL string
	mu  sync.Mutex
	n   map[string]int
}

func newReqCounter(t *testing.T, target string) *reqCounter {
	u, _ := url.Parse(target)
	c := &reqCounter{n: map[string]int{}}
	rp := httputil.NewSingleHostReverseProxy(u)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		kind := r.Method
		if r.Method == http.MethodGet && r.URL.Query().Has("list-type") {
			kind = "LIST"
		}
		c.mu.Lock()
		c.n[kind]++
		c.mu.Unlock()
		rp.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	c.URL = srv.URL
	return c
}

func (c *reqCounter) take() map[string]int {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := c.n
	c.n = map[string]int{}
	return out
}

func pullEnvDur(name string, def time.Duration) time.Duration {
	if d, err := time.ParseDuration(os.Getenv(name)); err == nil && d > 0 {
		return d
	}
	return def
}

func TestBenchPull(t *testing.T) {
	bin := agentBin(t, "syncer")
	srv := peers.StartS3(t, benchS3())
	rate := latEnvInt("BENCH_PULL_RATE", 50)
	secs := latEnvInt("BENCH_PULL_SECONDS", 20)
	idle := pullEnvDur("BENCH_PULL_IDLE", 30*time.Second)
	const replicas = 3
	const settle, interval = time.Second, time.Second
	target := settle + 2*interval + 250*time.Millisecond

	dirs := make([]string, replicas)
	counters := make([]*reqCounter, replicas)
	procs := make([]*syncerProc, replicas)
	arrived := make([]map[string]time.Time, replicas)
	var mu sync.Mutex
	for i := range replicas {
		dirs[i] = t.TempDir()
		arrived[i] = map[string]time.Time{}
		w, err := fsnotify.NewWatcher()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { w.Close() })
		if err := w.Add(dirs[i]); err != nil {
			t.Fatal(err)
		}
		go func() {
			for ev := range w.Events {
				if ev.Has(fsnotify.Create) && !strings.HasPrefix(filepath.Base(ev.Name), ".") {
					now := time.Now()
					mu.Lock()
					if _, ok := arrived[i][filepath.Base(ev.Name)]; !ok {
						arrived[i][filepath.Base(ev.Name)] = now
					}
					mu.Unlock()
				}
			}
		}()
		counters[i] = newReqCounter(t, srv.Endpoint)
		procs[i] = syncerStart(t, bin, srv, counters[i].URL, "pull", dirs[i], "SYNC_PULL=true",
			"POD_NAME=replica-"+strconv.Itoa(i), "POD_UID=uid-"+strconv.Itoa(i), "SYNC_SNAPSHOT_INTERVAL=1m")
	}
	for _, p := range procs {
		if err := peers.WaitFor(t.Context(), time.Minute, func() error {
			if !p.ready() {
				return fmt.Errorf("not ready")
			}
			return nil
		}); err != nil {
			t.Fatalf("syncer not ready: %v\n%s", err, p.log.String())
		}
	}

	// The apps: each replica's writes files in place at rate per second.
	closed := make([]map[string]time.Time, replicas)
	var wg sync.WaitGroup
	body := make([]byte, 4<<10)
	for i := range replicas {
		closed[i] = map[string]time.Time{}
		wg.Go(func() {
			tick := time.NewTicker(time.Second / time.Duration(rate))
			defer tick.Stop()
			for n := range rate * secs {
				<-tick.C
				name := fmt.Sprintf("r%d-%05d.bin", i, n)
				copy(body, name)
				if err := os.WriteFile(filepath.Join(dirs[i], name), body, 0o644); err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				closed[i][name] = time.Now()
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	want := rate * secs * (replicas - 1)
	err := peers.WaitFor(t.Context(), 2*time.Minute, func() error {
		mu.Lock()
		defer mu.Unlock()
		got := 0
		for i := range replicas {
			for name := range arrived[i] {
				if !strings.HasPrefix(name, fmt.Sprintf("r%d-", i)) {
					got++
				}
			}
		}
		if got < want {
			return fmt.Errorf("%d of %d pulls arrived", got, want)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	var lat []time.Duration
	mu.Lock()
	for w := range replicas {
		for name, at := range closed[w] {
			for r := range replicas {
				if r != w {
					lat = append(lat, arrived[r][name].Sub(at))
				}
			}
		}
	}
	mu.Unlock()
	slices.Sort(lat)
	pct := func(p float64) time.Duration { return lat[min(len(lat)-1, int(float64(len(lat))*p))] }
	verdict := "met"
	if pct(0.99) > target {
		verdict = "MISSED"
	}
	t.Logf("convergence on %s, %d replicas x %d files/s x %d s (%d pulls): p50 %v  p99 %v  max %v  (target p99 <= %v: %s)",
		benchS3(), replicas, rate, secs, len(lat), pct(0.5).Round(time.Millisecond), pct(0.99).Round(time.Millisecond),
		lat[len(lat)-1].Round(time.Millisecond), target, verdict)

	// Idle: nothing written anywhere. The window starts once every replica
	// has settled: no request but LISTs over a second, at most 2 of them (the
	// pullers left their busy rate of 4 per second).
	settled := func() error {
		for i, c := range counters {
			n := c.take()
			if n["LIST"] > 2 || len(n) > 1 || (len(n) == 1 && n["LIST"] == 0) {
				return fmt.Errorf("replica %d still busy: %v", i, n)
			}
		}
		return nil
	}
	for _, c := range counters {
		c.take()
	}
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	deadline := time.Now().Add(time.Minute)
	for <-tick.C; settled() != nil; <-tick.C {
		if time.Now().After(deadline) {
			t.Fatalf("replicas not idle a minute after the run: %v", settled())
		}
	}
	<-time.After(idle) // the measurement window
	for i, c := range counters {
		n := c.take()
		total := 0
		var kinds []string
		for k, v := range n {
			total += v
			kinds = append(kinds, fmt.Sprintf("%s %.0f", k, float64(v)*float64(time.Minute)/float64(idle)))
		}
		slices.Sort(kinds)
		t.Logf("idle cost, replica %d: %.0f requests/min (%s)", i, float64(total)*float64(time.Minute)/float64(idle), strings.Join(kinds, ", "))
	}
	for _, p := range procs {
		p.stop(t)
	}
}
