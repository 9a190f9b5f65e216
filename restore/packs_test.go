package restore

import (
	"bytes"
	"compress/gzip"
	"context"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"path/filepath"
	"strings"
	"testing"

	"github.com/podkeeper/podkeeper/agents/lifecycle"
	"github.com/podkeeper/podkeeper/agents/pack"
	"github.com/podkeeper/podkeeper/agents/store"
	"github.com/podkeeper/podkeeper/test/peers"
)

// TestPacks: small files restore from packs with a few ranged GETs, and
// whatever a pack cannot give (stale, damaged, gone, hostile index) comes
// from data/ one by one: the tree is the snapshot's every time.
func TestPacks(t *testing.T) {
	t.Run("file", func(t *testing.T) { testPacks(t, fileTarget(t), nil) })
	if testing.Short() {
		return
	}
	for _, kind := range peers.S3Kinds {
		t.Run(kind, func(t *testing.T) {
			srv := peers.StartS3(t, kind)
			proxy := peers.NewCountingProxy(t, srv.Endpoint)
			testPacks(t, s3Target(t, srv, "packs", proxy.URL), proxy)
		})
	}
}

// packFiles is n small files of 1..6000 bytes in a few directories, plus an
// empty one and one too large for a pack.
func packFiles(seed uint64, n int) map[string]entry {
	r := rand.New(rand.NewPCG(seed, 1))
	files := map[string]entry{}
	for i := range n {
		b := make([]byte, 1+r.IntN(6000))
		for j := range b {
			b[j] = byte(r.Uint32())
		}
		files[fmt.Sprintf("d%d/f%04d.bin", i%7, i)] = entry{data: b, mode: 0o640, mtime: baseTime.Add(-17 * 60 * 1e9)}
	}
	files["empty"] = entry{data: nil, mode: 0o600, mtime: baseTime}
	big := make([]byte, 300<<10)
	files["big.bin"] = entry{data: big, mode: 0o644, mtime: baseTime}
	return files
}

// packCLI runs `restore pack` on tg and returns its output.
func packCLI(t *testing.T, tg *target, args ...string) string {
	t.Helper()
	var env []string
	for k, v := range tg.env {
		env = append(env, k+"="+v)
	}
	var out, errb bytes.Buffer
	if code := Main(append([]string{"pack"}, args...), append(env, "LOG_LEVEL=warn"), &out, &errb); code != 0 {
		t.Fatalf("restore pack: exit %d\n%s%s", code, out.String(), errb.String())
	}
	return out.String()
}

