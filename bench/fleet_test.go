//go:build bench

// Many-writer benchmarks (issue 12), real binaries on versitygw (BENCH_S3=minio
// for MinIO):
//
//	(1) restore of a prefix holding a checkpoint of BENCH_FLEET_FILES (default
//	    100 000) files plus 100 log batches of 100 changes (5000 overwrites of
//	    checkpoint files, 3000 new files, 2000 deletions): planning time, total
//	    time, peak RSS of the restore process
//	(2) aggregate upload rate of 3 syncers on one prefix, each on its own
//	    directory of fleetSyncFiles files, versus 1 syncer with all 3 × that
//
// Nothing is asserted about timings: the figures and ratios are printed.
package bench

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/podkeeper/podkeeper/agents/changelog"
	"github.com/podkeeper/podkeeper/agents/snapshot"
	"github.com/podkeeper/podkeeper/agents/store"
	"github.com/podkeeper/podkeeper/test/peers"
)

const (
	fleetBatches      = 100
	fleetBatchChanges = 100 // per batch: 50 overwrites, 30 new files, 20 deletions
	fleetSyncers      = 3
	fleetSyncFiles    = 2000 // per syncer in (2)
	fleetSyncSize     = 4 << 10
)

// fleetCheckpointFiles is the checkpoint's size in (1): BENCH_FLEET_FILES,
// default 100 000 (scale it down when the setup is too slow for the machine).
func fleetCheckpointFiles() int {
	if n, err := strconv.Atoi(os.Getenv("BENCH_FLEET_FILES")); err == nil && n >= fleetBatches*fleetBatchChanges {
		return n
	}
	return 100_000
}

func fleetFileEntry(p string, data []byte, mtime time.Time) snapshot.File {
	h := sha256.Sum256(data)
	return snapshot.File{Path: p, Size: int64(len(data)), SHA256: hex.EncodeToString(h[:]), MTime: mtime, Mode: 0o644}
}

// fleetContent is the 16-byte content of path p at version v.
func fleetContent(p string, v int) []byte {
	b := make([]byte, 16)
	h := sha256.Sum256([]byte(p + "#" + strconv.Itoa(v)))
	copy(b, h[:])
	return b
}

type fleetPrefix struct {
	files      int // live files in the fold
	checkpoint int
	overwrites int
	added      int
	deleted    int
	setup      time.Duration
}

// fleetBuildPrefix writes the checkpoint manifest, the batches (changelog.Append
// through the store API) and the final content of every live path (raw SDK
// PutObject, 16 bytes each, no metadata: restore checks what it fetched against
// the fold's sha256 and size, not against object metadata).
func fleetBuildPrefix(t *testing.T, srv *peers.S3Server, c *s3.Client, st store.Store, prefix string, n int) fleetPrefix {
	t.Helper()
	ctx := context.Background()
	start := time.Now()
	base := time.Unix(1700000000, 0)
	now := time.Now().UTC()
	cpTime := now.Add(-2 * time.Hour)

	final := map[string][]byte{} // live path -> content
	m := &snapshot.Manifest{Format: snapshot.Format, ID: snapshot.NewID(cpTime, "bench"), Created: cpTime,
		Writer: snapshot.Writer{Namespace: "bench", Pod: "compactor"}, Files: make([]snapshot.File, 0, n)}
	for i := range n {
		p := fmt.Sprintf("d%03d/f%06d.bin", i%200, i)
		b := fleetContent(p, 0)
		final[p] = b
		m.Files = append(m.Files, fleetFileEntry(p, b, base))
	}
	restorePutManifest(t, c, prefix, m)

	// Batches by three writers, stamped an hour after the checkpoint. Batch k
	// overwrites checkpoint files k*50 .. k*50+49, deletes 20 files from the
	// checkpoint's far end and adds 30 new ones.
	writers := []changelog.Writer{{Namespace: "bench", Pod: "w0", UID: "u0"}, {Namespace: "bench", Pod: "w1", UID: "u1"}, {Namespace: "bench", Pod: "w2", UID: "u2"}}
	var fp fleetPrefix
	fp.checkpoint = n
	for k := range fleetBatches {
		bt := cpTime.Add(time.Hour + time.Duration(k)*time.Second)
		mt := base.Add(time.Duration(k+1) * time.Minute)
		b := &changelog.Batch{Writer: writers[k%len(writers)], Time: bt}
		for j := range 50 {
			p := m.Files[k*50+j].Path
			data := fleetContent(p, k+1)
			final[p] = data
			b.Changes = append(b.Changes, changelog.Change{File: fleetFileEntry(p, data, mt)})
			fp.overwrites++
		}
		for j := range 30 {
			p := fmt.Sprintf("new/b%03d/f%02d.bin", k, j)
			data := fleetContent(p, k+1)
			final[p] = data
			b.Changes = append(b.Changes, changelog.Change{File: fleetFileEntry(p, data, mt)})
			fp.added++
		}
		for j := range 20 {
			p := m.Files[n-1-(k*20+j)].Path
			delete(final, p)
			b.Changes = append(b.Changes, changelog.Change{File: snapshot.File{Path: p, MTime: mt}, Deleted: true})
			fp.deleted++
		}
		if _, err := changelog.Append(ctx, st, b); err != nil {
			t.Fatal(err)
		}
	}
	fp.files = len(final)

	// The data objects, 32 PUTs at a time.
	work := make(chan string)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var firstErr error
	for range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for p := range work {
				data := final[p]
				_, err := c.PutObject(ctx, &s3.PutObjectInput{Bucket: aws.String(peers.Bucket), Key: aws.String(prefix + "/" + snapshot.DataKey(p)),
					Body: bytes.NewReader(data), ContentLength: aws.Int64(int64(len(data)))})
				if err != nil {
					mu.Lock()
					firstErr = err
					mu.Unlock()
				}
			}
		}()
	}
	for p := range final {
		work <- p
	}
	close(work)
	wg.Wait()
	if firstErr != nil {
		t.Fatal(firstErr)
	}
	fp.setup = time.Since(start)
	return fp
}

