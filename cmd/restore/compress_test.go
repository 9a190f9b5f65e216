package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/podkeeper/podkeeper/agents/changelog"
	"github.com/podkeeper/podkeeper/agents/snapshot"
	"github.com/podkeeper/podkeeper/agents/store"
	"github.com/podkeeper/podkeeper/test/peers"
)

// logText is log-like text of n bytes (compresses several times).
func logText(seed uint64, n int) []byte {
	r := mrand.New(mrand.NewPCG(seed, 7))
	var b bytes.Buffer
	for b.Len() < n {
		fmt.Fprintf(&b, "2026-03-04T05:%02d:%02d.%06dZ INFO upload id=%d user=u%03d bytes=%d status=ok path=/srv/uploads/%d.dat\n",
			r.IntN(60), r.IntN(60), r.IntN(1e6), r.Uint32(), r.IntN(300), r.IntN(1<<22), r.IntN(1e5))
	}
	return b.Bytes()[:n]
}

// TestSyncerRoundTripCompressed: the syncer binary with SYNC_COMPRESS stores
// text encoded (smaller objects, metadata with the encoding and the content's
// size and sha256, Content-Encoding), a JPEG-named random file, a tiny file
// and a multipart-sized file as they are; the restore binary brings every file
// back byte-identical with mode and mtime, and `restore verify --deep`
// decodes and passes. On S3 a gzip object is readable by a plain HTTP GET.
func TestSyncerRoundTripCompressed(t *testing.T) {
	syncer := buildSyncer(t)
	t.Run("file-zstd", func(t *testing.T) {
		testCompressedRoundTrip(t, syncer, []string{"STORE_URL=file://" + t.TempDir()}, "zstd", nil)
	})
	if testing.Short() {
		return
	}
	for _, kind := range peers.S3Kinds {
		for _, enc := range []string{"zstd", "gzip"} {
			t.Run(kind+"-"+enc, func(t *testing.T) {
				srv := peers.StartS3(t, kind)
				testCompressedRoundTrip(t, syncer, srv.AgentEnv("compressed"), enc, srv)
			})
		}
	}
}

