package main

import (
	"bytes"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// An emptyDir owned by another user (the app's, without fsGroup): restore,
// running as the agents' 65532, stops before fetching anything with an error
// that names RESTORE_DIR, the user it runs as and the fix, and exits 2.
func TestRestoreDirNotWritable(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root to run the binary as another user")
	}
	base, err := os.MkdirTemp("", "restore-perm-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	// Everything the agent must reach is readable by it; only RESTORE_DIR is not writable.
	store, dir, bin := filepath.Join(base, "store"), filepath.Join(base, "uploads"), filepath.Join(base, "restore")
	for _, d := range []string{store, dir} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chmod(base, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(store, 65532, 65532); err != nil { // the file:// store keeps its lock there
		t.Fatal(err)
	}
	copyFile(t, binPath, bin)
	cmd := exec.Command(bin)
	cmd.Env = []string{"STORE_URL=file://" + store, "RESTORE_DIR=" + dir, "KUBE_EVENTS=false", "HOME=" + base}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65532, Gid: 65532}}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err = cmd.Run()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 2 {
		t.Fatalf("want exit 2, got %v\n%s", err, out.String())
	}
	for _, want := range []string{"RESTORE_DIR", "not writable", "uid 65532", "fsGroup"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	in, err := os.Open(from)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	o, err := os.OpenFile(to, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(o, in); err != nil {
		t.Fatal(err)
	}
	if err := o.Close(); err != nil {
		t.Fatal(err)
	}
}