type fleetRestoreSample struct {
	plan, total, fold time.Duration
	rss               int64 // KiB
	fetch             string
}

// fleetRestore runs the restore binary at LOG_LEVEL=info and reads its JSON
// log as it comes: planning time is process start until the "plan" line
// (logged after the fold and the plan against the directory, before the first
// fetch); peak RSS is /usr/bin/time's maximum resident set of the restore
// process alone (restoreTimed).
func fleetRestore(t *testing.T, bin string, srv *peers.S3Server, prefix, dir string) fleetRestoreSample {
	t.Helper()
	cmd, rss := restoreTimed(t, bin)
	cmd.Env = append(srv.AgentEnv(prefix), "RESTORE_DIR="+dir, "RESTORE_CONCURRENCY=16", "LOG_LEVEL=info", "LOG_FORMAT=json", "PATH="+os.Getenv("PATH"))
	pr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	var s fleetRestoreSample
	var logb bytes.Buffer
	start := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(pr)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if s.plan == 0 && strings.Contains(line, `"msg":"plan"`) {
			s.plan = time.Since(start)
			if i := strings.Index(line, `"fetch_files":`); i >= 0 {
				s.fetch, _, _ = strings.Cut(line[i+len(`"fetch_files":`):], ",")
			}
		}
		logb.WriteString(line + "\n")
	}
	io.Copy(io.Discard, pr)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("restore: %v\n%s", err, logb.String())
	}
	s.total = time.Since(start)
	s.rss = rss()
	if s.plan == 0 {
		t.Fatalf("restore logged no plan line\n%s", logb.String())
	}
	return s
}

