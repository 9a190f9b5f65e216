//go:build bench

package bench

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/podkeeper/podkeeper/test/peers"
)

// benchS3 is the S3 server the restore and syncer benchmarks run on:
// versitygw (the reference) unless BENCH_S3=minio: a second server
// with another request path and storage layout, to tell what is the agents'
// cost and what is the server's.
func benchS3() string {
	if k := os.Getenv("BENCH_S3"); k != "" {
		return k
	}
	return "versitygw"
}

// agentBin is the agent binary a benchmark runs: BENCH_BIN_DIR/name when
// BENCH_BIN_DIR is set (e.g. bin/ after make build), otherwise a fresh
// stripped build of ./cmd/name.
func agentBin(t *testing.T, name string) string {
	t.Helper()
	if d := os.Getenv("BENCH_BIN_DIR"); d != "" {
		bin := filepath.Join(d, name)
		if _, err := os.Stat(bin); err != nil {
			t.Fatalf("BENCH_BIN_DIR: %v", err)
		}
		return bin
	}
	bin := filepath.Join(t.TempDir(), name)
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w", "-o", bin, "./cmd/"+name)
	cmd.Dir = peers.Root()
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build %s: %v\n%s", name, err, out)
	}
	return bin
}

// baselineBin is BENCH_BASELINE_BIN_DIR/name, or "" when that variable is
// unset. When set, each suite runs that binary as one more contender,
// interleaved with the others in the same run: the honest before/after
// comparison of a change on a noisy machine (build the previous commit's
// agents into a directory and point the variable at it).
func baselineBin(t *testing.T, name string) string {
	t.Helper()
	d := os.Getenv("BENCH_BASELINE_BIN_DIR")
	if d == "" {
		return ""
	}
	bin := filepath.Join(d, name)
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("BENCH_BASELINE_BIN_DIR: %v", err)
	}
	return bin
}

// benchRounds is the number of interleaved rounds of each suite, medians
// reported: BENCH_ROUNDS, default 3 (more on a shared, noisy machine).
func benchRounds() int {
	if n, err := strconv.Atoi(os.Getenv("BENCH_ROUNDS")); err == nil && n > 0 {
		return n
	}
	return 3
}
