package snapshot

import (
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/podkeeper/podkeeper/agents/store"
	"github.com/podkeeper/podkeeper/agents/store/file"
)

const sha = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"

func valid() string {
	return `{"format":"podkeeper.snapshot.v1","id":"20261126T101500.123456789Z-ab12","created":"2026-11-26T10:15:00.123456789Z",
"writer":{"pod":"upload-0","namespace":"default","host":"node1"},
"files":[{"path":"a/b.jpg","size":123,"sha256":"` + sha + `","mtime":"2026-11-26T10:00:00.5Z","mode":"0644","etag":"\"x\"","version_id":"v1"},
{"path":"c.txt","size":0,"sha256":"` + sha + `","mtime":"2026-11-26T10:00:00Z","mode":"600"}]}`
}

func TestDecodeValid(t *testing.T) {
	m, err := Decode(strings.NewReader(valid()))
	if err != nil {
		t.Fatal(err)
	}
	if len(m.Files) != 2 || m.Files[0].Mode != 0o644 || m.Files[1].Mode != 0o600 || m.Files[0].VersionID != "v1" || m.Writer.Pod != "upload-0" {
		t.Fatalf("decoded %+v", m)
	}
	// gzip is accepted too, and Encode round-trips.
	var buf bytes.Buffer
	if err := Encode(&buf, m, true); err != nil {
		t.Fatal(err)
	}
	m2, err := Decode(&buf)
	if err != nil {
		t.Fatal(err)
	}
	if m2.Files[0].Path != "a/b.jpg" || !m2.Files[0].MTime.Equal(m.Files[0].MTime) || m2.Files[0].Mode.String() != "0644" {
		t.Fatalf("round trip %+v", m2)
	}
}

// TestDecodeRefusesHostile: each case must be refused, and with a message about
// its own problem (not a generic failure of an unrelated rule).
func TestDecodeRefusesHostile(t *testing.T) {
	file := func(path string) string {
		return `{"path":` + path + `,"size":1,"sha256":"` + sha + `","mtime":"2026-11-26T10:00:00Z","mode":"0644"}`
	}
	wrap := func(files ...string) string {
		return `{"format":"podkeeper.snapshot.v1","id":"20261126T101500.123456789Z","created":"2026-11-26T10:15:00Z","writer":{},"files":[` + strings.Join(files, ",") + `]}`
	}
	long := `"` + strings.Repeat("a/", 2048) + `x"`
	cases := []struct{ name, in, want string }{
		{"unknown format", strings.Replace(valid(), "snapshot.v1", "snapshot.v2", 1), "unknown snapshot format"},
		{"no format", strings.Replace(valid(), `"format":"podkeeper.snapshot.v1",`, "", 1), "unknown snapshot format"},
		{"dotdot", wrap(file(`"../../etc/passwd"`)), `".." element`},
		{"inner dotdot", wrap(file(`"a/../../b"`)), `".." element`},
		{"absolute", wrap(file(`"/etc/passwd"`)), "absolute"},
		{"dot element", wrap(file(`"a/./b"`)), `"." element`},
		{"empty element", wrap(file(`"a//b"`)), "empty element"},
		{"trailing slash", wrap(file(`"a/"`)), "empty element"},
		{"empty path", wrap(file(`""`)), "empty path"},
		{"NUL", wrap(file(`"a\u0000b"`)), "NUL"},
		{"backslash", wrap(file(`"..\\..\\x"`)), "backslash"},
		{"too long", wrap(file(long)), "longer than"},
		{"duplicate", wrap(file(`"a"`), file(`"a"`)), "listed twice"},
		{"file and dir", wrap(file(`"a"`), file(`"a/b"`)), "as a file and as its parent"},
		{"negative size", strings.Replace(valid(), `"size":123`, `"size":-1`, 1), "size -1"},
		{"enormous size", strings.Replace(valid(), `"size":123`, `"size":9000000000000000`, 1), "size 9000000000000000"},
		{"size overflow", strings.Replace(valid(), `"size":123`, `"size":99999999999999999999`, 1), "not a valid manifest"},
		{"uppercase sha", strings.Replace(valid(), sha, strings.ToUpper(sha), 1), "sha256"},
		{"short sha", strings.Replace(valid(), sha, sha[:63], 1), "sha256"},
		{"setuid", strings.Replace(valid(), `"0644"`, `"4755"`, 1), "setuid"},
		{"unknown encoding", strings.Replace(valid(), `"version_id":"v1"`, `"version_id":"v1","encoding":"br"`, 1), `unknown encoding "br"`},
		{"sticky", strings.Replace(valid(), `"0644"`, `"1777"`, 1), "setuid/setgid/sticky"},
		{"mode not octal", strings.Replace(valid(), `"0644"`, `"0999"`, 1), "octal"},
		{"mode number", strings.Replace(valid(), `"0644"`, `420`, 1), "octal string"},
		{"no mtime", strings.Replace(valid(), `,"mtime":"2026-11-26T10:00:00.5Z"`, "", 1), "no mtime"},
		{"bad id", strings.Replace(valid(), "20261126T101500.123456789Z-ab12", "../../x", 1), "not of the form"},
		{"unknown field", strings.Replace(valid(), `"writer"`, `"evil":1,"writer"`, 1), "unknown field"},
		{"truncated", valid()[:len(valid())/2], "not a valid manifest"},
		{"not json", "<html>503</html>", "not a valid manifest"},
		{"empty", "", "empty manifest"},
		{"trailing data", valid() + `{"more":1}`, "trailing data"},
		{"files missing", strings.Replace(wrap(), `,"files":[]`, "", 1), `"files" is missing`},
		{"files null", strings.Replace(wrap(), `"files":[]`, `"files":null`, 1), `"files" is missing`},
		{"array", "[]", "not a valid manifest"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := Decode(strings.NewReader(c.in))
			if err == nil {
				t.Fatal("accepted")
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %q does not mention %q", err, c.want)
			}
		})
	}
}

