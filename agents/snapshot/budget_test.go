package snapshot

import (
	"bytes"
	"compress/gzip"
	"fmt"
	"runtime"
	"runtime/debug"
	"strings"
	"testing"
	"time"
)

// manifestJSON writes a valid n-file manifest the way the syncer would.
func manifestJSON(t testing.TB, n int, gz bool) []byte {
	m := &Manifest{Format: Format, ID: NewID(time.Unix(1764500000, 0), ""), Created: time.Unix(1764500000, 0)}
	sha := strings.Repeat("ab", 32)
	m.Files = make([]File, n)
	for i := range m.Files {
		m.Files[i] = File{Path: fmt.Sprintf("uploads/2026/11/%07d.jpg", i), Size: 512, SHA256: sha,
			MTime: time.Unix(1764500000, int64(i)), Mode: 0o644, ETag: `"0123456789abcdef0123456789abcdef"`}
	}
	var buf bytes.Buffer
	if err := Encode(&buf, m, gz); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// TestEntryCost holds decoding to DecodeCost live bytes per entry, the figure
// MaxEntries divides the memory budget by.
func TestEntryCost(t *testing.T) {
	const n = 50_000
	in := manifestJSON(t, n, true)
	m, err := Decode(bytes.NewReader(in))
	if err != nil {
		t.Fatal(err)
	}
	// What the decoded manifest holds: the heap with it, minus without it.
	var with, without runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&with)
	if len(m.Files) != n {
		t.Fatalf("%d files decoded", len(m.Files))
	}
	m = nil
	runtime.GC()
	runtime.ReadMemStats(&without)
	per := (int64(with.HeapAlloc) - int64(without.HeapAlloc)) / n
	t.Logf("%d entries decoded: %d live bytes each (bound %d)", n, per, DecodeCost)
	if per > DecodeCost {
		t.Fatalf("a decoded entry costs %d bytes, more than DecodeCost %d: MaxEntries would let an agent run out of memory", per, DecodeCost)
	}
}

// Under a memory limit a manifest listing more files than fit is refused,
// naming the limit, before its entries exhaust the memory: here 4 MiB of
// gzip that would decode to half a million entries, under a 64 MiB limit.
func TestManifestOverMemoryBudget(t *testing.T) {
	old := debug.SetMemoryLimit(64 << 20)
	defer debug.SetMemoryLimit(old)
	limit := MaxEntries()
	if limit != 64<<20/2/EntryCost {
		t.Fatalf("MaxEntries under a 64 MiB limit = %d, want %d", limit, 64<<20/2/EntryCost)
	}
	if _, err := Decode(bytes.NewReader(manifestJSON(t, limit, true))); err != nil {
		t.Fatalf("a manifest of exactly %d entries: %v", limit, err)
	}
	bomb := hostileManyEntries(t, 500_000)
	var ms runtime.MemStats
	_, err := Decode(bytes.NewReader(bomb))
	runtime.ReadMemStats(&ms)
	if err == nil || !strings.Contains(err.Error(), "memory budget") || !strings.Contains(err.Error(), "GOMEMLIMIT 64 MiB") {
		t.Fatalf("want a refusal naming the memory budget, got %v", err)
	}
	t.Logf("%d bytes of gzip refused: %v (heap in use %d MiB)", len(bomb), err, ms.HeapInuse>>20)
}

// hostileManyEntries is the attack of the issue: tiny, identical-looking
// entries that compress to almost nothing.
func hostileManyEntries(t testing.TB, n int) []byte {
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	fmt.Fprintf(zw, `{"format":%q,"id":"20261126T101500.123456789Z","created":"2026-11-26T10:15:00Z","writer":{},"files":[`, Format)
	sha := strings.Repeat("0", 64)
	for i := range n {
		if i > 0 {
			zw.Write([]byte{','})
		}
		fmt.Fprintf(zw, `{"path":"f%d","size":0,"sha256":"%s","mtime":"2026-11-26T10:00:00Z","mode":"0644"}`, i, sha)
	}
	zw.Write([]byte("]}"))
	zw.Close()
	return buf.Bytes()
}

func TestDecodeRefusesRepeatedFields(t *testing.T) {
	in := `{"format":"` + Format + `","format":"` + Format + `","id":"20261126T101500.123456789Z","created":"2026-11-26T10:15:00Z","writer":{},"files":[]}`
	if _, err := Decode(strings.NewReader(in)); err == nil || !strings.Contains(err.Error(), "repeated") {
		t.Fatalf("repeated field: %v", err)
	}
}
