//go:build bench

// Restore benchmarks, side by side in one run on versitygw:
//
//	5000 files of 4 KiB: restore vs `rclone copy --transfers 16` vs the raw SDK at concurrency 16
//	one 1 GiB file:      restore vs the raw SDK (transfermanager DownloadObject, 16 ranged GETs at a time)
//
// Each contender downloads into a fresh directory; the median of restoreRounds
// runs is reported with ratios. Nothing is asserted: the targets are printed
// as met or missed.
package bench

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	tm "github.com/aws/aws-sdk-go-v2/feature/s3/transfermanager"
	tmtypes "github.com/aws/aws-sdk-go-v2/feature/s3/transfermanager/types"
	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/podkeeper/podkeeper/agents/config"
	"github.com/podkeeper/podkeeper/agents/lifecycle"
	"github.com/podkeeper/podkeeper/agents/snapshot"
	"github.com/podkeeper/podkeeper/agents/store"
	_ "github.com/podkeeper/podkeeper/agents/store/backends"
	"github.com/podkeeper/podkeeper/agents/store/file"
	"github.com/podkeeper/podkeeper/restore"
	"github.com/podkeeper/podkeeper/test/peers"
)

const (
	restoreSmallFiles = 5000
	restoreSmallSize  = 4 << 10
	restoreLargeSize  = 1 << 30
)

type restoreSample struct {
	d   time.Duration
	rss int64 // peak RSS in KiB (processes only)
}

type restoreRow struct {
	caseName, tool string
	samples        []restoreSample
	items          int
	bytes          int64
}

func (r *restoreRow) median() restoreSample {
	s := slices.Clone(r.samples)
	sort.Slice(s, func(i, j int) bool { return s[i].d < s[j].d })
	return s[len(s)/2]
}

