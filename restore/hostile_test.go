package restore

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/podkeeper/podkeeper/agents/lifecycle"
	"github.com/podkeeper/podkeeper/agents/snapshot"
	"github.com/podkeeper/podkeeper/agents/store"
)

// hostileCase is a snapshot (or a disk) built to make restore write where it
// must not. Every case must be refused, and nothing may appear outside
// RESTORE_DIR.
type hostileCase struct {
	name  string
	files []map[string]any // manifest entries as raw JSON objects
	raw   []byte           // the whole manifest body, when set
	disk  func(t *testing.T, dir, outside string)
	want  string // part of the error
}

func goodEntry(path string, data []byte) map[string]any {
	return map[string]any{"path": path, "size": len(data), "sha256": sum(data), "mtime": baseTime.Format(time.RFC3339Nano), "mode": "0644"}
}

func hostileCases() []hostileCase {
	payload := []byte("pwned")
	e := func(p string) []map[string]any { return []map[string]any{goodEntry(p, payload)} }
	huge := goodEntry("huge", payload)
	huge["size"] = int64(snapshot.MaxFileSize) // valid for the format, not for this disk
	tooHuge := goodEntry("huge", payload)
	tooHuge["size"] = int64(snapshot.MaxFileSize) + 1
	return []hostileCase{
		{name: "dotdot", files: e("../outside/pwned"), want: `".." element`},
		{name: "dotdot inside", files: e("a/../../outside/pwned"), want: `".." element`},
		{name: "absolute", files: e("/tmp/pwned"), want: "absolute"},
		{name: "NUL", files: e("a\x00b"), want: "NUL"},
		{name: "backslash", files: e(`..\outside\pwned`), want: "backslash"},
		{name: "empty element", files: e("a//b"), want: "empty element"},
		{name: "dot element", files: e("./a"), want: `"." element`},
		{name: "duplicate", files: append(e("same"), goodEntry("same", payload)), want: "listed twice"},
		{name: "file and dir", files: append(e("x"), goodEntry("x/y", payload)), want: "listed as a file and as its parent"},
		{name: "state dir", files: e(".podkeeper/restored.json"), want: "state directory"},
		{name: "state dir temp", files: e(".podkeeper/restore-tmp/x.part"), want: "state directory"},
		{name: "enormous size", files: []map[string]any{huge}, want: "free under RESTORE_DIR"},
		{name: "size beyond format", files: []map[string]any{tooHuge}, want: "outside 0.."},
		{name: "negative size", files: []map[string]any{func() map[string]any { m := goodEntry("neg", payload); m["size"] = -1; return m }()}, want: "outside 0.."},
		{name: "setuid mode", files: []map[string]any{func() map[string]any { m := goodEntry("suid", payload); m["mode"] = "4755"; return m }()}, want: "setuid"},
		{name: "truncated", raw: []byte(`{"format":"podkeeper.snapshot.v1","id":"`), want: "not a valid manifest"},
		{name: "not JSON", raw: []byte("<html>nope</html>"), want: "not a valid manifest"},
		{name: "empty body", raw: []byte{}, want: "empty manifest"},
		{name: "unknown field", raw: []byte(`{"format":"podkeeper.snapshot.v1","id":"ID","created":"2026-03-04T05:06:07Z","writer":{"pod":"","namespace":"","host":""},"files":[],"exec":"rm -rf /"}`), want: "unknown field"},
		{name: "trailing data", raw: []byte(`{"format":"podkeeper.snapshot.v1","id":"ID","created":"2026-03-04T05:06:07Z","writer":{"pod":"","namespace":"","host":""},"files":[]} {}`), want: "trailing data"},
		{name: "gzip garbage", raw: []byte{0x1f, 0x8b, 0, 1, 2, 3}, want: "gzip"},
		{
			name: "planted dir link", files: e("link/pwned"), want: "symbolic link",
			disk: func(t *testing.T, dir, outside string) { symlink(t, outside, filepath.Join(dir, "link")) },
		},
		{
			name: "planted deep dir link", files: e("a/b/link/c/pwned"), want: "symbolic link",
			disk: func(t *testing.T, dir, outside string) {
				os.MkdirAll(filepath.Join(dir, "a/b"), 0o755)
				symlink(t, outside, filepath.Join(dir, "a/b/link"))
			},
		},
		{
			name: "planted relative link", files: e("up/outside/pwned"), want: "symbolic link",
			disk: func(t *testing.T, dir, outside string) { symlink(t, "..", filepath.Join(dir, "up")) },
		},
		{
			name: "planted file link", files: e("victim"), want: "symbolic link",
			disk: func(t *testing.T, dir, outside string) {
				symlink(t, filepath.Join(outside, "target"), filepath.Join(dir, "victim"))
			},
		},
		{
			name: "planted dangling link", files: e("dangling"), want: "symbolic link",
			disk: func(t *testing.T, dir, outside string) {
				symlink(t, filepath.Join(outside, "new-file"), filepath.Join(dir, "dangling"))
			},
		},
		{
			name: "planted state dir link", files: e("fine"), want: "symbolic link",
			disk: func(t *testing.T, dir, outside string) { symlink(t, outside, filepath.Join(dir, StateDirName)) },
		},
	}
}

func symlink(t *testing.T, target, link string) {
	t.Helper()
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
}