func TestBenchFleet(t *testing.T) {
	srv := peers.StartS3(t, benchS3())
	c := srv.Client()
	ctx := context.Background()
	rounds := benchRounds()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))

	// (1) restore of a big checkpoint plus a log tail
	n := fleetCheckpointFiles()
	st, err := store.Open(ctx, srv.StoreConfig(t, "big"), log)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("(1) writing a %d-file checkpoint, %d batches and the data objects ...", n, fleetBatches)
	fp := fleetBuildPrefix(t, srv, c, st, "big", n)
	t.Logf("(1) setup: %s (%.0f objects/s)", fp.setup.Round(time.Millisecond), float64(fp.files)/fp.setup.Seconds())
	restoreBin := agentBin(t, "restore")
	var samples []fleetRestoreSample
	for round := range rounds {
		// The fold alone, in this process, as restore runs it (list, the
		// checkpoint, the batches after it, the fold into a manifest).
		fs := time.Now()
		m, err := changelog.Fold(ctx, st, time.Time{})
		if err != nil {
			t.Fatal(err)
		}
		fold := time.Since(fs)
		if len(m.Files) != fp.files {
			t.Fatalf("fold has %d files, want %d", len(m.Files), fp.files)
		}
		dir := filepath.Join(t.TempDir(), "dst")
		syscall.Sync()
		s := fleetRestore(t, restoreBin, srv, "big", dir)
		s.fold = fold
		// restoreCount counts .podkeeper/restored.json too.
		if got := restoreCount(t, dir) - restoreCount(t, filepath.Join(dir, ".podkeeper")); got != fp.files {
			t.Fatalf("restored %d files, want %d", got, fp.files)
		}
		os.RemoveAll(dir)
		samples = append(samples, s)
		t.Logf("(1) round %d: fold in-process %s, plan %s, total %s, peak RSS %d MiB", round+1, s.fold, s.plan, s.total, s.rss/1024)
	}

	// (2) 3 syncers on one prefix vs 1 syncer, the same files
	syncerBin := agentBin(t, "syncer")
	// all/ holds every file, w<k>/ the third syncer k writes, as hard links
	// of the same files (the agents follow no symlink): the same relative
	// paths, disjoint between the three writers.
	src := t.TempDir()
	total := fleetSyncers * fleetSyncFiles
	all := filepath.Join(src, "all")
	dirs := make([]string, fleetSyncers)
	for w := range fleetSyncers {
		dirs[w] = filepath.Join(src, fmt.Sprintf("w%d", w))
		for i := range fleetSyncFiles {
			rel := filepath.Join(fmt.Sprintf("d%02d", i%20), fmt.Sprintf("w%d-f%05d.bin", w, i))
			p := filepath.Join(all, rel)
			if i < 20 {
				os.MkdirAll(filepath.Dir(p), 0o755)
				os.MkdirAll(filepath.Join(dirs[w], filepath.Dir(rel)), 0o755)
			}
			b := bytes.Repeat([]byte{byte(i)}, fleetSyncSize)
			copy(b, fmt.Sprintf("w%d %d", w, i))
			if err := os.WriteFile(p, b, 0o644); err != nil {
				t.Fatal(err)
			}
			if err := os.Link(p, filepath.Join(dirs[w], rel)); err != nil {
				t.Fatal(err)
			}
		}
	}
	var one, three []time.Duration
	for round := range rounds {
		d := fleetSyncRun(t, syncerBin, srv, fmt.Sprintf("s%d-one", round), []string{all}, total)
		one = append(one, d)
		d3 := fleetSyncRun(t, syncerBin, srv, fmt.Sprintf("s%d-three", round), dirs, fleetSyncFiles)
		three = append(three, d3)
		t.Logf("(2) round %d: 1 syncer %s, %d syncers %s", round+1, d, fleetSyncers, d3)
	}

	med := func(f func(fleetRestoreSample) time.Duration) time.Duration {
		var d []time.Duration
		for _, s := range samples {
			d = append(d, f(s))
		}
		return syncerMedian(d)
	}
	var maxRSS int64
	for _, s := range samples {
		maxRSS = max(maxRSS, s.rss)
	}
	planM, totalM, foldM := med(func(s fleetRestoreSample) time.Duration { return s.plan }), med(func(s fleetRestoreSample) time.Duration { return s.total }),
		med(func(s fleetRestoreSample) time.Duration { return s.fold })
	oneM, threeM := syncerMedian(one), syncerMedian(three)
	rate := func(d time.Duration) float64 { return float64(total) / d.Seconds() }
	var out strings.Builder
	fmt.Fprintf(&out, "\nmany-writer benchmarks on %s (loopback, %s), median of %d rounds\n\n", benchS3(), time.Now().UTC().Format("2006-01-02"), rounds)
	fmt.Fprintf(&out, "(1) restore of a checkpoint of %d files + %d batches × %d changes (%d overwrites, %d new, %d deletions) = %d live files of 16 B; setup %.0f s\n\n",
		fp.checkpoint, fleetBatches, fleetBatchChanges, fp.overwrites, fp.added, fp.deleted, fp.files, fp.setup.Seconds())
	fmt.Fprintf(&out, "| measure | median | rounds |\n|---|---|---|\n")
	list := func(f func(fleetRestoreSample) string) string {
		var s []string
		for _, x := range samples {
			s = append(s, f(x))
		}
		return strings.Join(s, ", ")
	}
	secs := func(d time.Duration) string { return fmt.Sprintf("%.2f s", d.Seconds()) }
	fmt.Fprintf(&out, "| changelog.Fold in the test process (list + checkpoint + %d batches + fold) | %s | %s |\n", fleetBatches, secs(foldM), list(func(s fleetRestoreSample) string { return secs(s.fold) }))
	fmt.Fprintf(&out, "| restore binary: start → \"plan\" logged (fold + plan, before the first fetch) | %s | %s |\n", secs(planM), list(func(s fleetRestoreSample) string { return secs(s.plan) }))
	fmt.Fprintf(&out, "| restore binary: total (%s files fetched, syncfs, restored.json) | %s, %.0f files/s | %s |\n", samples[0].fetch, secs(totalM), float64(fp.files)/totalM.Seconds(), list(func(s fleetRestoreSample) string { return secs(s.total) }))
	fmt.Fprintf(&out, "| restore binary: peak RSS (/usr/bin/time %%M) | %d MiB (max) | %s |\n", maxRSS/1024, list(func(s fleetRestoreSample) string { return fmt.Sprintf("%d MiB", s.rss/1024) }))
	fmt.Fprintf(&out, "\nplanning share of the restore: %.2f\n", planM.Seconds()/totalM.Seconds())
	fmt.Fprintf(&out, "\n(2) %d files of 4 KiB uploaded to one prefix, SYNC_SETTLE=0, SYNC_CONCURRENCY=16 each; time from start until every file is acknowledged (uploads_total{result=\"ok\"}, counted after its batch is stored)\n\n", total)
	fmt.Fprintf(&out, "| writers | median | files/s | rounds |\n|---|---|---|---|\n")
	fmt.Fprintf(&out, "| 1 syncer × %d files | %s | %.0f | %s |\n", total, secs(oneM), rate(oneM), fleetDurs(one))
	fmt.Fprintf(&out, "| %d syncers × %d files | %s | %.0f | %s |\n", fleetSyncers, fleetSyncFiles, secs(threeM), rate(threeM), fleetDurs(three))
	fmt.Fprintf(&out, "\naggregate rate, %d syncers / 1 syncer = %.2f\n", fleetSyncers, rate(threeM)/rate(oneM))
	fmt.Print(out.String())
	t.Log(out.String())
}

