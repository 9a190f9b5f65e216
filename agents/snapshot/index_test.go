package snapshot

import (
	"bytes"
	"fmt"
	"strings"
	"testing"
	"time"
)

// The compact form hands out exactly the files it was given, in path order,
// whatever order they came in, and EncodeCompact writes the bytes Encode
// writes.
func TestIndexRoundTrip(t *testing.T) {
	at := time.Date(2026, 11, 26, 10, 0, 0, 123456789, time.UTC)
	files := []File{
		{Path: "z", Size: 1, SHA256: sha, MTime: at, Mode: 0o600},
		{Path: "a/b/c.jpg", Size: MaxFileSize, SHA256: strings.Repeat("0f", 32), MTime: at, Mode: 0o777, ETag: `"0123456789abcdef0123456789abcdef"`, VersionID: "v1"},
		{Path: "a/b-c", Size: 0, SHA256: sha, MTime: time.Date(1500, 1, 1, 0, 0, 0, 7, time.UTC), Mode: 0o644, ETag: `"0123456789ABCDEF0123456789abcdef"`},
		{Path: "a/b/d", Size: 3, SHA256: sha, MTime: time.Date(9999, 1, 1, 0, 0, 0, 0, time.UTC), Mode: 0o644, ETag: `"abc-2"`},
		{Path: "é/ü", Size: 3, SHA256: sha, MTime: at, Mode: 0o400},
	}
	x, err := IndexOf(files)
	if err != nil {
		t.Fatal(err)
	}
	want := sortedCopy(files)
	got := x.Files()
	if len(got) != len(want) {
		t.Fatalf("%d files", len(got))
	}
	for i := range want {
		if fmt.Sprint(got[i]) != fmt.Sprint(want[i]) || !got[i].MTime.Equal(want[i].MTime) {
			t.Errorf("file %d:\n got %+v\nwant %+v", i, got[i], want[i])
		}
		if j, ok := x.Find(want[i].Path); !ok || j != i {
			t.Errorf("Find(%q) = %d, %v", want[i].Path, j, ok)
		}
	}
	for _, p := range []string{"", "a", "a/b", "a/b/", "a/b/c", "zz", "a/b/c.jpgx", "0"} {
		if _, ok := x.Find(p); ok {
			t.Errorf("Find(%q) found", p)
		}
	}
	m := &Manifest{Format: Format, ID: NewID(at, "x"), Created: at, Writer: Writer{Pod: "p<&>"}, Files: want}
	var a, b bytes.Buffer
	if err := Encode(&a, m, false); err != nil {
		t.Fatal(err)
	}
	c, err := CompactOf(m)
	if err != nil {
		t.Fatal(err)
	}
	if err := EncodeCompact(&b, c, false); err != nil {
		t.Fatal(err)
	}
	if a.String() != b.String() {
		t.Fatalf("EncodeCompact differs from Encode:\n%s\n%s", a.String(), b.String())
	}
}

func sortedCopy(files []File) []File {
	out := append([]File(nil), files...)
	for i := range out {
		for j := i + 1; j < len(out); j++ {
			if out[j].Path < out[i].Path {
				out[i], out[j] = out[j], out[i]
			}
		}
	}
	return out
}

// The path rules that span entries hold in any input order.
func TestIndexRefusesClashes(t *testing.T) {
	f := func(p string) File { return File{Path: p, Size: 1, SHA256: sha, MTime: time.Unix(1, 0), Mode: 0o644} }
	for _, tc := range []struct {
		paths []string
		want  string
	}{
		{[]string{"a", "b", "a"}, "listed twice"},
		{[]string{"a/b", "a"}, "as its parent directory"},
		{[]string{"a", "a-1", "a.x", "a/b"}, "as its parent directory"},
		{[]string{"x/a/b/c", "x/a-1", "x/a"}, "as its parent directory"},
	} {
		var fs []File
		for _, p := range tc.paths {
			fs = append(fs, f(p))
		}
		if _, err := IndexOf(fs); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: %v, want %q", tc.paths, err, tc.want)
		}
	}
	if _, err := IndexOf([]File{f("a-1"), f("a/b"), f("a.x"), f("ab/a")}); err != nil {
		t.Fatal(err)
	}
}
