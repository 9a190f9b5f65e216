package restore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/klauspost/compress/zstd"

	"github.com/podkeeper/podkeeper/agents/codec"
	"github.com/podkeeper/podkeeper/agents/snapshot"
	"github.com/podkeeper/podkeeper/agents/store"
	"github.com/podkeeper/podkeeper/test/peers"
)

// TestEncodedObjects: a snapshot of encoded objects restores and verifies,
// and hostile encoded objects are refused with a clear error, on every
// backend.
func TestEncodedObjects(t *testing.T) {
	t.Run("file", func(t *testing.T) { testEncodedObjects(t, fileTarget(t)) })
	if testing.Short() {
		return
	}
	for _, kind := range peers.S3Kinds {
		t.Run(kind, func(t *testing.T) {
			srv := peers.StartS3(t, kind)
			testEncodedObjects(t, s3Target(t, srv, "encoded", ""))
		})
	}
}

// putEncoded stores files as the syncer does with SYNC_COMPRESS=enc and
// writes their snapshot.
func (tg *target) putEncoded(t *testing.T, enc string, files map[string]entry) *snapshot.Manifest {
	t.Helper()
	ctx := context.Background()
	m := &snapshot.Manifest{Format: snapshot.Format, ID: snapshot.NewID(baseTime, "enc"), Created: baseTime, Files: []snapshot.File{}}
	for _, p := range sortedKeys(files) {
		e := files[p]
		f := snapshot.File{Path: p, Size: int64(len(e.data)), SHA256: sum(e.data), MTime: e.mtime, Mode: e.mode}
		body, err := codec.Encode(enc, p, bytes.NewReader(e.data), f.Size)
		if err != nil {
			t.Fatal(err)
		}
		f.Encoding = body.Encoding
		info, err := tg.st.Put(ctx, snapshot.DataKey(p), body.Open(), body.Size, store.PutOptions{Metadata: f.Metadata(), ContentEncoding: codec.ContentEncoding(f.Encoding)})
		if err != nil {
			t.Fatalf("put %s: %v", p, err)
		}
		f.ETag = info.ETag
		m.Files = append(m.Files, f)
	}
	if _, err := snapshot.Write(ctx, tg.st, m); err != nil {
		t.Fatal(err)
	}
	return m
}

func testEncodedObjects(t *testing.T, tg *target) {
	ctx := context.Background()
	files := sampleFiles("e")
	// Large enough for the ranged path if it were not encoded (3 MiB in tests).
	files["logs/big.log"] = entry{data: bytes.Repeat([]byte("2026-03-04 INFO a line of a log that repeats a lot\n"), 90000), mode: 0o640, mtime: baseTime}
	files["logs/mid.json"] = entry{data: bytes.Repeat([]byte(`{"k":"value","n":12345}`+"\n"), 9000), mode: 0o644, mtime: baseTime.Add(7)}
	m := tg.putEncoded(t, codec.Zstd, files)
	n := 0
	for _, f := range m.Files {
		if f.Encoding == codec.Zstd {
			n++
		}
	}
	if n < 3 {
		t.Fatalf("only %d files encoded", n)
	}
	dir := filepath.Join(t.TempDir(), "data")
	if _, _, err := tg.run(t, dir); err != nil {
		t.Fatal(err)
	}
	assertTree(t, dir, files)
	for _, deep := range []bool{false, true} {
		if rep, err := Verify(ctx, tg.st, m.ID, deep, 4); err != nil || len(rep.Problems) != 0 {
			t.Fatalf("verify deep=%v: %v %+v", deep, err, rep)
		}
	}

	// Hostile objects under a snapshot that records an encoding.
	put := func(t *testing.T, i int, f snapshot.File, stored []byte, meta map[string]string) *snapshot.Manifest {
		t.Helper()
		if _, err := tg.st.Put(ctx, snapshot.DataKey(f.Path), bytes.NewReader(stored), int64(len(stored)), store.PutOptions{Metadata: meta}); err != nil {
			t.Fatal(err)
		}
		hm := &snapshot.Manifest{Format: snapshot.Format, ID: snapshot.NewID(baseTime.Add(1e9), fmt.Sprintf("hostile%d", i)), Created: baseTime.Add(1e9), Files: []snapshot.File{f}}
		if _, err := snapshot.Write(ctx, tg.st, hm); err != nil {
			t.Fatal(err)
		}
		return hm
	}
	content := []byte(strings.Repeat("the content the snapshot records\n", 100))
	f := snapshot.File{Path: "bomb.txt", Size: int64(len(content)), SHA256: sum(content), MTime: baseTime, Mode: 0o644, Encoding: codec.Zstd}
	// A decompression bomb: 64 KiB of zstd that decodes to 1 GiB.
	var bomb bytes.Buffer
	zw, _ := zstd.NewWriter(&bomb)
	zeros := make([]byte, 1<<20)
	for range 1024 {
		zw.Write(zeros)
	}
	zw.Close()
	other := []byte(strings.Repeat("other content of the very same size", 100))[:len(content)]
	var otherZ bytes.Buffer
	zw, _ = zstd.NewWriter(&otherZ)
	zw.Write(other)
	zw.Close()
	cases := []struct {
		name   string
		f      snapshot.File
		stored []byte
		meta   map[string]string
		want   string
	}{
		{"bomb", f, bomb.Bytes(), f.Metadata(), "decodes to more bytes than the recorded size"},
		{"other content", f, otherZ.Bytes(), f.Metadata(), "sha256 " + sum(other)},
		{"garbage", f, bytes.Repeat([]byte{0x28, 0xb5, 0x2f, 0xfd, 1, 2, 3}, 50), f.Metadata(), "not a valid zstd stream"},
		// The entry says raw, the object is encoded: never taken for the content.
		{"encoded but recorded raw", func() snapshot.File { g := f; g.Path, g.Encoding = "raw.txt", ""; return g }(), otherZ.Bytes(),
			func() map[string]string { g := f; g.Path = "raw.txt"; return g.Metadata() }(), "encoding none, downloaded an object stored with encoding zstd"},
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			hm := put(t, i, c.f, c.stored, c.meta)
			dir := t.TempDir()
			_, _, restoreErr := tg.run(t, dir, "RESTORE_SNAPSHOT", hm.ID)
			var ce *ChangedError
			if !errors.As(restoreErr, &ce) || !strings.Contains(restoreErr.Error(), c.want) || !strings.Contains(restoreErr.Error(), c.f.Path) {
				t.Fatalf("got %v, want a ChangedError saying %q", restoreErr, c.want)
			}
			if _, err := os.Lstat(filepath.Join(dir, c.f.Path)); !os.IsNotExist(err) {
				t.Errorf("refused file visible under its name: %v", err)
			}
			assertNoTemp(t, filepath.Join(dir, StateDirName))
			rep, err := Verify(ctx, tg.st, hm.ID, true, 2)
			if err != nil || len(rep.Problems) != 1 {
				t.Fatalf("verify --deep: %v %+v", err, rep)
			}
			t.Logf("restore: %v\nverify --deep: %s", restoreErr, rep.Problems[0].Reason)
		})
	}
}
