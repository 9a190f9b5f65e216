package snapshot

import (
	"bytes"
	"testing"
)

// FuzzDecode: whatever the bytes, Decode either refuses them or returns a
// manifest that passes every rule and survives an encode/decode round trip,
// and then Scan accepts them too, with the same files.
func FuzzDecode(f *testing.F) {
	f.Add([]byte(valid()))
	for _, s := range []string{
		`{"format":"podkeeper.snapshot.v1","id":"20261126T101500.123456789Z","created":"2026-11-26T10:15:00Z","writer":{},"files":[{"path":"../x","size":1,"sha256":"` + sha + `","mtime":"2026-11-26T10:00:00Z","mode":"0644"}]}`,
		`{"format":"podkeeper.snapshot.v1","id":"20261126T101500.123456789Z","created":"2026-11-26T10:15:00Z","writer":{},"files":[{"path":"a\u0000","size":1,"sha256":"` + sha + `","mtime":"2026-11-26T10:00:00Z","mode":"4755"}]}`,
		`{"format":"podkeeper.snapshot.v1","files":null}`, `[]`, `null`, "\x1f\x8b", `{"files":[{"path":"/etc"}]}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		m, err := Decode(bytes.NewReader(in))
		if err != nil {
			return
		}
		n := 0
		if _, err := Scan(bytes.NewReader(in), nil, func(File) error { n++; return nil }); err != nil || n != len(m.Files) {
			t.Fatalf("Decode accepted %d files, Scan %d: %v", len(m.Files), n, err)
		}
		for _, file := range m.Files {
			if ValidPath(file.Path) != nil || file.Size < 0 || file.Mode > 0o777 {
				t.Fatalf("accepted a bad entry %+v", file)
			}
		}
		var buf bytes.Buffer
		if err := Encode(&buf, m, false); err != nil {
			t.Fatalf("re-encode of an accepted manifest: %v", err)
		}
		m2, err := Decode(&buf)
		if err != nil || len(m2.Files) != len(m.Files) {
			t.Fatalf("round trip: %v", err)
		}
	})
}
