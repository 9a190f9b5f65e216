package restore

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// runMain runs the restore command in process, as the binary would.
func runMain(t *testing.T, env []string, args ...string) (int, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	code := Main(args, append([]string{"KUBE_EVENTS=false"}, env...), &out, &errb)
	return code, out.String(), errb.String()
}

// Every bad value is reported at once, naming the variable, with exit code 2.
func TestMainConfigErrors(t *testing.T) {
	code, _, stderr := runMain(t, []string{"RESTORE_DIR=relative/dir", "STORE_URL=file:///tmp/x", "RESTORE_CONCURRENCY=0",
		"RESTORE_SNAPSHOT=yesterday", "RESTORE_MODE=overwrite", "RESTORE_IF_MISSING=maybe", "RESTORE_VERIFY=perhaps", "RESTORE_STATE_DIR=state"})
	if code != 2 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	for _, v := range []string{"RESTORE_DIR", "RESTORE_CONCURRENCY", "RESTORE_SNAPSHOT", "RESTORE_MODE", "RESTORE_IF_MISSING", "RESTORE_VERIFY", "RESTORE_STATE_DIR", `"yesterday"`} {
		if !strings.Contains(stderr, v) {
			t.Errorf("stderr lacks %s:\n%s", v, stderr)
		}
	}
	code, _, stderr = runMain(t, []string{"STORE_URL=file:///tmp/x"})
	if code != 2 || !strings.Contains(stderr, "RESTORE_DIR") {
		t.Errorf("missing RESTORE_DIR: exit %d %s", code, stderr)
	}
	code, _, stderr = runMain(t, []string{"RESTORE_CONCURRENCY=-1"}, "list")
	if code != 2 || !strings.Contains(stderr, "STORE_URL") || !strings.Contains(stderr, "RESTORE_CONCURRENCY") {
		t.Errorf("list without STORE_URL: exit %d %s", code, stderr)
	}
	code, _, stderr = runMain(t, []string{"STORE_URL=file://" + t.TempDir()}, "verify", "not-an-id")
	if code != 1 || !strings.Contains(stderr, "not-an-id") {
		t.Errorf("verify bad id: exit %d %s", code, stderr)
	}
	code, out, _ := runMain(t, nil, "verify", "--help")
	if code != 0 || !strings.Contains(out, "--deep") {
		t.Errorf("verify --help: exit %d %s", code, out)
	}
}

// Exit codes on a file:// store: 0 with no snapshot under empty, 1 under fail,
// 0 after a restore; list and verify print what they found.
func TestMainExitCodesAndSubcommands(t *testing.T) {
	tg := fileTarget(t)
	storeDir := strings.TrimPrefix(tg.env["STORE_URL"], "file://")
	dir := filepath.Join(t.TempDir(), "data")
	env := []string{"STORE_URL=" + tg.env["STORE_URL"], "RESTORE_DIR=" + dir}
	if code, _, stderr := runMain(t, env); code != 0 || !strings.Contains(stderr, "no snapshot") {
		t.Fatalf("empty store: exit %d %s", code, stderr)
	}
	if code, _, stderr := runMain(t, append(env, "RESTORE_IF_MISSING=fail")); code != 1 || !strings.Contains(stderr, "RESTORE_IF_MISSING=fail") {
		t.Fatalf("empty store, fail: exit %d %s", code, stderr)
	}
	mtime := time.Unix(1700000000, 42)
	id := tg.putSnapshot(t, time.Now().UTC(), map[string]entry{
		"a.txt":   {data: []byte("alpha"), mode: 0o644, mtime: mtime},
		"d/b.txt": {data: []byte("beta"), mode: 0o644, mtime: mtime},
	}).ID
	code, _, stderr := runMain(t, env)
	if code != 0 || !strings.Contains(stderr, `"msg":"restored"`) {
		t.Fatalf("restore: exit %d %s", code, stderr)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "d/b.txt")); string(b) != "beta" {
		t.Errorf("d/b.txt = %q", b)
	}
	code, out, _ := runMain(t, env, "list")
	if code != 0 || !strings.Contains(out, id) || !strings.Contains(out, "FILES") {
		t.Errorf("list: exit %d\n%s", code, out)
	}
	code, out, _ = runMain(t, env, "verify", "--deep", id)
	if code != 0 || !strings.Contains(out, "all 2 files") {
		t.Errorf("verify: exit %d\n%s", code, out)
	}
	os.WriteFile(filepath.Join(storeDir, "data", "d", "b.txt"), []byte("BETA"), 0o644)
	code, out, _ = runMain(t, env, "verify", "--deep")
	if code != 1 || !strings.Contains(out, "BAD  d/b.txt") {
		t.Errorf("verify after damage: exit %d\n%s", code, out)
	}
	// restore pack: its arguments are checked before the store is opened
	// (exit 1, as restore verify's).
	for _, args := range [][]string{{"pack", "--max-file-size", "0"}, {"pack", "--max-file-size=x"}, {"pack", "extra"}} {
		if code, _, stderr := runMain(t, env, args...); code != 1 || !strings.Contains(stderr, "max-file-size") {
			t.Errorf("%q: exit %d %s", args, code, stderr)
		}
	}
	// A restore of the damaged object fails with exit 1 and names the file.
	os.Remove(filepath.Join(dir, "d/b.txt"))
	code, _, stderr = runMain(t, env)
	if code != 1 || !strings.Contains(stderr, `\"d/b.txt\"`) || !strings.Contains(stderr, "changed after the snapshot") {
		t.Errorf("damaged restore: exit %d %s", code, stderr)
	}
}
