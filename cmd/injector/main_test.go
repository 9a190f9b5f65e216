package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestFlags(t *testing.T) {
	var errb bytes.Buffer
	if code := run([]string{"-failure-policy", "Sometimes"}, &errb); code != 2 || !strings.Contains(errb.String(), "-failure-policy") {
		t.Errorf("bad -failure-policy: exit %d, %q", code, errb.String())
	}
	errb.Reset()
	t.Setenv("POD_NAMESPACE", "")
	if code := run(nil, &errb); code != 2 || !strings.Contains(errb.String(), "-namespace") {
		t.Errorf("no namespace: exit %d, %q", code, errb.String())
	}
	errb.Reset()
	if code := run([]string{"-log-level", "loudest", "-namespace", "x"}, &errb); code != 2 || !strings.Contains(errb.String(), "loudest") {
		t.Errorf("bad -log-level: exit %d, %q", code, errb.String())
	}
}

func TestLoadDefaults(t *testing.T) {
	d := t.TempDir()
	// A ConfigMap volume: keys as files, plus the kubelet's ..data links.
	os.WriteFile(filepath.Join(d, "store-url"), []byte("s3://b/{namespace}/{workload}\n"), 0o644)
	os.Mkdir(filepath.Join(d, "..data"), 0o755)
	got, err := loadDefaults(d)
	if err != nil || got["store-url"] != "s3://b/{namespace}/{workload}" || got["uploads-volume"] != "uploads" {
		t.Fatalf("%v %v", got, err)
	}
	if _, err := loadDefaults(filepath.Join(d, "missing")); err != nil {
		t.Fatalf("a missing directory is the built-in defaults: %v", err)
	}
	os.WriteFile(filepath.Join(d, "store-prefix"), []byte("x"), 0o644)
	if _, err := loadDefaults(d); err == nil || !strings.Contains(err.Error(), "store-prefix") {
		t.Fatalf("unknown key: %v", err)
	}
}