func testHostile(t *testing.T, mk func(t *testing.T, prefix string) *target) {
	base := t.TempDir()
	outside := filepath.Join(base, "outside")
	os.MkdirAll(outside, 0o755)
	os.WriteFile(filepath.Join(outside, "target"), []byte("precious"), 0o644)
	before := fingerprint(t, outside)
	ctx := context.Background()
	for i, hc := range hostileCases() {
		t.Run(hc.name, func(t *testing.T) {
			// Each case in its own prefix on the store and its own directory,
			// all of them next to the same "outside".
			prefix := fmt.Sprintf("h%02d", i)
			sub := mk(t, prefix)
			id := snapshot.NewID(baseTime.Add(time.Duration(i)*time.Second), "hostile")
			body := hc.raw
			if body == nil {
				m := map[string]any{"format": snapshot.Format, "id": id, "created": baseTime.Format(time.RFC3339Nano),
					"writer": map[string]string{"pod": "evil", "namespace": "", "host": ""}, "files": hc.files}
				body, _ = json.Marshal(m)
				// The data objects exist too, so only the checks stop the write.
				for _, f := range hc.files {
					if p, _ := f["path"].(string); store.ValidKey(snapshot.DataKey(p)) == nil {
						sub.st.Put(ctx, snapshot.DataKey(p), bytes.NewReader([]byte("pwned")), 5, store.PutOptions{})
					}
				}
			} else {
				body = bytes.ReplaceAll(body, []byte(`"ID"`), []byte(`"`+id+`"`))
			}
			if hc.name == "gzip garbage" {
				var zb bytes.Buffer
				zw := gzip.NewWriter(&zb)
				zw.Write([]byte("{\"format\":"))
				zw.Close()
				body = append(body, zb.Bytes()[:len(zb.Bytes())/2]...)
			}
			if _, err := sub.st.Put(ctx, snapshot.Key(id, false), bytes.NewReader(body), int64(len(body)), store.PutOptions{}); err != nil {
				t.Fatal(err)
			}
			dir := filepath.Join(base, fmt.Sprintf("dir%02d", i))
			os.MkdirAll(dir, 0o755)
			if hc.disk != nil {
				hc.disk(t, dir, outside)
			}
			dirBefore := listTree(t, dir)
			rec := &recorder{}
			r := New(sub.cfg(t, dir, "RESTORE_IF_MISSING", "fail"), lifecycle.Deps{Store: sub.st, Log: testLog(t), Events: rec})
			_, err := r.Run(ctx)
			if err == nil || !strings.Contains(err.Error(), hc.want) {
				t.Fatalf("want an error containing %q, got %v", hc.want, err)
			}
			if !strings.Contains(rec.all(), "RestoreFailed") {
				t.Errorf("no RestoreFailed event: %s", rec.all())
			}
			if got := listTree(t, dir); strings.Join(got, ",") != strings.Join(dirBefore, ",") {
				t.Errorf("refused snapshot still wrote files: %v (before %v)", got, dirBefore)
			}
			// Mirror must refuse links in the way as well.
			if hc.disk != nil {
				r := New(sub.cfg(t, dir, "RESTORE_MODE", "mirror"), lifecycle.Deps{Store: sub.st, Log: testLog(t), Events: rec})
				if _, err := r.Run(ctx); err == nil || !strings.Contains(err.Error(), hc.want) {
					t.Fatalf("mirror: want %q, got %v", hc.want, err)
				}
			}
		})
	}
	if after := fingerprint(t, outside); after != before {
		t.Errorf("something was written outside RESTORE_DIR:\nbefore:\n%s\nafter:\n%s", before, after)
	}
	// Nothing else appeared next to the restore dirs either.
	ents, _ := os.ReadDir(base)
	for _, e := range ents {
		if e.Name() != "outside" && !strings.HasPrefix(e.Name(), "dir") {
			t.Errorf("unexpected %s next to RESTORE_DIR", e.Name())
		}
	}
}

// A link planted while the restore runs (after the plan) is still not
// followed: the openat walk refuses it.
func TestTreeRefusesLinkAfterPlan(t *testing.T) {
	base := t.TempDir()
	dir, outside := filepath.Join(base, "dir"), filepath.Join(base, "outside")
	os.MkdirAll(dir, 0o755)
	os.MkdirAll(outside, 0o755)
	tr, err := openTree(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	tmp, err := os.MkdirTemp(dir, "tmp")
	if err != nil {
		t.Fatal(err)
	}
	tmpfd, err := openTree(tmp)
	if err != nil {
		t.Fatal(err)
	}
	defer tmpfd.Close()
	os.WriteFile(filepath.Join(tmp, "f"), []byte("x"), 0o644)
	symlink(t, outside, filepath.Join(dir, "a"))
	err = tr.place(tmpfd.root, "f", "a/b/f")
	var le *LinkError
	if !errors.As(err, &le) || le.Link != "a" {
		t.Fatalf("got %v", err)
	}
	if ents, _ := os.ReadDir(outside); len(ents) != 0 {
		t.Fatalf("written through the link: %v", ents)
	}
	// A link at the final name is not replaced either.
	symlink(t, filepath.Join(outside, "t"), filepath.Join(dir, "final"))
	if err := tr.place(tmpfd.root, "f", "final"); !errors.As(err, &le) {
		t.Fatalf("final link: %v", err)
	}
	if _, err := os.Lstat(filepath.Join(outside, "t")); !os.IsNotExist(err) {
		t.Fatal("written through the final link")
	}
}
