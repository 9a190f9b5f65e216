package syncer

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/podkeeper/podkeeper/agents/codec"
	"github.com/podkeeper/podkeeper/agents/snapshot"
	"github.com/podkeeper/podkeeper/agents/store"
	"github.com/podkeeper/podkeeper/test/peers"
)

// TestCompressAndRaces runs, on each S3 peer: identical content stored once
// across writers that encode differently, and a multipart upload whose
// completion races another writer's object.
func TestCompressAndRaces(t *testing.T) {
	if testing.Short() {
		t.Skip("needs the S3 peers")
	}
	for _, kind := range peers.S3Kinds {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			srv := peers.StartS3(t, kind)
			t.Run("identical-across-encodings", func(t *testing.T) { testIdenticalAcrossEncodings(t, srv) })
			t.Run("multipart-completion-race", func(t *testing.T) { testMultipartCompletionRace(t, srv) })
		})
	}
}

// Writer A (SYNC_COMPRESS=zstd) stores a text file encoded; writer B
// (compression off) has the same content at the same path: its conditional
// PUT fails, the content's sha256 matches, nothing more is written, and B
// records the object that is there, zstd encoding included.
func testIdenticalAcrossEncodings(t *testing.T, srv *peers.S3Server) {
	const prefix = "identical-enc"
	kc := newKeyCounter(t, srv.Endpoint)
	dirA, dirB := t.TempDir(), t.TempDir()
	content := bytes.Repeat([]byte("2026-03-04 INFO the same log line in two Pods\n"), 2000)
	// Both run from the start (as in the conflicts scenario): B does not know
	// A's object when it writes, so its PUT is conditional on absence.
	a := startSyncer(t, testConfig(t, srv, kc.URL, prefix, dirA, "SYNC_SETTLE=100ms", "POD_NAME=writer-a", "POD_UID=a", "SYNC_COMPRESS=zstd"))
	b := startSyncer(t, testConfig(t, srv, kc.URL, prefix, dirB, "SYNC_SETTLE=100ms", "POD_NAME=writer-b", "POD_UID=b"))
	writeRenamed(t, filepath.Join(dirA, "same.log"), content)
	waitAcked(t, s3Store(t, srv, prefix), "same.log", string(content))
	if err := a.shutdown(t); err != nil {
		t.Fatal(err)
	}
	h, err := s3Store(t, srv, prefix).Head(context.Background(), snapshot.DataKey("same.log"), store.HeadOptions{})
	if err != nil || h.Metadata[snapshot.MetaEncoding] != codec.Zstd || h.Size*10 > int64(len(content)) {
		t.Fatalf("A's object: %+v %v", h, err)
	}
	writeRenamed(t, filepath.Join(dirB, "same.log"), content)
	if err := peers.WaitFor(context.Background(), 30*time.Second, func() error {
		if gaugeValue(b.s.health, "podkeeper_syncer_log_batches_total") < 1 {
			return fmt.Errorf("B has not acknowledged same.log")
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if err := b.shutdown(t); err != nil {
		t.Fatal(err)
	}
	if n := kc.okWrites("PUT", prefix+"/data/same.log"); n != 1 {
		t.Errorf("%d successful PUTs of data/same.log, want 1 (identical content stored once)", n)
	}
	if f, _ := b.s.led.files.get("same.log"); f.Encoding != codec.Zstd || f.ETag != h.ETag || f.Size != int64(len(content)) {
		t.Errorf("B records %+v, want the zstd object %s of the content's size", f, h.ETag)
	}
}

// hideOnce answers the first HEAD of key with "not found": as if another
// writer's object landed right after this writer looked.
type hideOnce struct {
	store.Store
	key  string
	done atomic.Bool
}

func (h *hideOnce) Head(ctx context.Context, key string, o store.HeadOptions) (store.ObjectInfo, error) {
	if key == h.key && h.done.CompareAndSwap(false, true) {
		return store.ObjectInfo{}, &store.Error{Op: "head", Key: key, Err: store.ErrNotExist}
	}
	return h.Store.Head(ctx, key, o)
}

// Another writer's 17 MiB object lands between this writer's HEAD and its
// multipart completion: the completion (If-None-Match) is refused, the
// conflict is resolved by the rule (ours is newer), their bytes are kept
// under conflicts/, ours completes from the parts already sent, and no
// upload is left behind. With the unconditional completion of before,
// their object was overwritten without a trace.
func testMultipartCompletionRace(t *testing.T, srv *peers.S3Server) {
	const prefix = "mp-race"
	ctx := context.Background()
	st := s3Store(t, srv, prefix)
	theirs, ours := randBytes(1, 17<<20), randBytes(2, 17<<20+5)
	old := time.Now().Add(-time.Hour).Truncate(time.Second)
	sum := func(b []byte) string { h := sha256.Sum256(b); return hex.EncodeToString(h[:]) }
	tf := snapshot.File{Path: "big.bin", Size: int64(len(theirs)), SHA256: sum(theirs), MTime: old, Mode: 0o644}
	meta := tf.Metadata()
	meta[MetaWriter] = "other/pod/uid"
	if _, err := st.Put(ctx, snapshot.DataKey("big.bin"), bytes.NewReader(theirs), tf.Size, store.PutOptions{Metadata: meta}); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	r := startSyncer(t, testConfig(t, srv, srv.Endpoint, prefix, dir, "SYNC_SETTLE=100ms"), func(s *Syncer) {
		s.up.st = &hideOnce{Store: s.up.st, key: snapshot.DataKey("big.bin")}
	})
	// Complete when it appears: the one upload is the multipart one whose
	// completion meets their object.
	writeRenamed(t, filepath.Join(dir, "big.bin"), ours)
	waitObject(t, srv, prefix, "big.bin", ours, 60*time.Second)
	waitAcked(t, st, "big.bin", string(ours))
	kept := prefix + "/" + ConflictKey("big.bin", tf.SHA256)
	got, gotMeta, err := getObject(ctx, srv, kept)
	if err != nil || !bytes.Equal(got, theirs) || gotMeta[MetaWriter] != "other/pod/uid" {
		t.Fatalf("their version at %s: %d bytes, %v, %v", kept, len(got), gotMeta, err)
	}
	if n := gaugeValue(r.s.health, "podkeeper_syncer_conflicts_total"); n != 1 {
		t.Errorf("conflicts_total %v, want 1", n)
	}
	if err := r.shutdown(t); err != nil {
		t.Fatal(err)
	}
	if ups, err := r.s.up.mp.ListMultipartUploads(ctx, snapshot.DataKey("big.bin")); err != nil || len(ups) != 0 {
		t.Errorf("multipart uploads left: %v %v", ups, err)
	}
	if ents, _ := os.ReadDir(filepath.Join(dir, StateDirName, "multipart")); len(ents) != 0 {
		t.Errorf("journals left: %v", ents)
	}
}

// writeRenamed writes p aside and renames it in, so the syncer never sees it
// half-written (a loaded machine can stretch a plain write past the settle
// time, and a half-written version would be a second upload).
func writeRenamed(t *testing.T, p string, b []byte) {
	t.Helper()
	writeFile(t, p+".part", b)
	if err := os.Rename(p+".part", p); err != nil {
		t.Fatal(err)
	}
}