func TestBenchRestore(t *testing.T) {
	srv := peers.StartS3(t, benchS3())
	bin := agentBin(t, "restore")
	base := baselineBin(t, "restore")
	c := srv.Client()

	t.Log("uploading 5000 x 4 KiB ...")
	small := map[string][]byte{}
	for i := range restoreSmallFiles {
		b := make([]byte, restoreSmallSize)
		rand.Read(b)
		small[fmt.Sprintf("d%02d/f%05d.bin", i%50, i)] = b
	}
	restorePut(t, c, "small", small, 16)

	t.Log("uploading 1 GiB ...")
	big := make([]byte, restoreLargeSize)
	rand.Read(big)
	restorePutLarge(t, c, "large", "big.bin", big)
	big = nil

	// Rounds are interleaved (every contender once per round) so a change in
	// the machine's load hits all of them alike.
	rows := []*restoreRow{}
	runs := []func(round int){}
	add := func(caseName, tool string, items int, bytes int64, run func(dir string) restoreSample) *restoreRow {
		row := &restoreRow{caseName: caseName, tool: tool, items: items, bytes: bytes}
		rows = append(rows, row)
		runs = append(runs, func(round int) {
			dir := filepath.Join(t.TempDir(), "dst")
			// Flush what earlier contenders left dirty (rclone and the raw SDK
			// do not sync), so that a syncfs does not pay for their data and
			// background writeback does not slow the next run.
			syscall.Sync()
			s := run(dir)
			os.RemoveAll(dir)
			row.samples = append(row.samples, s)
			t.Logf("%s / %s round %d: %s", caseName, tool, round+1, s.d)
		})
		return row
	}
	const smallCase, largeCase = "5000 x 4 KiB", "1 x 1 GiB"
	smallBytes := int64(restoreSmallFiles * restoreSmallSize)

	rRestore := add(smallCase, "restore (binary, syncfs)", restoreSmallFiles, smallBytes, func(dir string) restoreSample {
		return restoreRunBin(t, bin, srv, "small", dir)
	})
	if base != "" {
		add(smallCase, "restore, baseline binary (BENCH_BASELINE_BIN_DIR)", restoreSmallFiles, smallBytes, func(dir string) restoreSample {
			return restoreRunBin(t, base, srv, "small", dir)
		})
	}
	add(smallCase, "restore in-process, syncfs", restoreSmallFiles, smallBytes, func(dir string) restoreSample {
		return restoreRunInProcess(t, srv, "small", dir, restore.SyncFS)
	})
	add(smallCase, "restore in-process, fsync each", restoreSmallFiles, smallBytes, func(dir string) restoreSample {
		return restoreRunInProcess(t, srv, "small", dir, restore.FsyncEach)
	})
	rRclone := add(smallCase, "rclone copy --transfers 16", restoreSmallFiles, smallBytes, func(dir string) restoreSample {
		return restoreRclone(t, srv, "small", dir)
	})
	rSDK := add(smallCase, "raw SDK, 16 concurrent GETs", restoreSmallFiles, smallBytes, func(dir string) restoreSample {
		return restoreRawSmall(t, c, "small", dir)
	})
	lRestore := add(largeCase, "restore (binary, syncfs)", 1, restoreLargeSize, func(dir string) restoreSample {
		return restoreRunBin(t, bin, srv, "large", dir)
	})
	if base != "" {
		add(largeCase, "restore, baseline binary (BENCH_BASELINE_BIN_DIR)", 1, restoreLargeSize, func(dir string) restoreSample {
			return restoreRunBin(t, base, srv, "large", dir)
		})
	}
	// What verification costs: the same run without the sha256 pass (the raw
	// SDK rows hash nothing).
	add(largeCase, "restore, RESTORE_VERIFY=false", 1, restoreLargeSize, func(dir string) restoreSample {
		return restoreRunBin(t, bin, srv, "large", dir, "RESTORE_VERIFY=false")
	})
	lSDK := add(largeCase, "raw SDK DownloadObject, 16 x 8 MiB ranges", 1, restoreLargeSize, func(dir string) restoreSample {
		return restoreRawLarge(t, c, "large", "big.bin", dir, false)
	})
	// restore makes the file durable before it reports success; this row pays
	// the same flush, to show what the gap above is made of.
	add(largeCase, "raw SDK DownloadObject + fsync", 1, restoreLargeSize, func(dir string) restoreSample {
		return restoreRawLarge(t, c, "large", "big.bin", dir, true)
	})

	// Rounds are interleaved within a case, and the cases run one after the
	// other: the 1 GiB writes must not sit between two small-file rounds.
	restoreRounds := benchRounds()
	for _, c := range []string{smallCase, largeCase} {
		for round := range restoreRounds {
			for i, run := range runs {
				if rows[i].caseName == c {
					run(round)
				}
			}
		}
	}

	var out strings.Builder
	fmt.Fprintf(&out, "\nrestore benchmark: versitygw on 127.0.0.1, median of %d runs, %s\n\n", restoreRounds, time.Now().UTC().Format("2006-01-02"))
	fmt.Fprintln(&out, "| Case | Tool | Time | Throughput | Peak RSS |")
	fmt.Fprintln(&out, "|---|---|---|---|---|")
	for _, r := range rows {
		m := r.median()
		rss := "-"
		if m.rss > 0 {
			rss = fmt.Sprintf("%d MiB", m.rss/1024)
		}
		tp := fmt.Sprintf("%.0f MB/s", float64(r.bytes)/m.d.Seconds()/1e6)
		if r.items > 1 {
			tp = fmt.Sprintf("%.0f files/s, ", float64(r.items)/m.d.Seconds()) + tp
		}
		fmt.Fprintf(&out, "| %s | %s | %.2f s | %s | %s |\n", r.caseName, r.tool, m.d.Seconds(), tp, rss)
	}
	ratio := func(a, b *restoreRow) float64 { return a.median().d.Seconds() / b.median().d.Seconds() }
	verdict := func(ok bool) string {
		if ok {
			return "met"
		}
		return "MISSED"
	}
	smallVsRclone := ratio(rRestore, rRclone)
	largeTP := ratio(lSDK, lRestore) // throughput ratio = inverse time ratio
	fmt.Fprintf(&out, "\nsmall files: restore time / rclone time = %.2f (target <= 0.50: %s); restore time / raw SDK time = %.2f\n",
		smallVsRclone, verdict(smallVsRclone <= 0.5), ratio(rRestore, rSDK))
	fmt.Fprintf(&out, "1 GiB: restore throughput / raw SDK throughput = %.2f (target >= 0.90: %s)\n", largeTP, verdict(largeTP >= 0.9))
	fmt.Print(out.String())
	t.Log(out.String())
}

