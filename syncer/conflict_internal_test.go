package syncer

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/podkeeper/podkeeper/agents/codec"
	"github.com/podkeeper/podkeeper/agents/snapshot"
	"github.com/podkeeper/podkeeper/agents/store"
	"github.com/podkeeper/podkeeper/agents/store/file"
)

func shaOf(b string) string { h := sha256.Sum256([]byte(b)); return hex.EncodeToString(h[:]) }

// A writer that finds its own earlier version at data/PATH (an upload whose
// outcome it did not keep: the file changed while it went up, seen under
// load as the empty first version of a file being written) updates it; it
// is no write conflict, and nothing goes to conflicts/.
func TestOwnEarlierVersionIsNoConflict(t *testing.T) {
	ctx := context.Background()
	st, err := file.New(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	const me = "fleet/files-0/uid-0"
	t0 := time.Date(2026, 11, 30, 10, 0, 0, 0, time.UTC)
	old := snapshot.File{Path: "w0/a.txt", SHA256: shaOf(""), MTime: t0, Mode: 0o644}
	meta := old.Metadata()
	meta[MetaWriter] = me
	if _, err := st.Put(ctx, snapshot.DataKey(old.Path), strings.NewReader(""), 0, store.PutOptions{Metadata: meta}); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "a.txt")
	if err := os.WriteFile(path, []byte("content"), 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	now := snapshot.File{Path: old.Path, Size: 7, SHA256: shaOf("content"), MTime: t0.Add(time.Second), Mode: 0o644}
	opts := store.PutOptions{Metadata: now.Metadata()}
	opts.Metadata[MetaWriter] = me
	u := &uploader{st: st, writer: me}
	put := func(ctx context.Context, cond store.PutOptions) (store.ObjectInfo, error) {
		cond.Metadata = opts.Metadata
		return st.Put(ctx, snapshot.DataKey(now.Path), io.NewSectionReader(f, 0, now.Size), now.Size, cond)
	}
	_, c, err := u.resolve(ctx, codec.Raw(f, now.Size), now, seen{}, opts, put)
	if err != nil {
		t.Fatal(err)
	}
	if c != nil {
		t.Fatalf("own earlier version reported as a conflict: %v", c)
	}
	for o, err := range st.List(ctx, ConflictsDir) {
		t.Fatalf("conflict object %s written (%v)", o.Key, err)
	}
	h, err := st.Head(ctx, snapshot.DataKey(now.Path), store.HeadOptions{})
	if err != nil || h.Metadata[snapshot.MetaSHA256] != now.SHA256 {
		t.Fatalf("data object not updated: %+v %v", h, err)
	}
}
