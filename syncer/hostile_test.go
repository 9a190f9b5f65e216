package syncer

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/podkeeper/podkeeper/agents/store"
	"github.com/podkeeper/podkeeper/test/peers"
)

// The attack of the hardening issue: the app writes dN/token and at once
// swaps the directory dN for a link to a directory outside SYNC_DIR holding
// a token of its own. Whatever the syncer's stat and open see in between,
// no object may ever carry the outside file's bytes.
func testSwapParentForLink(t *testing.T, srv *peers.S3Server) {
	const prefix, attempts = "swap", 200
	dir, outside := t.TempDir(), t.TempDir()
	if err := os.WriteFile(filepath.Join(outside, "token"), []byte("SECRET-OUTSIDE"), 0o600); err != nil {
		t.Fatal(err)
	}
	r := startSyncer(t, testConfig(t, srv, srv.Endpoint, prefix, dir, "SYNC_SETTLE=0s"))
	for i := range attempts {
		d := filepath.Join(dir, fmt.Sprintf("d%03d", i))
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
		writeFile(t, filepath.Join(d, "token"), []byte(fmt.Sprintf("inside %d", i)))
		if err := os.Rename(d, d+".real"); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(outside, d); err != nil {
			t.Fatal(err)
		}
	}
	if err := r.shutdown(t); err != nil {
		t.Logf("drain: %v", err) // links the syncer refused may stay pending; what was written matters
	}
	st := s3Store(t, srv, prefix)
	objects, escapes := 0, 0
	for o, err := range st.List(context.Background(), "data/") {
		if err != nil {
			t.Fatal(err)
		}
		objects++
		rc, _, err := st.Get(context.Background(), o.Key, store.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(rc)
		rc.Close()
		if strings.Contains(string(b), "SECRET") {
			escapes++
			t.Errorf("%s holds the outside file's bytes", o.Key)
		}
	}
	t.Logf("%d swaps of a directory for a link: %d objects written, %d with outside bytes", attempts, objects, escapes)
	if objects == 0 {
		t.Fatal("nothing was uploaded: the race never ran")
	}
}