func restoreEntry(p string, data []byte) snapshot.File {
	h := sha256.Sum256(data)
	return snapshot.File{Path: p, Size: int64(len(data)), SHA256: hex.EncodeToString(h[:]), MTime: time.Unix(1700000000, 5), Mode: 0o644}
}

func restorePut(t *testing.T, c *s3.Client, prefix string, files map[string][]byte, conc int) {
	t.Helper()
	ctx := context.Background()
	m := &snapshot.Manifest{Format: snapshot.Format, ID: snapshot.NewID(time.Now(), "bench"), Created: time.Now().UTC(), Files: []snapshot.File{}}
	sem := make(chan struct{}, conc)
	var wg sync.WaitGroup
	for p, data := range files {
		f := restoreEntry(p, data)
		m.Files = append(m.Files, f)
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			if _, err := c.PutObject(ctx, &s3.PutObjectInput{Bucket: aws.String(peers.Bucket), Key: aws.String(prefix + "/data/" + p),
				Body: bytes.NewReader(data), Metadata: f.Metadata()}); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	restorePutManifest(t, c, prefix, m)
}

func restorePutManifest(t *testing.T, c *s3.Client, prefix string, m *snapshot.Manifest) {
	t.Helper()
	slices.SortFunc(m.Files, func(a, b snapshot.File) int { return strings.Compare(a.Path, b.Path) })
	var buf bytes.Buffer
	if err := snapshot.Encode(&buf, m, true); err != nil {
		t.Fatal(err)
	}
	if _, err := c.PutObject(context.Background(), &s3.PutObjectInput{Bucket: aws.String(peers.Bucket), Key: aws.String(prefix + "/" + snapshot.Key(m.ID, true)), Body: bytes.NewReader(buf.Bytes())}); err != nil {
		t.Fatal(err)
	}
}

func restorePutLarge(t *testing.T, c *s3.Client, prefix, name string, data []byte) {
	t.Helper()
	f := restoreEntry(name, data)
	up := tm.New(c, func(o *tm.Options) {
		o.PartSizeBytes = 16 << 20
		o.Concurrency = 8
		o.RequestChecksumCalculation = aws.RequestChecksumCalculationWhenRequired
	})
	if _, err := up.UploadObject(context.Background(), &tm.UploadObjectInput{Bucket: aws.String(peers.Bucket), Key: aws.String(prefix + "/data/" + name),
		Body: bytes.NewReader(data), Metadata: f.Metadata()}); err != nil {
		t.Fatal(err)
	}
	restorePutManifest(t, c, prefix, &snapshot.Manifest{Format: snapshot.Format, ID: snapshot.NewID(time.Now(), "bench"), Created: time.Now().UTC(), Files: []snapshot.File{f}})
}

func restoreRunBin(t *testing.T, bin string, srv *peers.S3Server, prefix, dir string, extraEnv ...string) restoreSample {
	t.Helper()
	cmd, rss := restoreTimed(t, bin)
	cmd.Env = append(append(srv.AgentEnv(prefix), "RESTORE_DIR="+dir, "RESTORE_CONCURRENCY=16", "LOG_LEVEL=warn", "PATH="+os.Getenv("PATH")), extraEnv...)
	var errb bytes.Buffer
	cmd.Stderr = &errb
	start := time.Now()
	if err := cmd.Run(); err != nil {
		t.Fatalf("restore: %v\n%s", err, errb.String())
	}
	d := time.Since(start)
	return restoreSample{d: d, rss: rss()}
}

func restoreRunInProcess(t *testing.T, srv *peers.S3Server, prefix, dir string, dur restore.Durability) restoreSample {
	t.Helper()
	env := config.Env{"RESTORE_DIR": dir}
	for _, kv := range srv.AgentEnv(prefix) {
		k, v, _ := strings.Cut(kv, "=")
		env[k] = v
	}
	var cfg restore.Config
	if err := config.Load(&cfg, env); err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	start := time.Now()
	st, err := store.Open(context.Background(), &cfg.Store, log)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := newRestorer(&cfg, st, log, dur).Run(context.Background()); err != nil {
		t.Fatal(err)
	}
	return restoreSample{d: time.Since(start)}
}

func restoreRclone(t *testing.T, srv *peers.S3Server, prefix, dir string) restoreSample {
	t.Helper()
	cmd, rss := restoreTimed(t, peers.Bin(t, "rclone"), "copy", "bench:"+peers.Bucket+"/"+prefix+"/data", dir, "--transfers", "16")
	cmd.Env = append(os.Environ(),
		"RCLONE_CONFIG=/dev/null",
		"RCLONE_CONFIG_BENCH_TYPE=s3", "RCLONE_CONFIG_BENCH_PROVIDER=Other", "RCLONE_CONFIG_BENCH_ENDPOINT="+srv.Endpoint,
		"RCLONE_CONFIG_BENCH_ACCESS_KEY_ID="+peers.AccessKey, "RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY="+peers.SecretKey,
		"RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE=true", "RCLONE_CONFIG_BENCH_REGION=us-east-1")
	var errb bytes.Buffer
	cmd.Stderr = &errb
	start := time.Now()
	if err := cmd.Run(); err != nil {
		t.Fatalf("rclone: %v\n%s", err, errb.String())
	}
	d := time.Since(start)
	if n := restoreCount(t, dir); n != restoreSmallFiles {
		t.Fatalf("rclone copied %d files", n)
	}
	return restoreSample{d: d, rss: rss()}
}

// restoreTimed runs name under /usr/bin/time for its peak RSS: the rusage of a
// direct child of this (large) test process would report the parent's memory,
// which the child inherits until exec.
func restoreTimed(t *testing.T, name string, args ...string) (*exec.Cmd, func() int64) {
	out := filepath.Join(t.TempDir(), "rss")
	cmd := exec.Command("/usr/bin/time", append([]string{"-f", "%M", "-o", out, name}, args...)...)
	return cmd, func() int64 {
		b, err := os.ReadFile(out)
		if err != nil {
			return 0
		}
		var kib int64
		fmt.Sscan(strings.TrimSpace(string(b)), &kib)
		return kib
	}
}

func restoreCount(t *testing.T, dir string) int {
	n := 0
	filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			n++
		}
		return nil
	})
	return n
}