func testPacks(t *testing.T, tg *target, proxy *peers.CountingProxy) {
	ctx := context.Background()
	files := packFiles(1, 400)
	tg.putSnapshot(t, baseTime, files)
	out := packCLI(t, tg)
	if !strings.Contains(out, "(400 files,") || !strings.Contains(out, "small files in no pack: 0") {
		t.Fatalf("restore pack: %s", out)
	}
	// A second run finds everything packed and writes nothing.
	if out := packCLI(t, tg); !strings.Contains(out, "packs written: 0") || !strings.Contains(out, "already packed: 400") {
		t.Fatalf("second restore pack: %s", out)
	}
	// restoreCheck restores into a new directory, checks the tree against
	// want and, behind the proxy, that exactly wantGETs whole-object GETs of
	// data/ were made (-1: any number); it returns the directory.
	restoreCheck := func(t *testing.T, want map[string]entry, wantGETs int, kv ...string) string {
		t.Helper()
		dir := t.TempDir()
		if proxy != nil {
			proxy.Reset()
		}
		if _, _, err := tg.run(t, dir, kv...); err != nil {
			t.Fatal(err)
		}
		assertTree(t, dir, want)
		if proxy != nil && wantGETs >= 0 {
			if got := proxy.CountUnder("GET", "packs/data/"); got != wantGETs {
				t.Errorf("%d whole-object GETs of data/, want %d: %v", got, wantGETs, proxy.Counts())
			}
		}
		return dir
	}

	t.Run("from-packs", func(t *testing.T) {
		// big.bin and the empty file alone come from data/; 400 files of
		// ~3 KiB are 1.2 MiB of pack: a handful of 1 MiB runs.
		dir := restoreCheck(t, files, 2)
		assertNoTemp(t, filepath.Join(dir, StateDirName))
		if proxy != nil {
			if got := proxy.CountUnder("GET-range", "packs/packs/"); got < 1 || got > 6 {
				t.Errorf("%d ranged GETs of packs, want 1..6", got)
			}
		}
	})
	t.Run("packs-off", func(t *testing.T) { restoreCheck(t, files, 402, "RESTORE_PACKS", "false") })

	// Ten files change: their pack entries are stale and they come from data/.
	changed := map[string]entry{}
	for k, e := range files {
		changed[k] = e
	}
	for i := range 10 {
		p := fmt.Sprintf("d%d/f%04d.bin", i%7, i)
		changed[p] = entry{data: []byte("changed " + p), mode: 0o600, mtime: baseTime}
	}
	tg.putSnapshot(t, baseTime.Add(1e9), changed)
	// 10 changed, big.bin and the empty file from data/.
	t.Run("stale-entries", func(t *testing.T) { restoreCheck(t, changed, 12) })

	infos, err := pack.List(ctx, tg.st)
	if err != nil || len(infos) != 1 || !infos[0].Indexed || !infos[0].Packed {
		t.Fatalf("packs: %+v %v", infos, err)
	}
	id := infos[0].ID
	rc, _, err := tg.st.Get(ctx, pack.Key(id), store.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	orig, _ := io.ReadAll(rc)
	rc.Close()

	t.Run("damaged-pack", func(t *testing.T) {
		// Flip a byte of every 4 KiB: the entries hit are refused by their
		// sha256 and fetched from data/.
		bad := bytes.Clone(orig)
		for i := 100; i < len(bad); i += 4096 {
			bad[i] ^= 0x55
		}
		putBytes(t, tg, pack.Key(id), bad)
		dir := t.TempDir()
		logs := &peers.LockedBuffer{}
		r := New(tg.cfg(t, dir), lifecycle.Deps{Store: tg.st, Log: slog.New(slog.NewTextHandler(logs, nil))})
		if _, err := r.Run(ctx); err != nil {
			t.Fatal(err)
		}
		assertTree(t, dir, changed)
		if !strings.Contains(logs.String(), "pack entry does not match the snapshot") {
			t.Errorf("no warning about the damaged entries:\n%s", logs.String())
		}
		putBytes(t, tg, pack.Key(id), orig)
	})

	t.Run("pack-object-gone", func(t *testing.T) {
		if err := tg.st.Delete(ctx, pack.Key(id)); err != nil {
			t.Fatal(err)
		}
		restoreCheck(t, changed, 402)
		putBytes(t, tg, pack.Key(id), orig)
	})

	t.Run("pack-object-truncated", func(t *testing.T) {
		// Shorter than its index says: the runs past the end give up after a
		// few tries and their files come from data/.
		putBytes(t, tg, pack.Key(id), orig[:len(orig)/2])
		restoreCheck(t, changed, -1)
		putBytes(t, tg, pack.Key(id), orig)
	})

	t.Run("hostile-index", func(t *testing.T) {
		// An index pointing outside the pack, at another path, or at "..":
		// refused as a whole, and the restore goes on from data/.
		for _, lines := range [][]string{
			{`{"path":"d0/f0010.bin","sha256":"` + strings.Repeat("0", 64) + `","offset":0,"size":99999999}`},
			{`{"path":"../etc/passwd","sha256":"` + strings.Repeat("0", 64) + `","offset":0,"size":10}`},
			{`{"path":"d0/f0010.bin","sha256":"` + strings.Repeat("0", 64) + `","offset":-5,"size":10}`},
		} {
			hid := pack.NewID(baseTime)
			putBytes(t, tg, pack.Key(hid), orig)
			putBytes(t, tg, pack.IndexKey(hid), gzipLines(t, append([]string{
				fmt.Sprintf(`{"format":"podkeeper.pack.v1","id":%q,"created":"2026-01-01T00:00:00Z","size":%d,"files":1}`, hid, len(orig))}, lines...)))
			restoreCheck(t, changed, 12) // the good pack still serves
			if err := pack.Delete(ctx, tg.st, hid); err != nil {
				t.Fatal(err)
			}
		}
	})

	t.Run("repack-sparse", func(t *testing.T) {
		// More than half the files change: the next run writes the changed
		// files and the old pack's live ones into a new pack and deletes it.
		many := map[string]entry{}
		i := 0
		for _, k := range sortedKeys(changed) {
			e := changed[k]
			if strings.HasPrefix(k, "d") && i%4 != 0 {
				e = entry{data: append([]byte("v3 "), e.data...), mode: e.mode, mtime: e.mtime}
			}
			i++
			many[k] = e
		}
		tg.putSnapshot(t, baseTime.Add(2e9), many)
		out := packCLI(t, tg)
		if !strings.Contains(out, "packs deleted: 1") || !strings.Contains(out, "(400 files,") {
			t.Fatalf("restore pack after most files changed: %s", out)
		}
		infos, err := pack.List(ctx, tg.st)
		if err != nil || len(infos) != 1 || infos[0].ID == id {
			t.Fatalf("packs after the rewrite: %+v %v", infos, err)
		}
		restoreCheck(t, many, 2)
	})
}

func putBytes(t *testing.T, tg *target, key string, b []byte) {
	t.Helper()
	if _, err := tg.st.Put(context.Background(), key, bytes.NewReader(b), int64(len(b)), store.PutOptions{}); err != nil {
		t.Fatal(err)
	}
}

func gzipLines(t *testing.T, lines []string) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	io.WriteString(zw, strings.Join(lines, "\n")+"\n")
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}
