package syncer

import (
	"context"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"testing"
	"time"

	"github.com/podkeeper/podkeeper/agents/pack"
	"github.com/podkeeper/podkeeper/agents/store"
	"github.com/podkeeper/podkeeper/test/peers"
)

// TestPacks: after each checkpoint the compactor copies the small files it
// folds into packs (zstd-encoded objects decoded on the way), leaves out the
// files above SYNC_PACK_MAX_FILE_SIZE, and rewrites a pack once most of its
// files have changed; every pack entry holds the file's current bytes.
func TestPacks(t *testing.T) {
	if testing.Short() {
		t.Skip("needs the S3 peers")
	}
	for _, kind := range peers.S3Kinds {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			testPacks(t, peers.StartS3(t, kind))
		})
	}
}

func testPacks(t *testing.T, srv *peers.S3Server) {
	const prefix = "packs"
	dir := t.TempDir()
	want := map[string][]byte{}
	write := func(rel string, b []byte) {
		writeFile(t, filepath.Join(dir, rel), b)
		want[rel] = b
	}
	for i := range 60 {
		b := randBytes(uint64(i), 100+i*97)
		if i%2 == 0 {
			b = []byte(fmt.Sprintf("%0*d", 100+i*97, i)) // text: stored zstd-encoded
		}
		write(fmt.Sprintf("d%d/f%02d.txt", i%3, i), b)
	}
	writeFile(t, filepath.Join(dir, "large.bin"), randBytes(99, 10000)) // above the limit below
	cfg := testConfig(t, srv, srv.Endpoint, prefix, dir, "SYNC_SETTLE=100ms", "SYNC_SNAPSHOT_INTERVAL=200ms",
		"SYNC_COMPRESS=zstd", "SYNC_PACK_MAX_FILE_SIZE=8192")
	r := startSyncer(t, cfg, func(s *Syncer) { s.comp.margin = time.Second })
	st := s3Store(t, srv, prefix)

	packed := waitPacks(t, st, want)
	if n := gaugeValue(r.s.health, "podkeeper_syncer_pack_files_total"); n != 60 {
		t.Errorf("pack_files_total %v, want 60", n)
	}
	if _, ok := packed["large.bin"]; ok {
		t.Error("a file above SYNC_PACK_MAX_FILE_SIZE was packed")
	}

	// 40 of the 60 files change: the first pack is mostly stale, so the next
	// run writes the changed files and the 20 others into a new pack and
	// deletes the old one.
	for i := range 40 {
		write(fmt.Sprintf("d%d/f%02d.txt", i%3, i), randBytes(uint64(1000+i), 200+i))
	}
	waitPacks(t, st, want)
	if err := peers.WaitFor(context.Background(), 30*time.Second, func() error {
		if n := gaugeValue(r.s.health, "podkeeper_syncer_packs_deleted_total"); n < 1 {
			return fmt.Errorf("packs_deleted_total %v", n)
		}
		if n := gaugeValue(r.s.health, "podkeeper_syncer_unpacked_files"); n != 0 {
			return fmt.Errorf("unpacked_files %v", n)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if err := r.shutdown(t); err != nil {
		t.Fatal(err)
	}
}

// waitPacks waits until the live packs of st hold exactly want (path to
// content), each entry's bytes read back from its pack, and no pack holds a
// stale entry; it returns the packed paths.
func waitPacks(t *testing.T, st store.Store, want map[string][]byte) map[string]bool {
	t.Helper()
	var got map[string]bool
	err := peers.WaitFor(context.Background(), 60*time.Second, func() error {
		ctx := context.Background()
		infos, err := pack.List(ctx, st)
		if err != nil {
			return err
		}
		got = map[string]bool{}
		for _, in := range infos {
			if !in.Indexed {
				continue
			}
			body, err := readAll(ctx, st, pack.Key(in.ID))
			if err != nil {
				return err
			}
			_, err = pack.ReadIndex(ctx, st, in.ID, func(e pack.Entry) error {
				w, ok := want[e.Path]
				if !ok || string(body[e.Offset:e.Offset+e.Size]) != string(w) {
					return fmt.Errorf("pack %s: %s is not the file's current content", in.ID, e.Path)
				}
				if got[e.Path] {
					return fmt.Errorf("%s in two packs", e.Path)
				}
				got[e.Path] = true
				return nil
			})
			if err != nil {
				return err
			}
		}
		if len(got) != len(want) {
			return fmt.Errorf("%d files packed, want %d", len(got), len(want))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return got
}

func readAll(ctx context.Context, st store.Store, key string) ([]byte, error) {
	rc, _, err := st.Get(ctx, key, store.GetOptions{})
	if errors.Is(err, store.ErrNotExist) {
		return nil, fmt.Errorf("%s gone meanwhile", key)
	}
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	return io.ReadAll(rc)
}