// restoreRawSmall lists the prefix and GETs every object, 16 at a time,
// into files: the floor a client can reach over this server.
func restoreRawSmall(t *testing.T, c *s3.Client, prefix, dir string) restoreSample {
	return restoreRawSmallN(t, c, prefix, dir, 16)
}

// restoreRawSmallN is restoreRawSmall with conc GETs at a time.
func restoreRawSmallN(t *testing.T, c *s3.Client, prefix, dir string, conc int) restoreSample {
	t.Helper()
	ctx := context.Background()
	start := time.Now()
	var keys []string
	p := s3.NewListObjectsV2Paginator(c, &s3.ListObjectsV2Input{Bucket: aws.String(peers.Bucket), Prefix: aws.String(prefix + "/data/")})
	for p.HasMorePages() {
		page, err := p.NextPage(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, o := range page.Contents {
			keys = append(keys, aws.ToString(o.Key))
		}
	}
	work := make(chan string)
	var wg sync.WaitGroup
	for range conc {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 64<<10)
			for k := range work {
				out, err := c.GetObject(ctx, &s3.GetObjectInput{Bucket: aws.String(peers.Bucket), Key: aws.String(k)})
				if err != nil {
					t.Error(err)
					continue
				}
				dst := filepath.Join(dir, strings.TrimPrefix(k, prefix+"/data/"))
				os.MkdirAll(filepath.Dir(dst), 0o755)
				f, err := os.Create(dst)
				if err == nil {
					_, err = io.CopyBuffer(f, out.Body, buf)
					f.Close()
				}
				out.Body.Close()
				if err != nil {
					t.Error(err)
				}
			}
		}()
	}
	for _, k := range keys {
		work <- k
	}
	close(work)
	wg.Wait()
	return restoreSample{d: time.Since(start)}
}

