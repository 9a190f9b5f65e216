//go:build bench

// Many-writer benchmarks (issue 12), real binaries on versitygw (BENCH_S3=minio
// for MinIO):
//
//	(1) restore of a prefix holding a checkpoint of BENCH_FLEET_FILES (default
//	    100 000) files plus 100 log batches of 100 changes (5000 overwrites of
//	    checkpoint files, 3000 new files, 2000 deletions): planning time, total
//	    time, peak RSS of the restore process; beside it, each round, the
//	    restore of the same files as one plain snapshot (no log to fold)
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
	fleetSyncFiles    = 5000 // per syncer in (2): acks come in SYNC_LOG_INTERVAL (1 s) steps, so runs of several seconds
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
func fleetBuildPrefix(t *testing.T, c *s3.Client, st store.Store, prefix, flat string, n int) fleetPrefix {
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

	// The same files as one plain snapshot under flat: the restore that reads
	// no log, to compare with.
	fm := &snapshot.Manifest{Format: snapshot.Format, ID: snapshot.NewID(now, "flat"), Created: now,
		Writer: snapshot.Writer{Namespace: "bench", Pod: "flat"}, Files: make([]snapshot.File, 0, len(final))}
	for _, f := range m.Files {
		if data, ok := final[f.Path]; ok {
			fm.Files = append(fm.Files, fleetFileEntry(f.Path, data, base))
		}
	}
	for p, data := range final {
		if strings.HasPrefix(p, "new/") {
			fm.Files = append(fm.Files, fleetFileEntry(p, data, base))
		}
	}
	restorePutManifest(t, c, flat, fm)

	// The data objects of both prefixes, 32 PUTs at a time.
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
				var err error
				for _, pre := range []string{prefix, flat} {
					if err == nil {
						_, err = c.PutObject(ctx, &s3.PutObjectInput{Bucket: aws.String(peers.Bucket), Key: aws.String(pre + "/" + snapshot.DataKey(p)),
							Body: bytes.NewReader(data), ContentLength: aws.Int64(int64(len(data)))})
					}
				}
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
}

