//go:build bench

// Latency tier: on loopback every contender is bound by the shared CPU, which
// says little about a real bucket. Here the restore and the syncer backfill
// reach the server through delayProxy (one-way delay per direction, no
// bandwidth cap), at 0 and 20 ms round trip, side by side with rclone at
// --transfers 16 and 64 and the raw SDK at 16 and 64 concurrent requests, on
// versitygw and MinIO.
//
//	BENCH_LAT_FILES   files of 4 KiB (default 5000; the case is 20000)
//	BENCH_LAT_RTT_MS  round trips in ms (default "0,20")
//	BENCH_LAT_S3      servers (default "versitygw,minio")
//	BENCH_ROUNDS      interleaved rounds, medians reported (default 3)
//	BENCH_LAT_SKIP    "syncer" or "restore" to run only the other half
package bench

import (
	"crypto/rand"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/podkeeper/podkeeper/test/peers"
)

func latEnvInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

func latEnvList(name, def string) []string {
	v := os.Getenv(name)
	if v == "" {
		v = def
	}
	return strings.Split(v, ",")
}

// latRow is one contender in one (server, RTT, case) group.
type latRow struct {
	group, tool string
	runs        []time.Duration
	rss         int64 // KiB, highest round, processes only
	conns       int64 // TCP connections opened through the proxy, highest round
	run         func(round int) (time.Duration, int64)
}

func (r *latRow) median() time.Duration {
	s := slices.Clone(r.runs)
	slices.Sort(s)
	return s[len(s)/2]
}

