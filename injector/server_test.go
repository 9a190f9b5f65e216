package injector

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestLoadDefaults(t *testing.T) {
	d := t.TempDir()
	// A ConfigMap volume: keys as files, plus the kubelet's ..data links.
	os.WriteFile(filepath.Join(d, "store-url"), []byte("s3://b/{namespace}/{workload}\n"), 0o644)
	os.Mkdir(filepath.Join(d, "..data"), 0o755)
	got, err := LoadDefaults(d)
	if err != nil || got["store-url"] != "s3://b/{namespace}/{workload}" || got["uploads-volume"] != "uploads" {
		t.Fatalf("%v %v", got, err)
	}
	if _, err := LoadDefaults(filepath.Join(d, "missing")); err != nil {
		t.Fatalf("a missing directory is the built-in defaults: %v", err)
	}
	os.WriteFile(filepath.Join(d, "store-prefix"), []byte("x"), 0o644)
	if _, err := LoadDefaults(d); err == nil || !strings.Contains(err.Error(), "store-prefix") {
		t.Fatalf("unknown key: %v", err)
	}
}
