package restore

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/podkeeper/podkeeper/agents/config"
)

func TestConfigValidation(t *testing.T) {
	base := config.Env{"STORE_URL": "file:///srv/store", "RESTORE_DIR": "/data"}
	var c Config
	if err := config.Load(&c, base); err != nil {
		t.Fatal(err)
	}
	if c.StateDir != "/data/.podkeeper" || c.stateRel() != ".podkeeper" || c.Concurrency != 16 || !c.Verify || c.Mode != ModeMerge || c.IfMissing != IfMissingEmpty || c.Snapshot != "latest" {
		t.Errorf("defaults: %+v", c)
	}
	for _, tc := range []struct{ kv, want string }{
		{"RESTORE_DIR=data", "RESTORE_DIR"},
		{"RESTORE_DIR=/", "RESTORE_DIR"},
		{"RESTORE_CONCURRENCY=0", "between 1 and 256"},
		{"RESTORE_CONCURRENCY=1000", "between 1 and 256"},
		{"RESTORE_SNAPSHOT=yesterday", "RFC 3339"},
		{"RESTORE_SNAPSHOT=2026-13-01T00:00:00Z", "RFC 3339"},
		{"RESTORE_STATE_DIR=rel", "absolute"},
		{"RESTORE_STATE_DIR=/data", "must not be RESTORE_DIR"},
		{"RESTORE_MODE=copy", "mirror"},
	} {
		env := config.Env{}
		for k, v := range base {
			env[k] = v
		}
		k, v, _ := strings.Cut(tc.kv, "=")
		env[k] = v
		var c Config
		err := config.Load(&c, env)
		if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), k) {
			t.Errorf("%s: got %v", tc.kv, err)
		}
	}
	for _, ok := range []string{"latest", "20260304T050607.123456789Z", "20260304T050607.123456789Z-pod-1", "2026-03-04T05:06:07Z", "2026-03-04T05:06:07.5+02:00"} {
		if err := ValidSnapshotSpec(ok); err != nil {
			t.Errorf("%s: %v", ok, err)
		}
	}
}

// RESTORE_STATE_DIR outside RESTORE_DIR (same filesystem): temp files and
// restored.json go there, nothing extra appears in RESTORE_DIR.
func TestStateDirOutside(t *testing.T) {
	tg := fileTarget(t)
	files := sampleFiles("s")
	tg.putSnapshot(t, baseTime, files)
	base := t.TempDir()
	dir, state := filepath.Join(base, "data"), filepath.Join(base, "state")
	if _, _, err := tg.run(t, dir, "RESTORE_STATE_DIR", state); err != nil {
		t.Fatal(err)
	}
	assertTree(t, dir, files)
	if _, err := os.Stat(filepath.Join(dir, StateDirName)); !os.IsNotExist(err) {
		t.Errorf("state dir created inside RESTORE_DIR: %v", err)
	}
	if _, err := ReadResult(state); err != nil {
		t.Error(err)
	}
	assertNoTemp(t, state)
}