func TestDecodeGzipBomb(t *testing.T) {
	defer func(old int64) { MaxManifestBytes = old }(MaxManifestBytes)
	MaxManifestBytes = 4 << 20
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	zw.Write([]byte(`{"format":"podkeeper.snapshot.v1","id":"`))
	chunk := bytes.Repeat([]byte("a"), 1<<20)
	for range (MaxManifestBytes >> 20) + 2 {
		zw.Write(chunk)
	}
	zw.Close()
	_, err := Decode(&buf)
	if err == nil || !strings.Contains(err.Error(), "larger than") {
		t.Fatalf("gzip bomb: %v", err)
	}
}

// TestEncoding: an encoded entry round-trips through a manifest and
// through the data object's metadata, which carries the content's size.
func TestEncoding(t *testing.T) {
	m, err := Decode(strings.NewReader(strings.Replace(valid(), `"version_id":"v1"`, `"version_id":"v1","encoding":"zstd"`, 1)))
	if err != nil {
		t.Fatal(err)
	}
	f := m.Files[0]
	if f.Encoding != "zstd" || m.Files[1].Encoding != "" {
		t.Fatalf("encodings %q %q", f.Encoding, m.Files[1].Encoding)
	}
	var buf bytes.Buffer
	if err := Encode(&buf, m, false); err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(buf.String(), `"encoding"`); n != 1 {
		t.Fatalf("%d encoding fields in %s", n, buf.String())
	}
	meta := f.Metadata()
	if meta[MetaEncoding] != "zstd" || meta[MetaSize] != "123" {
		t.Fatalf("metadata %v", meta)
	}
	back, err := FileFromMetadata(f.Path, 45, meta) // 45 bytes stored
	if err != nil || back.Size != 123 || back.Encoding != "zstd" || back.SHA256 != f.SHA256 {
		t.Fatalf("from metadata: %+v %v", back, err)
	}
	if _, ok := m.Files[1].Metadata()[MetaSize]; ok {
		t.Error("a plain object's metadata names a size")
	}
	meta[MetaEncoding] = "br"
	if _, err := FileFromMetadata(f.Path, 45, meta); err == nil {
		t.Error("unknown encoding in metadata accepted")
	}
}

func TestIDs(t *testing.T) {
	at := time.Date(2026, 11, 26, 10, 15, 0, 5, time.FixedZone("x", 3600))
	id := NewID(at, "pod-1")
	if id != "20261126T091500.000000005Z-pod-1" {
		t.Fatalf("id = %s", id)
	}
	got, err := ParseID(id)
	if err != nil || !got.Equal(at) {
		t.Fatalf("parse = %v, %v", got, err)
	}
	// Ids sort by time as strings.
	a, b := NewID(at, "zzz"), NewID(at.Add(time.Nanosecond), "aaa")
	if !(a < b) {
		t.Fatalf("%s does not sort before %s", a, b)
	}
	for _, bad := range []string{"", "2026", "20261126T101500Z", "20261126T101500.123456789Z-", "20261126T101500.123456789Z-a/b"} {
		if _, err := ParseID(bad); err == nil {
			t.Errorf("ParseID(%q) accepted", bad)
		}
	}
}

func TestResolve(t *testing.T) {
	ctx := context.Background()
	st, err := file.New(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Resolve(ctx, st, "latest"); !errors.Is(err, ErrNoSnapshot) {
		t.Fatalf("empty store: %v", err)
	}
	base := time.Date(2026, 11, 26, 10, 0, 0, 0, time.UTC)
	var ids []string
	for i := range 3 {
		m := &Manifest{Format: Format, ID: NewID(base.Add(time.Duration(i)*time.Hour), ""), Created: base.Add(time.Duration(i) * time.Hour)}
		if _, err := Write(ctx, st, m); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, m.ID)
	}
	// A stray object under snapshots/ is ignored.
	st.Put(ctx, "snapshots/README.txt", strings.NewReader("x"), 1, store.PutOptions{})
	for spec, want := range map[string]string{
		"latest": ids[2], "": ids[2], ids[0]: ids[0],
		"2026-11-26T11:30:00Z":      ids[1],
		"2026-11-26T12:00:00+01:00": ids[1], // 11:00 UTC, exactly the second
		"2026-11-26T10:00:00Z":      ids[0],
	} {
		got, err := Resolve(ctx, st, spec)
		if err != nil || got.ID != want {
			t.Errorf("Resolve(%q) = %s, %v; want %s", spec, got.ID, err, want)
		}
	}
	if _, err := Resolve(ctx, st, "2026-11-26T09:00:00Z"); !errors.Is(err, ErrNoSnapshot) {
		t.Errorf("before the first: %v", err)
	}
	if _, err := Resolve(ctx, st, "20991126T101500.123456789Z"); !errors.Is(err, ErrNoSnapshot) {
		t.Errorf("unknown id: %v", err)
	}
	if _, err := Resolve(ctx, st, "yesterday"); err == nil {
		t.Error("nonsense spec accepted")
	}
	info, _ := Resolve(ctx, st, "latest")
	m, err := Load(ctx, st, info)
	if err != nil || m.ID != ids[2] {
		t.Fatalf("load: %v", err)
	}
}