func fleetDurs(d []time.Duration) string {
	var s []string
	for _, x := range d {
		s = append(s, fmt.Sprintf("%.2f s", x.Seconds()))
	}
	return strings.Join(s, ", ")
}

// fleetSyncRun starts one syncer per directory on prefix at once and times
// until every one has acknowledged perSyncer files (the slowest one ends it),
// then checks that the fold of the prefix holds them all.
func fleetSyncRun(t *testing.T, bin string, srv *peers.S3Server, prefix string, dirs []string, perSyncer int) time.Duration {
	t.Helper()
	syscall.Sync()
	start := time.Now()
	procs := make([]*syncerProc, len(dirs))
	for i, dir := range dirs {
		procs[i] = syncerStart(t, bin, srv, srv.Endpoint, prefix, dir, "SYNC_SETTLE=0s", "SYNC_CONCURRENCY=16",
			fmt.Sprintf("POD_NAME=bench-%d", i), fmt.Sprintf("POD_UID=%s-%d", prefix, i))
	}
	err := peers.WaitFor(context.Background(), 10*time.Minute, func() error {
		for i, p := range procs {
			if v := p.metric(`podkeeper_syncer_uploads_total{result="ok"}`); v < float64(perSyncer) {
				return fmt.Errorf("syncer %d: %v of %d acknowledged", i, v, perSyncer)
			}
		}
		return nil
	})
	d := time.Since(start)
	if err != nil {
		var logs strings.Builder
		for _, p := range procs {
			logs.WriteString(p.log.String())
		}
		t.Fatalf("%v\n%s", err, logs.String())
	}
	for _, p := range procs {
		p.stop(t)
	}
	st, err := store.Open(context.Background(), srv.StoreConfig(t, prefix), slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	m, err := changelog.Fold(context.Background(), st, time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	if len(m.Files) != perSyncer*len(dirs) {
		t.Fatalf("%s: fold holds %d files, want %d", prefix, len(m.Files), perSyncer*len(dirs))
	}
	return d
}
