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
func manifestJSON(t testing.TB, n int, gz bool) []byte { return manifestJSONNamed(t, n, "", gz) }

func manifestJSONNamed(t testing.TB, n int, name string, gz bool) []byte {
	m := &Manifest{Format: Format, ID: NewID(time.Unix(1764500000, 0), ""), Created: time.Unix(1764500000, 0)}
	sha := strings.Repeat("ab", 32)
	m.Files = make([]File, n)
	for i := range m.Files {
		m.Files[i] = File{Path: fmt.Sprintf("uploads/2026/11/%s%07d.jpg", name, i), Size: 512, SHA256: sha,
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

// Under a memory limit a manifest whose entries do not fit is refused,
// naming the limit, before its entries exhaust the memory: here 4 MiB of
// gzip that would decode to half a million entries, under a 16 MiB limit;
// a legitimate manifest that fits the budget decodes.
func TestManifestOverMemoryBudget(t *testing.T) {
	old := debug.SetMemoryLimit(16 << 20)
	defer debug.SetMemoryLimit(old)
	if got, want := BudgetBytes(), int64(16<<20)/100*BudgetShare; got != want {
		t.Fatalf("BudgetBytes under a 16 MiB limit = %d, want %d", got, want)
	}
	if MaxEntries() != int(BudgetBytes()/int64(EntryCost)) {
		t.Fatalf("MaxEntries = %d", MaxEntries())
	}
	// The test entries cost EntryCost + 30 bytes (name, ETag as MD5, lengths).
	fits := int(BudgetBytes()/int64(EntryCost+30)) * 95 / 100
	c, err := DecodeCompact(bytes.NewReader(manifestJSON(t, fits, true)))
	if err != nil {
		t.Fatalf("a manifest of %d entries: %v", fits, err)
	}
	t.Logf("%d entries fit %d bytes: %d charged", fits, BudgetBytes(), c.Files.Cost())
	bomb := hostileManyEntries(t, 500_000)
	var ms runtime.MemStats
	_, err = DecodeCompact(bytes.NewReader(bomb))
	runtime.ReadMemStats(&ms)
	if err == nil || !strings.Contains(err.Error(), "memory budget") || !strings.Contains(err.Error(), "GOMEMLIMIT 16 MiB") {
		t.Fatalf("want a refusal naming the memory budget, got %v", err)
	}
	t.Logf("%d bytes of gzip refused: %v (heap in use %d MiB)", len(bomb), err, ms.HeapInuse>>20)
	// Long names are charged: fewer of them fit.
	long := manifestJSONNamed(t, fits, strings.Repeat("n", 200), true)
	if _, err := DecodeCompact(bytes.NewReader(long)); err == nil || !strings.Contains(err.Error(), "memory budget") {
		t.Fatalf("%d entries with 200-byte names: want a refusal, got %v", fits, err)
	}
}

// TestIndexCost: what the budget charges for an index is what the heap holds
// (within 10%), and a typical entry costs under 100 bytes: a million fit the
// 45% share of a 256 MiB container's GOMEMLIMIT (230 MiB).
func TestIndexCost(t *testing.T) {
	const n = 200_000
	in := manifestJSON(t, n, true)
	c, err := DecodeCompact(bytes.NewReader(in))
	if err != nil {
		t.Fatal(err)
	}
	cost := c.Files.Cost()
	// What the index holds: the heap with it, minus without it.
	// Two collections each: pooled objects of other tests survive the first.
	var with, without runtime.MemStats
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&with)
	runtime.KeepAlive(c)
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&without)
	heap := int64(with.HeapAlloc) - int64(without.HeapAlloc)
	t.Logf("%d entries: %d heap bytes each, %d charged each", n, heap/n, cost/n)
	if heap > cost*11/10 {
		t.Fatalf("the index holds %d bytes, %d were charged", heap, cost)
	}
	if per := cost / n; per >= 100 {
		t.Fatalf("a typical entry is charged %d bytes", per)
	}
	limit := int64(256<<20) / 10 * 9
	if fit := limit / 100 * BudgetShare / (cost / n); fit < 1_000_000 {
		t.Fatalf("only %d typical entries fit under a 256 MiB container", fit)
	}
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