func TestBenchLatency(t *testing.T) {
	n := latEnvInt("BENCH_LAT_FILES", 5000)
	rounds := benchRounds()
	skip := os.Getenv("BENCH_LAT_SKIP")
	restoreBin := agentBin(t, "restore")
	syncerBin := agentBin(t, "syncer")
	baseRestore := baselineBin(t, "restore")

	// The syncer's directory, shared by every backfill run (each into its own prefix).
	srcDir := t.TempDir()
	files := map[string][]byte{}
	for i := range n {
		b := make([]byte, restoreSmallSize)
		rand.Read(b)
		p := fmt.Sprintf("d%02d/f%05d.bin", i%50, i)
		files[p] = b
		if skip != "syncer" {
			os.MkdirAll(filepath.Join(srcDir, filepath.Dir(p)), 0o755)
			if err := os.WriteFile(filepath.Join(srcDir, p), b, 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}

	var out strings.Builder
	fmt.Fprintf(&out, "\nlatency tier: %d x 4 KiB through bench's delay proxy, median of %d interleaved rounds, %s\n\n", n, rounds, time.Now().UTC().Format(time.RFC3339))
	fmt.Fprintln(&out, "| Server | RTT | Case | Contender | Time | Files/s | restore (syncer) files/s ÷ this | Peak RSS | TCP conns |")
	fmt.Fprintln(&out, "|---|---|---|---|---|---|---|---|---|")
	var verdicts []string
	for _, kind := range latEnvList("BENCH_LAT_S3", "versitygw,minio") {
		srv := peers.StartS3(t, kind)
		u, err := url.Parse(srv.Endpoint)
		if err != nil || u.Scheme != "http" {
			t.Fatalf("endpoint %q: the delay proxy speaks plain TCP to an http endpoint", srv.Endpoint)
		}
		if skip != "restore" {
			t.Logf("%s: uploading %d x 4 KiB ...", kind, n)
			restorePut(t, srv.Client(), "lat", files, 32)
			// Packs as the syncer's compactor writes them after a checkpoint
			// (`restore pack` is the same code, agents/pack.Update).
			d := latPack(t, restoreBin, srv, "lat")
			fmt.Fprintf(&out, "%s: `restore pack` of %d files (the compactor's work, no delay proxy): %.2f s\n\n", kind, n, d.Seconds())
		}
		for _, ms := range latEnvList("BENCH_LAT_RTT_MS", "0,20") {
			rttMS, err := strconv.Atoi(strings.TrimSpace(ms))
			if err != nil {
				t.Fatalf("BENCH_LAT_RTT_MS: %v", err)
			}
			rtt := time.Duration(rttMS) * time.Millisecond
			proxy := startDelayProxy(t, u.Host, rtt/2)
			ep := "http://" + proxy.Addr
			var rows []*latRow
			add := func(cs, tool string, run func(round int) (time.Duration, int64)) *latRow {
				r := &latRow{group: fmt.Sprintf("| %s | %d ms | %s", kind, rttMS, cs), tool: tool, run: run}
				rows = append(rows, r)
				return r
			}
			var rRestore, rR16, rR64, rSync, rS16, rS64 *latRow
			if skip != "restore" {
				cs := "restore"
				rRestore = add(cs, "restore (defaults: packs, RESTORE_CONCURRENCY=16, RESTORE_MAX_CONCURRENCY=128)", func(int) (time.Duration, int64) {
					return latRestore(t, restoreBin, srv, ep)
				})
				add(cs, "restore, RESTORE_PACKS=false (one GET per file)", func(int) (time.Duration, int64) {
					return latRestore(t, restoreBin, srv, ep, "RESTORE_PACKS=false")
				})
				add(cs, "restore, RESTORE_PACKS=false RESTORE_MAX_CONCURRENCY=16 (fixed 16, one GET per file)", func(int) (time.Duration, int64) {
					return latRestore(t, restoreBin, srv, ep, "RESTORE_PACKS=false", "RESTORE_MAX_CONCURRENCY=16")
				})
				if baseRestore != "" {
					add(cs, "restore, baseline binary (BENCH_BASELINE_BIN_DIR)", func(int) (time.Duration, int64) {
						return latRestore(t, baseRestore, srv, ep)
					})
				}
				rR16 = add(cs, "rclone copy --transfers 16", func(int) (time.Duration, int64) {
					return latRclone(t, ep, "bench:"+peers.Bucket+"/lat/data", "", 16, n)
				})
				rR64 = add(cs, "rclone copy --transfers 64", func(int) (time.Duration, int64) {
					return latRclone(t, ep, "bench:"+peers.Bucket+"/lat/data", "", 64, n)
				})
				for _, c := range []int{16, 64} {
					add(cs, fmt.Sprintf("raw SDK, %d concurrent GETs", c), func(int) (time.Duration, int64) {
						dir := filepath.Join(t.TempDir(), "dst")
						defer os.RemoveAll(dir)
						return restoreRawSmallN(t, latClient(ep, c), "lat", dir, c).d, 0
					})
				}
			}
			if skip != "syncer" {
				cs := "syncer backfill"
				pfx := func(who string, round int) string { return fmt.Sprintf("lat-%d-%s-%d", rttMS, who, round) }
				rSync = add(cs, "syncer (SYNC_SETTLE=0; defaults SYNC_CONCURRENCY=16, SYNC_MAX_CONCURRENCY=128)", func(round int) (time.Duration, int64) {
					return syncerBackfillAt(t, syncerBin, srv, ep, pfx("syncer", round), srcDir, n)
				})
				// What agents/lifecycle sets under a 53 MiB container limit:
				// the peak RSS without a limit is mostly the GC's slack.
				add(cs, "syncer, GOMEMLIMIT=48MiB", func(round int) (time.Duration, int64) {
					return syncerBackfillAt(t, syncerBin, srv, ep, pfx("syncer-memlimit", round), srcDir, n, "GOMEMLIMIT=48MiB")
				})
				rS16 = add(cs, "rclone copy --transfers 16", func(round int) (time.Duration, int64) {
					return latRclone(t, ep, srcDir, "bench:"+peers.Bucket+"/"+pfx("rclone16", round)+"/data", 16, 0)
				})
				rS64 = add(cs, "rclone copy --transfers 64", func(round int) (time.Duration, int64) {
					return latRclone(t, ep, srcDir, "bench:"+peers.Bucket+"/"+pfx("rclone64", round)+"/data", 64, 0)
				})
				for _, c := range []int{16, 64} {
					add(cs, fmt.Sprintf("raw SDK PutObject x %d, syncer's metadata", c), func(round int) (time.Duration, int64) {
						return syncerRawSmall(t, latClient(ep, c), pfx(fmt.Sprintf("sdk%d", c), round), srcDir, true, c), 0
					})
				}
			}
			// Interleaved: every contender once per round.
			for round := range rounds {
				for _, r := range rows {
					syscall.Sync()
					c0 := proxy.Conns.Load()
					d, rss := r.run(round)
					r.runs, r.rss = append(r.runs, d), max(r.rss, rss)
					r.conns = max(r.conns, proxy.Conns.Load()-c0)
					t.Logf("%s | %s round %d: %s", r.group, r.tool, round+1, d.Round(time.Millisecond))
				}
			}
			for _, r := range rows {
				m := r.median()
				lead := rRestore
				if strings.HasSuffix(r.group, "syncer backfill") {
					lead = rSync
				}
				rss := "-"
				if r.rss > 0 {
					rss = fmt.Sprintf("%d MiB", r.rss/1024)
				}
				fmt.Fprintf(&out, "%s | %s | %.2f s | %.0f | %.2f x | %s | %d |\n", r.group, r.tool, m.Seconds(), float64(n)/m.Seconds(), m.Seconds()/lead.median().Seconds(), rss, r.conns)
			}
			ratio := func(a, b *latRow) float64 { return b.median().Seconds() / a.median().Seconds() }
			if rRestore != nil {
				verdicts = append(verdicts, fmt.Sprintf("%s, %d ms: restore files/s = %.2f x rclone --transfers 16, %.2f x --transfers 64; peak RSS %d MiB",
					kind, rttMS, ratio(rRestore, rR16), ratio(rRestore, rR64), rRestore.rss/1024))
			}
			if rSync != nil {
				verdicts = append(verdicts, fmt.Sprintf("%s, %d ms: syncer backfill files/s = %.2f x rclone --transfers 16, %.2f x --transfers 64",
					kind, rttMS, ratio(rSync, rS16), ratio(rSync, rS64)))
			}
		}
		srv.Stop()
	}
	fmt.Fprintf(&out, "\n%s\n", strings.Join(verdicts, "\n"))
	fmt.Print(out.String())
	t.Log(out.String())
}

// latClient is a raw SDK client to endpoint whose keep-alive pool holds conc
// connections (the SDK's default keeps 10 per host).
func latClient(endpoint string, conc int) *s3.Client {
	hc := awshttp.NewBuildableClient().WithTransportOptions(func(tr *http.Transport) {
		tr.MaxIdleConns, tr.MaxIdleConnsPerHost = 2*conc, conc
	})
	return s3.New(s3.Options{
		Region:                     "us-east-1",
		BaseEndpoint:               aws.String(endpoint),
		UsePathStyle:               true,
		HTTPClient:                 hc,
		Credentials:                credentials.NewStaticCredentialsProvider(peers.AccessKey, peers.SecretKey, ""),
		RequestChecksumCalculation: aws.RequestChecksumCalculationWhenRequired,
		ResponseChecksumValidation: aws.ResponseChecksumValidationWhenRequired,
	})
}

func latRestore(t *testing.T, bin string, srv *peers.S3Server, ep string, extra ...string) (time.Duration, int64) {
	dir := filepath.Join(t.TempDir(), "dst")
	defer os.RemoveAll(dir)
	s := restoreRunBin(t, bin, srv, "lat", dir, append([]string{"S3_ENDPOINT=" + ep}, extra...)...)
	return s.d, s.rss
}

// latPack runs `restore pack` on prefix (straight to the server) and
// returns how long it took.
func latPack(t *testing.T, bin string, srv *peers.S3Server, prefix string) time.Duration {
	t.Helper()
	cmd := exec.Command(bin, "pack")
	cmd.Env = append(srv.AgentEnv(prefix), "LOG_LEVEL=warn", "PATH="+os.Getenv("PATH"))
	start := time.Now()
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("restore pack: %v\n%s", err, out)
	}
	t.Logf("restore pack: %s", strings.TrimSpace(string(out)))
	return time.Since(start)
}

// latRclone copies src to dst (a local directory when empty) through ep and,
// for a download, checks that want files arrived.
func latRclone(t *testing.T, ep, src, dst string, transfers, want int) (time.Duration, int64) {
	t.Helper()
	local := ""
	if dst == "" {
		local = filepath.Join(t.TempDir(), "dst")
		defer os.RemoveAll(local)
		dst = local
	}
	cmd, rss := restoreTimed(t, peers.Bin(t, "rclone"), "copy", src, dst, "--transfers", strconv.Itoa(transfers))
	cmd.Env = append(os.Environ(),
		"RCLONE_CONFIG=/dev/null",
		"RCLONE_CONFIG_BENCH_TYPE=s3", "RCLONE_CONFIG_BENCH_PROVIDER=Other", "RCLONE_CONFIG_BENCH_ENDPOINT="+ep,
		"RCLONE_CONFIG_BENCH_ACCESS_KEY_ID="+peers.AccessKey, "RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY="+peers.SecretKey,
		"RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE=true", "RCLONE_CONFIG_BENCH_REGION=us-east-1")
	var errb strings.Builder
	cmd.Stderr = &errb
	start := time.Now()
	if err := cmd.Run(); err != nil {
		t.Fatalf("rclone: %v\n%s", err, errb.String())
	}
	d := time.Since(start)
	if local != "" {
		if got := restoreCount(t, local); got != want {
			t.Fatalf("rclone copied %d files, want %d", got, want)
		}
	}
	return d, rss()
}