func restoreRawLarge(t *testing.T, c *s3.Client, prefix, name, dir string, fsync bool) restoreSample {
	t.Helper()
	os.MkdirAll(dir, 0o755)
	start := time.Now()
	f, err := os.Create(filepath.Join(dir, name))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	dl := tm.New(c, func(o *tm.Options) {
		o.PartSizeBytes = 8 << 20
		o.Concurrency = 16
		o.GetObjectType = tmtypes.GetObjectRanges
	})
	if _, err := dl.DownloadObject(context.Background(), &tm.DownloadObjectInput{Bucket: aws.String(peers.Bucket), Key: aws.String(prefix + "/data/" + name), WriterAt: f}); err != nil {
		t.Fatal(err)
	}
	if fsync {
		if err := f.Sync(); err != nil {
			t.Fatal(err)
		}
	}
	return restoreSample{d: time.Since(start)}
}

// TestBenchRestoreDurability isolates the durability choice on the file://
// store (no server competing for the CPU): 5000 x 4 KiB restored with one
// syncfs at the end versus an fsync per file plus one per directory,
// alternating, restoreDurabilityRounds times each.
func TestBenchRestoreDurability(t *testing.T) {
	const rounds = 5
	storeDir := t.TempDir()
	st, err := file.New(storeDir)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	m := &snapshot.Manifest{Format: snapshot.Format, ID: snapshot.NewID(time.Now(), "dur"), Created: time.Now().UTC(), Files: []snapshot.File{}}
	for i := range restoreSmallFiles {
		b := make([]byte, restoreSmallSize)
		rand.Read(b)
		f := restoreEntry(fmt.Sprintf("d%02d/f%05d.bin", i%50, i), b)
		if _, err := st.Put(ctx, snapshot.DataKey(f.Path), bytes.NewReader(b), f.Size, store.PutOptions{Metadata: f.Metadata()}); err != nil {
			t.Fatal(err)
		}
		m.Files = append(m.Files, f)
	}
	if _, err := snapshot.Write(ctx, st, m); err != nil {
		t.Fatal(err)
	}
	syscall.Sync() // the setup's own dirty data must not be billed to the first run
	modes := []struct {
		name string
		d    restore.Durability
	}{{"syncfs once", restore.SyncFS}, {"fsync each file + dirs", restore.FsyncEach}}
	times := make([][]time.Duration, len(modes))
	for round := range rounds {
		for i, mode := range modes {
			dir := filepath.Join(t.TempDir(), "dst")
			env := config.Env{"RESTORE_DIR": dir, "STORE_URL": "file://" + storeDir}
			var cfg restore.Config
			if err := config.Load(&cfg, env); err != nil {
				t.Fatal(err)
			}
			log := slog.New(slog.NewTextHandler(io.Discard, nil))
			start := time.Now()
			if _, err := newRestorer(&cfg, st, log, mode.d).Run(ctx); err != nil {
				t.Fatal(err)
			}
			d := time.Since(start)
			times[i] = append(times[i], d)
			t.Logf("%s round %d: %s", mode.name, round+1, d)
			os.RemoveAll(dir)
		}
	}
	var out strings.Builder
	fmt.Fprintf(&out, "\nrestore durability, 5000 x 4 KiB from file://, median of %d alternating runs\n\n| Durability | Time | Files/s |\n|---|---|---|\n", rounds)
	med := make([]time.Duration, len(modes))
	for i, mode := range modes {
		s := slices.Clone(times[i])
		slices.Sort(s)
		med[i] = s[len(s)/2]
		fmt.Fprintf(&out, "| %s | %.2f s | %.0f |\n", mode.name, med[i].Seconds(), restoreSmallFiles/med[i].Seconds())
	}
	fmt.Fprintf(&out, "\nfsync each / syncfs = %.2f\n", med[1].Seconds()/med[0].Seconds())
	fmt.Print(out.String())
}

func newRestorer(cfg *restore.Config, st store.Store, log *slog.Logger, d restore.Durability) *restore.Restorer {
	r := restore.New(cfg, lifecycle.Deps{Store: st, Log: log})
	r.Durability = d
	return r
}