// fleetRestore runs the restore binary at LOG_LEVEL=info and reads its JSON
// log as it comes: planning time is process start until the "plan" line
// (logged after the fold and the plan against the directory, before the first
// fetch); peak RSS is /usr/bin/time's maximum resident set of the restore
// process alone (restoreTimed).
func fleetRestore(t *testing.T, bin string, srv *peers.S3Server, prefix, dir string, extraEnv ...string) fleetRestoreSample {
	t.Helper()
	cmd, rss := restoreTimed(t, bin)
	cmd.Env = append(srv.AgentEnv(prefix), "RESTORE_DIR="+dir, "RESTORE_CONCURRENCY=16", "LOG_LEVEL=info", "LOG_FORMAT=json", "PATH="+os.Getenv("PATH"))
	cmd.Env = append(cmd.Env, extraEnv...)
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
	fp := fleetBuildPrefix(t, c, st, "big", "flat", n)
	t.Logf("(1) setup: %s (%.0f objects/s)", fp.setup.Round(time.Millisecond), float64(fp.files)/fp.setup.Seconds())
	restoreBin := agentBin(t, "restore")
	// Each round: the fold in this process, the restore of the prefix (the
	// fold), and the restore of the same files as one plain snapshot (no log
	// to read: what the fold adds to planning and memory).
	var samples, cpSamples []fleetRestoreSample
	restoreInto := func(prefix string, want int) fleetRestoreSample {
		dir := filepath.Join(t.TempDir(), "dst")
		syscall.Sync()
		s := fleetRestore(t, restoreBin, srv, prefix, dir)
		// restoreCount counts .podkeeper/restored.json too.
		if got := restoreCount(t, dir) - restoreCount(t, filepath.Join(dir, ".podkeeper")); got != want {
			t.Fatalf("restored %d files, want %d", got, want)
		}
		os.RemoveAll(dir)
		return s
	}
	for round := range rounds {
		fs := time.Now()
		m, err := changelog.Fold(ctx, st, time.Time{})
		if err != nil {
			t.Fatal(err)
		}
		fold := time.Since(fs)
		if len(m.Files) != fp.files {
			t.Fatalf("fold has %d files, want %d", len(m.Files), fp.files)
		}
		m = nil
		s := restoreInto("big", fp.files)
		s.fold = fold
		samples = append(samples, s)
		cs := restoreInto("flat", fp.files)
		cpSamples = append(cpSamples, cs)
		t.Logf("(1) round %d: fold in-process %s; latest: plan %s, total %s, peak RSS %d MiB; plain snapshot: plan %s, total %s, peak RSS %d MiB",
			round+1, s.fold, s.plan, s.total, s.rss/1024, cs.plan, cs.total, cs.rss/1024)
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

	oneM, threeM := syncerMedian(one), syncerMedian(three)
	rate := func(d time.Duration) float64 { return float64(total) / d.Seconds() }
	secs := func(d time.Duration) string { return fmt.Sprintf("%.2f s", d.Seconds()) }
	// cell is the median of one measure over ss with every round in brackets.
	cell := func(ss []fleetRestoreSample, f func(fleetRestoreSample) time.Duration) string {
		var d []time.Duration
		for _, s := range ss {
			d = append(d, f(s))
		}
		return secs(syncerMedian(d)) + " (" + fleetDurs(d) + ")"
	}
	rssCell := func(ss []fleetRestoreSample) string {
		var all []string
		var top int64
		for _, s := range ss {
			all = append(all, strconv.FormatInt(s.rss/1024, 10))
			top = max(top, s.rss)
		}
		return fmt.Sprintf("%d MiB (%s)", top/1024, strings.Join(all, ", "))
	}
	rateCell := func(ss []fleetRestoreSample, files int) string {
		var d []time.Duration
		for _, s := range ss {
			d = append(d, s.total)
		}
		return fmt.Sprintf("%.0f", float64(files)/syncerMedian(d).Seconds())
	}
	plan := func(s fleetRestoreSample) time.Duration { return s.plan }
	tot := func(s fleetRestoreSample) time.Duration { return s.total }
	var out strings.Builder
	fmt.Fprintf(&out, "\nmany-writer benchmarks on %s (loopback, %s), medians of %d rounds (every round in brackets)\n\n", benchS3(), time.Now().UTC().Format("2006-01-02"), rounds)
	fmt.Fprintf(&out, "(1) restore of a checkpoint of %d files + %d batches × %d changes (%d overwrites, %d new, %d deletions) = %d live files of 16 B; setup %.0f s\n\n",
		fp.checkpoint, fleetBatches, fleetBatchChanges, fp.overwrites, fp.added, fp.deleted, fp.files, fp.setup.Seconds())
	fmt.Fprintf(&out, "| measure | checkpoint + %d batches (%d files) | the same files as one plain snapshot, no log |\n|---|---|---|\n", fleetBatches, fp.files)
	fmt.Fprintf(&out, "| changelog.Fold in the test process (list + checkpoint + batches) | %s | - |\n", cell(samples, func(s fleetRestoreSample) time.Duration { return s.fold }))
	fmt.Fprintf(&out, "| planning: restore start → \"plan\" logged (before the first fetch) | %s | %s |\n", cell(samples, plan), cell(cpSamples, plan))
	fmt.Fprintf(&out, "| total: restore start → exit (all fetched, syncfs, restored.json) | %s | %s |\n", cell(samples, tot), cell(cpSamples, tot))
	fmt.Fprintf(&out, "| files/s (median total) | %s | %s |\n", rateCell(samples, fp.files), rateCell(cpSamples, fp.files))
	fmt.Fprintf(&out, "| peak RSS of the restore process (/usr/bin/time %%M), max (rounds) | %s | %s |\n", rssCell(samples), rssCell(cpSamples))
	fmt.Fprintf(&out, "\nplanning / total: with the log %.3f, plain snapshot %.3f; planning with the log / plain snapshot = %.2f\n",
		syncerMedian(fleetPick(samples, plan)).Seconds()/syncerMedian(fleetPick(samples, tot)).Seconds(),
		syncerMedian(fleetPick(cpSamples, plan)).Seconds()/syncerMedian(fleetPick(cpSamples, tot)).Seconds(),
		syncerMedian(fleetPick(samples, plan)).Seconds()/syncerMedian(fleetPick(cpSamples, plan)).Seconds())
	fmt.Fprintf(&out, "\n(2) %d files of 4 KiB uploaded to one prefix, SYNC_SETTLE=0, SYNC_CONCURRENCY=16 each; time from start until every file is acknowledged (uploads_total{result=\"ok\"}, counted after its batch is stored)\n\n", total)
	fmt.Fprintf(&out, "| writers | median | files/s | rounds |\n|---|---|---|---|\n")
	fmt.Fprintf(&out, "| 1 syncer × %d files | %s | %.0f | %s |\n", total, secs(oneM), rate(oneM), fleetDurs(one))
	fmt.Fprintf(&out, "| %d syncers × %d files | %s | %.0f | %s |\n", fleetSyncers, fleetSyncFiles, secs(threeM), rate(threeM), fleetDurs(three))
	fmt.Fprintf(&out, "\naggregate rate, %d syncers / 1 syncer = %.2f\n", fleetSyncers, rate(threeM)/rate(oneM))
	fmt.Print(out.String())
	t.Log(out.String())
}

func fleetPick(ss []fleetRestoreSample, f func(fleetRestoreSample) time.Duration) []time.Duration {
	var d []time.Duration
	for _, s := range ss {
		d = append(d, f(s))
	}
	return d
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
	done := make([]time.Duration, len(procs)) // when each had acknowledged all of its files
	err := peers.WaitFor(context.Background(), 10*time.Minute, func() error {
		var err error
		for i, p := range procs {
			if done[i] != 0 {
				continue
			}
			if v := p.metric(`podkeeper_syncer_uploads_total{result="ok"}`); v < float64(perSyncer) {
				err = fmt.Errorf("syncer %d: %v of %d acknowledged", i, v, perSyncer)
			} else {
				done[i] = time.Since(start)
			}
		}
		return err
	})
	d := time.Since(start)
	t.Logf("%s: each syncer done after %s", prefix, fleetDurs(done))
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
