package syncer

import (
	"errors"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/podkeeper/podkeeper/agents/config"
)

func TestConfigReportsEveryBadValue(t *testing.T) {
	env := config.Env{
		"STORE_URL":              "s3://bucket/prefix",
		"SYNC_DIR":               "relative/dir",
		"SYNC_EXCLUDE":           "*.tmp,[bad",
		"SYNC_SETTLE":            "-1s",
		"SYNC_CONCURRENCY":       "0",
		"SYNC_MAX_FILE_SIZE":     "-5",
		"SYNC_SNAPSHOT_INTERVAL": "10ms",
		"SYNC_SNAPSHOT_RETAIN":   "0",
		"SYNC_SHUTDOWN_TIMEOUT":  "0s",
		"SYNC_STATE_DIR":         "state",
		"SYNC_DELETE":            "maybe",
		"SYNC_MAX_CONCURRENCY":   "5000",
		"SYNC_PULL_INTERVAL":     "1ms",
		"SYNC_PULL_MAX_BYTES":    "-1",
		"SYNC_PULL":              "sometimes",
	}
	err := config.Load(&Config{}, env)
	var ce *config.Error
	if !errors.As(err, &ce) {
		t.Fatalf("want *config.Error, got %v", err)
	}
	var vars []string
	for _, fe := range ce.Errors {
		vars = append(vars, fe.Var)
	}
	for _, want := range []string{"SYNC_DIR", "SYNC_EXCLUDE", "SYNC_SETTLE", "SYNC_CONCURRENCY", "SYNC_MAX_FILE_SIZE",
		"SYNC_SNAPSHOT_INTERVAL", "SYNC_SNAPSHOT_RETAIN", "SYNC_SHUTDOWN_TIMEOUT", "SYNC_STATE_DIR", "SYNC_DELETE",
		"SYNC_MAX_CONCURRENCY", "SYNC_PULL_INTERVAL", "SYNC_PULL_MAX_BYTES", "SYNC_PULL"} {
		if !slices.Contains(vars, want) {
			t.Errorf("no problem reported for %s; got %v", want, err)
		}
	}
}

func TestConfigDefaults(t *testing.T) {
	dir := t.TempDir()
	var c Config
	if err := config.Load(&c, config.Env{"STORE_URL": "file:///tmp/x", "SYNC_DIR": dir}); err != nil {
		t.Fatal(err)
	}
	if c.StateDir != filepath.Join(dir, ".podkeeper") || c.Concurrency != 16 || c.MaxConcurrency != 128 || c.Pull || c.PullInterval != time.Second || c.SnapshotRetain != 48 || c.Delete || c.AllowMassDelete {
		t.Errorf("defaults: %+v", c)
	}
	if err := config.Load(&Config{}, config.Env{"STORE_URL": "file:///tmp/x", "SYNC_DIR": filepath.Join(dir, "missing")}); err == nil {
		t.Error("a missing SYNC_DIR was accepted")
	}
}

func TestExcluded(t *testing.T) {
	var c Config
	if err := config.Load(&c, config.Env{"STORE_URL": "file:///tmp/x", "SYNC_DIR": t.TempDir(), "SYNC_EXCLUDE": DefaultExclude + ", cache/*"}); err != nil {
		t.Fatal(err)
	}
	w := newWatcher(&c, nil, nil)
	for rel, want := range map[string]bool{
		"a.tmp": true, "d/e/f.part": true, "x.partial": true, ".f.swp": true, "notes~": true, "d/.#lock": true,
		"cache/x": true, "cache/sub/x": false, "a.txt": false, "tmp/a.txt": false, "d/a.tmpl": false,
	} {
		if got := w.excluded(rel); got != want {
			t.Errorf("excluded(%q) = %v, want %v", rel, got, want)
		}
	}
	for abs, want := range map[string]bool{
		filepath.Join(c.Dir, ".podkeeper", "restored.json"): false,
		filepath.Join(c.Dir, "a", ".podkeeper"):             true,
		c.Dir:                                               false,
		filepath.Dir(c.Dir):                                 false,
		filepath.Join(c.Dir, "ok.txt"):                      true,
	} {
		if _, ok := w.rel(abs); ok != want {
			t.Errorf("rel(%q) ok = %v, want %v", abs, ok, want)
		}
	}
}
