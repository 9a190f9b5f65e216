package snapshot

import (
	"fmt"

	"github.com/podkeeper/podkeeper/agents/memlimit"
)

// DecodeCost bounds the live memory of one decoded entry; TestEntryCost
// measures it (248 bytes for typical paths) and fails past this bound.
const DecodeCost = 300

// EntryCost is what one listed file may cost an agent: the decoded entry plus
// about as much again for its own per-file state (restore's plan, the
// syncer's baseline).
const EntryCost = 2 * DecodeCost

// DefaultMaxEntries bounds a manifest when no memory limit is known.
const DefaultMaxEntries = 4_000_000

// MaxEntries is the most file entries a manifest may list in this process:
// half of the memory limit (the other half is the agent's work and the GC's
// headroom) divided by EntryCost. A hostile manifest is refused with an error
// naming the limit instead of the container being OOM-killed.
func MaxEntries() int {
	l, _ := memlimit.Limit()
	if l <= 0 {
		return DefaultMaxEntries
	}
	return int(max(l/2/EntryCost, 1000))
}

func budgetSource() string {
	l, src := memlimit.Limit()
	if l <= 0 {
		return fmt.Sprintf("no memory limit known; default %d entries", DefaultMaxEntries)
	}
	return fmt.Sprintf("%s %d MiB, %d bytes per entry", src, l>>20, EntryCost)
}
