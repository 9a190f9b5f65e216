package pack

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/podkeeper/podkeeper/agents/snapshot"
	"github.com/podkeeper/podkeeper/agents/store"
	"github.com/podkeeper/podkeeper/agents/store/file"
)

func newStore(t *testing.T) store.Store {
	t.Helper()
	st, err := file.New(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func shaHex(b []byte) string { s := sha256.Sum256(b); return hex.EncodeToString(s[:]) }

func gz(lines ...string) []byte {
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	zw.Write([]byte(strings.Join(lines, "\n") + "\n"))
	zw.Close()
	return buf.Bytes()
}

// TestIndexRules: an index breaking any rule is refused as a whole with an
// InvalidError, whatever part of it was already handed out.
func TestIndexRules(t *testing.T) {
	const id = "20260101T000000.000000000Z-abcd"
	sha := strings.Repeat("a", 64)
	head := func(size, files int) string {
		return fmt.Sprintf(`{"format":"podkeeper.pack.v1","id":%q,"created":"2026-01-01T00:00:00Z","size":%d,"files":%d}`, id, size, files)
	}
	ent := func(path string, off, size int) string {
		return fmt.Sprintf(`{"path":%q,"sha256":%q,"offset":%d,"size":%d}`, path, sha, off, size)
	}
	good := [][]byte{gz(head(30, 2), ent("a/b", 0, 10), ent("c", 10, 20))}
	bad := map[string][]byte{
		"not gzip":           []byte("{}"),
		"empty":              gz(),
		"format":             gz(strings.Replace(head(30, 0), "v1", "v9", 1)),
		"other id":           gz(strings.Replace(head(30, 0), id, "20260101T000000.000000000Z-other", 1)),
		"past the pack":      gz(head(30, 1), ent("a", 25, 10)),
		"negative offset":    gz(head(30, 1), ent("a", -5, 10)),
		"overlap":            gz(head(30, 2), ent("a", 0, 10), ent("b", 5, 10)),
		"dot dot":            gz(head(30, 1), ent("../a", 0, 10)),
		"absolute":           gz(head(30, 1), ent("/a", 0, 10)),
		"zero size":          gz(head(30, 1), ent("a", 0, 0)),
		"too large":          gz(head(MaxFileSize+10, 1), ent("a", 0, MaxFileSize+1)),
		"bad sha":            gz(head(30, 1), strings.Replace(ent("a", 0, 10), sha, "xyz", 1)),
		"upper-case sha":     gz(head(30, 1), strings.Replace(ent("a", 0, 10), sha, strings.ToUpper(sha), 1)),
		"unknown field":      gz(head(30, 1), strings.Replace(ent("a", 0, 10), `"path"`, `"evil":1,"path"`, 1)),
		"more than listed":   gz(head(30, 1), ent("a", 0, 10), ent("b", 10, 10)),
		"fewer than listed":  gz(head(30, 3), ent("a", 0, 10)),
		"line too long":      gz(head(30, 1), `{"path":"`+strings.Repeat("x", maxLine)+`"}`),
		"trailing data":      gz(head(30, 1), ent("a", 0, 10)+"{}"),
		"files over the cap": gz(head(30, MaxEntries+1)),
	}
	for i, b := range good {
		n := 0
		if _, err := decodeIndex(bytes.NewReader(b), id, func(Entry) error { n++; return nil }); err != nil || n != 2 {
			t.Errorf("good %d: %d entries, %v", i, n, err)
		}
	}
	for name, b := range bad {
		_, err := decodeIndex(bytes.NewReader(b), id, func(Entry) error { return nil })
		var ie *InvalidError
		if !errors.As(err, &ie) {
			t.Errorf("%s: got %v, want an InvalidError", name, err)
		}
	}
}

func FuzzIndex(f *testing.F) {
	const id = "20260101T000000.000000000Z-abcd"
	f.Add(gz(`{"format":"podkeeper.pack.v1","id":"`+id+`","size":30,"files":1}`, `{"path":"a","sha256":"`+strings.Repeat("a", 64)+`","offset":0,"size":10}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		var prevEnd int64
		h, err := decodeIndex(bytes.NewReader(b), id, func(e Entry) error {
			if e.Offset < prevEnd || e.Offset+e.Size > 1<<62 || e.Size <= 0 || snapshot.ValidPath(e.Path) != nil {
				t.Fatalf("entry passed the rules: %+v", e)
			}
			prevEnd = e.Offset + e.Size
			return nil
		})
		if err == nil && prevEnd > h.Size {
			t.Fatalf("entries end at %d past the pack's %d", prevEnd, h.Size)
		}
	})
}

// files builds a snapshot of n files of distinct content and stores their
// data objects.
func files(t *testing.T, st store.Store, n int, tag string) []snapshot.File {
	t.Helper()
	var out []snapshot.File
	for i := range n {
		b := []byte(fmt.Sprintf("%s file %d %s", tag, i, strings.Repeat("x", i)))
		f := snapshot.File{Path: fmt.Sprintf("d/f%03d", i), Size: int64(len(b)), SHA256: shaHex(b), Mode: 0o644, MTime: time.Unix(1, 0).UTC()}
		if _, err := st.Put(context.Background(), snapshot.DataKey(f.Path), bytes.NewReader(b), f.Size, store.PutOptions{Metadata: f.Metadata()}); err != nil {
			t.Fatal(err)
		}
		out = append(out, f)
	}
	return out
}

func seq(fs []snapshot.File) Files {
	return func(fn func(snapshot.File) error) error {
		for _, f := range fs {
			if err := fn(f); err != nil {
				return err
			}
		}
		return nil
	}
}

func TestUpdate(t *testing.T) {
	ctx := context.Background()
	st := newStore(t)
	fs := files(t, st, 100, "v1")

	// Fewer files than MinFiles: no pack.
	rep, err := Update(ctx, st, seq(fs[:10]), Options{MinFiles: 20})
	if err != nil || rep.Packs != 0 || rep.Unpacked != 10 {
		t.Fatalf("below MinFiles: %+v %v", rep, err)
	}
	// MaxRunBytes splits the work over runs; PackSize over packs.
	var total int64
	for _, f := range fs {
		total += f.Size
	}
	rep, err = Update(ctx, st, seq(fs), Options{MinFiles: 1, MaxRunBytes: total / 2, PackSize: total / 5})
	if err != nil || rep.Files == 0 || rep.Files >= 100 || rep.Packs < 2 || rep.Unpacked != 100-rep.Files {
		t.Fatalf("first half: %+v %v", rep, err)
	}
	first := rep.Files
	rep, err = Update(ctx, st, seq(fs), Options{MinFiles: 1, PackSize: total / 5})
	if err != nil || rep.Files != 100-first || rep.Covered != first || rep.Unpacked != 0 {
		t.Fatalf("second half: %+v %v", rep, err)
	}
	// A file whose data object no longer holds the snapshot's version is
	// left out, not packed with the wrong bytes.
	more := files(t, st, 120, "v1")[100:]
	st.Put(ctx, snapshot.DataKey(more[0].Path), strings.NewReader("replaced"), 8, store.PutOptions{})
	rep, err = Update(ctx, st, seq(append(fs, more...)), Options{MinFiles: 1})
	if err != nil || rep.Files != 19 || rep.Unpacked != 1 {
		t.Fatalf("changed object: %+v %v", rep, err)
	}

	// The snapshot drops every file: all packs have no live entry and go.
	rep, err = Update(ctx, st, seq(nil), Options{})
	infos, _ := List(ctx, st)
	if err != nil || rep.Deleted == 0 || len(infos) != 0 {
		t.Fatalf("nothing live: %+v %v, left %+v", rep, err, infos)
	}

	// A pack object without an index is deleted once older than an hour.
	st.Put(ctx, Key(NewID(time.Now())), strings.NewReader("half"), 4, store.PutOptions{})
	rep, _ = Update(ctx, st, seq(nil), Options{})
	if rep.Deleted != 0 {
		t.Fatalf("a fresh orphan was deleted: %+v", rep)
	}
	rep, _ = Update(ctx, st, seq(nil), Options{Now: func() time.Time { return time.Now().Add(2 * time.Hour) }})
	if rep.Deleted != 1 {
		t.Fatalf("old orphan: %+v", rep)
	}
}

// TestUpdateBudget: a catalog over the memory budget is refused, not grown.
func TestUpdateBudget(t *testing.T) {
	ctx := context.Background()
	st := newStore(t)
	fs := files(t, st, 50, "b")
	if _, err := Update(ctx, st, seq(fs), Options{MinFiles: 1}); err != nil {
		t.Fatal(err)
	}
	_, err := Update(ctx, st, seq(fs), Options{BudgetBytes: 1000})
	if !errors.Is(err, ErrBudget) {
		t.Fatalf("got %v, want ErrBudget", err)
	}
}
