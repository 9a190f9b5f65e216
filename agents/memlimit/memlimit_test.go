package memlimit

import (
	"runtime/debug"
	"testing"
)

func TestParseLimit(t *testing.T) {
	for in, want := range map[string]int64{"268435456\n": 268435456, "max\n": 0, "9223372036854771712\n": 0, "": 0, "-1": 0} {
		if got := parseLimit(in); got != want {
			t.Errorf("parseLimit(%q) = %d, want %d", in, got, want)
		}
	}
}

func TestLimitPrefersTheRuntimes(t *testing.T) {
	old := debug.SetMemoryLimit(100 << 20)
	defer debug.SetMemoryLimit(old)
	if l, src := Limit(); l != 100<<20 || src != "GOMEMLIMIT" {
		t.Fatalf("Limit() = %d %q", l, src)
	}
}