func testCompressedRoundTrip(t *testing.T, syncerBin string, storeEnv []string, enc string, srv *peers.S3Server) {
	dir := filepath.Join(t.TempDir(), "uploads")
	os.MkdirAll(dir, 0o755)
	photo := make([]byte, 300<<10)
	rand.Read(photo)
	files := map[string][]byte{
		"logs/app.log":       logText(1, 900<<10), // above the 64 KiB sample: encoded twice, streamed
		"logs/small.json":    logText(2, 12<<10),  // within the sample: the sample is the object
		"data/table.csv":     logText(3, 200<<10),
		"photos/IMG_001.jpg": photo,
		"tiny.txt":           []byte("hi\n"),
		"empty.dat":          {},
		"big/huge.log":       logText(4, 17<<20), // multipart-sized: stored as is
	}
	encoded := map[string]bool{"logs/app.log": true, "logs/small.json": true, "data/table.csv": true}
	for p, b := range files {
		fp := filepath.Join(dir, p)
		os.MkdirAll(filepath.Dir(fp), 0o755)
		if err := os.WriteFile(fp, b, 0o640); err != nil {
			t.Fatal(err)
		}
	}
	os.Chmod(filepath.Join(dir, "logs/small.json"), 0o600)
	env := append([]string{"PATH=" + os.Getenv("PATH"), "HOME=" + t.TempDir(), "SYNC_DIR=" + dir, "SYNC_HTTP_ADDR=off",
		"SYNC_SETTLE=200ms", "SYNC_SNAPSHOT_INTERVAL=0", "LOG_FORMAT=text", "SYNC_COMPRESS=" + enc}, storeEnv...)
	var logb bytes.Buffer
	cmd := exec.Command(syncerBin)
	cmd.Env = env
	cmd.Stdout, cmd.Stderr = &logb, &logb
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() { syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) })
	st := openStore(t, storeEnv)
	ctx := context.Background()
	err := peers.WaitFor(ctx, 90*time.Second, func() error {
		select {
		case err := <-exited:
			return fmt.Errorf("syncer exited early: %v\n%s", err, logb.String())
		default:
		}
		for p := range files {
			if _, err := st.Head(ctx, snapshot.DataKey(p), store.HeadOptions{}); err != nil {
				return fmt.Errorf("%s not uploaded yet: %v", p, err)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	want := snapshotTree(t, dir)
	syscall.Kill(cmd.Process.Pid, syscall.SIGTERM)
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("syncer after SIGTERM: %v\n%s", err, logb.String())
		}
	case <-time.After(60 * time.Second):
		t.Fatalf("syncer did not exit after SIGTERM\n%s", logb.String())
	}

	// The objects: encoded ones smaller, with the encoding, the content's size
	// and sha256 in their metadata and as Content-Encoding; the others as is.
	fold, err := changelog.Fold(ctx, st, time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	entries := map[string]snapshot.File{}
	for _, f := range fold.Files {
		entries[f.Path] = f
	}
	var stored, original int64
	for p, b := range files {
		h, err := st.Head(ctx, snapshot.DataKey(p), store.HeadOptions{})
		if err != nil {
			t.Fatal(err)
		}
		e := entries[p]
		sum := sha(b)
		if h.Metadata[snapshot.MetaSHA256] != sum || e.SHA256 != sum || e.Size != int64(len(b)) {
			t.Errorf("%s: sha256 metadata %s, entry %s / %d bytes; want the content's %s / %d", p, h.Metadata[snapshot.MetaSHA256], e.SHA256, e.Size, sum, len(b))
		}
		if !encoded[p] {
			if e.Encoding != "" || h.Metadata[snapshot.MetaEncoding] != "" || h.ContentEncoding != "" || h.Size != int64(len(b)) {
				t.Errorf("%s stored encoded: entry %q, metadata %q, Content-Encoding %q, %d of %d bytes", p, e.Encoding, h.Metadata[snapshot.MetaEncoding], h.ContentEncoding, h.Size, len(b))
			}
			continue
		}
		stored, original = stored+h.Size, original+int64(len(b))
		if e.Encoding != enc || h.Metadata[snapshot.MetaEncoding] != enc || h.ContentEncoding != enc ||
			h.Metadata[snapshot.MetaSize] != strconv.Itoa(len(b)) || h.Size*3 > int64(len(b)) {
			t.Errorf("%s: entry %q, metadata %v, Content-Encoding %q, %d of %d bytes (want %s, ≥ 3× smaller)", p, e.Encoding, h.Metadata, h.ContentEncoding, h.Size, len(b), enc)
		}
	}
	t.Logf("%s: text stored in %d of %d bytes (%.1f×)", enc, stored, original, float64(original)/float64(stored))
	if srv != nil && enc == "gzip" {
		checkPlainGET(t, srv, "compressed/data/data/table.csv", files["data/table.csv"])
	}

	// The Pod is gone: so is its emptyDir.
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	code, _, stderr := runBin(t, append(storeEnv, "RESTORE_DIR="+dir))
	if code != 0 {
		t.Fatalf("restore: exit %d\n%s\nsyncer log:\n%s", code, stderr, logb.String())
	}
	got := snapshotTree(t, dir)
	if len(got) != len(want) {
		t.Fatalf("restored %d files, the syncer had %d", len(got), len(want))
	}
	for p, w := range want {
		g, ok := got[p]
		switch {
		case !ok:
			t.Errorf("%s not restored", p)
		case !bytes.Equal(g.data, w.data):
			t.Errorf("%s: content differs", p)
		case g.mode != w.mode:
			t.Errorf("%s: mode %v, want %v", p, g.mode, w.mode)
		case !g.mtime.Equal(w.mtime):
			t.Errorf("%s: mtime %v, want %v (ns precision)", p, g.mtime, w.mtime)
		}
	}
	code, out, stderr := runBin(t, storeEnv, "verify", "--deep")
	if code != 0 {
		t.Fatalf("verify --deep: exit %d\n%s%s", code, out, stderr)
	}
}

// checkPlainGET fetches key with a presigned URL and Go's default HTTP client,
// which asks for gzip and decodes it on its own: the content comes back.
func checkPlainGET(t *testing.T, srv *peers.S3Server, key string, want []byte) {
	t.Helper()
	req, err := s3.NewPresignClient(srv.Client()).PresignGetObject(context.Background(),
		&s3.GetObjectInput{Bucket: aws.String(peers.Bucket), Key: aws.String(key)})
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.Get(req.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	got, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("plain GET: %d %v", resp.StatusCode, err)
	}
	if !resp.Uncompressed || !bytes.Equal(got, want) {
		t.Fatalf("plain GET: decoded by the client %v, %d bytes (want the %d of the content)", resp.Uncompressed, len(got), len(want))
	}
}

func sha(b []byte) string {
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:])
}
