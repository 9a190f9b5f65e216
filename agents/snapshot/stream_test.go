package snapshot

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/podkeeper/podkeeper/agents/store"
	"github.com/podkeeper/podkeeper/agents/store/file"
)

// Scan hands out the files DecodeCompact indexes, checks the same rules on
// a sorted manifest, and a Meter charges what the Index was charged.
func TestScanAndMeter(t *testing.T) {
	in := manifestJSON(t, 5000, true)
	c, err := DecodeCompact(bytes.NewReader(in))
	if err != nil {
		t.Fatal(err)
	}
	meter := NewMeter()
	var got []File
	h, err := Scan(bytes.NewReader(in), func(h *Manifest, complete bool) error {
		if !complete || h.ID != c.ID {
			t.Errorf("head %+v complete=%v", h, complete)
		}
		return nil
	}, func(f File) error {
		got = append(got, f)
		return meter.Add(f)
	})
	if err != nil || h.ID != c.ID {
		t.Fatalf("Scan: %v %+v", err, h)
	}
	want := c.Files.Files()
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatal("Scan and DecodeCompact disagree")
	}
	if meter.Len() != c.Files.Len() || meter.Cost() != c.Files.Cost() {
		t.Fatalf("Meter: %d files %d bytes, Index %d files %d bytes", meter.Len(), meter.Cost(), c.Files.Len(), c.Files.Cost())
	}
	for _, tc := range []struct{ files, want string }{
		{`{"path":"a","size":1,"sha256":"` + sha + `","mtime":"2026-11-26T10:00:00Z","mode":"0644"},{"path":"a","size":1,"sha256":"` + sha + `","mtime":"2026-11-26T10:00:00Z","mode":"0644"}`, "listed twice"},
		{`{"path":"a","size":1,"sha256":"` + sha + `","mtime":"2026-11-26T10:00:00Z","mode":"0644"},{"path":"a/b","size":1,"sha256":"` + sha + `","mtime":"2026-11-26T10:00:00Z","mode":"0644"}`, "parent directory"},
		{`{"path":"../a","size":1,"sha256":"` + sha + `","mtime":"2026-11-26T10:00:00Z","mode":"0644"}`, "element"},
	} {
		doc := `{"format":"` + Format + `","id":"20261126T101500.123456789Z","created":"2026-11-26T10:15:00Z","writer":{},"files":[` + tc.files + `]}`
		_, err := Scan(strings.NewReader(doc), nil, func(File) error { return nil })
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Scan of %s: %v, want %q", tc.files, err, tc.want)
		}
	}
	stop := errors.New("stop")
	if _, err := Scan(bytes.NewReader(in), nil, func(File) error { return stop }); err != stop {
		t.Fatalf("an error of fn: %v", err)
	}
}

// PutEncoded stores the measured bytes, and nothing when the second run
// differs from the measure.
func TestPutEncoded(t *testing.T) {
	st, err := file.New(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	at := time.Date(2026, 11, 26, 10, 0, 0, 0, time.UTC)
	files := []File{{Path: "a", Size: 1, SHA256: sha, MTime: at, Mode: 0o644}, {Path: "b", Size: 2, SHA256: sha, MTime: at, Mode: 0o644}}
	h := &Manifest{Format: Format, ID: NewID(at, ""), Created: at}
	emit := func(files []File) func(e *Encoder) error {
		return func(e *Encoder) error {
			for _, f := range files {
				if err := e.Add(f); err != nil {
					return err
				}
			}
			return nil
		}
	}
	sum := NewSummer()
	e, _ := NewEncoder(sum, h, true)
	emit(files)(e)
	e.Close()
	for _, other := range [][]File{files[:1], {files[0], files[0]}, {files[1], files[0]}} {
		if _, err := PutEncoded(ctx, st, h, sum.Sum(), emit(other)); err == nil {
			t.Fatalf("a second run of %d files stored", len(other))
		}
		if _, err := st.Head(ctx, Key(h.ID, true), store.HeadOptions{}); !errors.Is(err, store.ErrNotExist) {
			t.Fatalf("something stored: %v", err)
		}
	}
	if _, err := PutEncoded(ctx, st, h, sum.Sum(), emit(files)); err != nil {
		t.Fatal(err)
	}
	m, err := Load(ctx, st, Info{ID: h.ID, Key: Key(h.ID, true)})
	if err != nil || len(m.Files) != 2 {
		t.Fatalf("stored: %v %v", m, err)
	}
}
