package syncer

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/podkeeper/podkeeper/agents/changelog"
	"github.com/podkeeper/podkeeper/agents/snapshot"
	"github.com/podkeeper/podkeeper/agents/store"
	"github.com/podkeeper/podkeeper/agents/store/file"
)

// Retention picks the same data objects to delete with the fold streamed
// (merge-joined with the listing of data/) as with the fold in memory: those
// not live in the fold, older than the margin.
func TestDataCandidatesStreamed(t *testing.T) {
	st, err := file.New(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	at := time.Date(2026, 11, 30, 10, 0, 0, 0, time.UTC)
	f := func(p string, mt time.Time) snapshot.File {
		return snapshot.File{Path: p, Size: 1, SHA256: strings.Repeat("ab", 32), MTime: mt, Mode: 0o644}
	}
	cp := &snapshot.Manifest{Format: snapshot.Format, ID: snapshot.NewID(at, ""), Created: at, Writer: snapshot.Writer{Pod: "cp"},
		Files: []snapshot.File{f("a", at), f("b/c", at), f("d", at), f("e-1", at)}}
	if _, err := snapshot.Write(ctx, st, cp); err != nil {
		t.Fatal(err)
	}
	w := changelog.Writer{Namespace: "ns", Pod: "p", UID: "u"}
	b := &changelog.Batch{Writer: w, Time: at.Add(time.Second), Changes: []changelog.Change{
		{File: snapshot.File{Path: "a", MTime: at.Add(time.Hour)}, Deleted: true},
		{File: snapshot.File{Path: "d", MTime: at.Add(-time.Hour)}, Deleted: true}, // loses: d stays
		{File: f("new", at)},
	}}
	if _, err := changelog.Append(ctx, st, b); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"a", "b/c", "b/gone", "d", "e", "e-1", "new", "zz"} {
		if _, err := st.Put(ctx, snapshot.DataKey(p), strings.NewReader("x"), 1, store.PutOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	c := &compactor{st: st, margin: time.Minute}
	now := time.Now().Add(time.Hour)
	got, err := c.dataCandidates(ctx, now)
	if err != nil {
		t.Fatal(err)
	}
	want, err := c.dataCandidatesInMemory(ctx, now)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(got, want) || strings.Join(got, " ") != "a b/gone e zz" {
		t.Fatalf("streamed %q, in memory %q", got, want)
	}
	// Nothing older than the margin: no candidate.
	if got, err := c.dataCandidates(ctx, time.Now().Add(-time.Hour)); err != nil || len(got) != 0 {
		t.Fatalf("young objects: %q %v", got, err)
	}
}
