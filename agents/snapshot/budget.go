package snapshot

import (
	"fmt"

	"github.com/podkeeper/podkeeper/agents/memlimit"
)

// EntryCost is the fixed cost of one listed file in an agent: its Index
// record and a 4-byte slot of an order or plan, counted twice over to 8 for
// the agent's own per-file slices. An entry's variable bytes (base name,
// ETag, version id, a new directory) are charged as they come, so the budget
// also bounds the total path bytes. TestIndexCost checks the charge against
// the heap a built index really holds.
const EntryCost = RecordBytes + 8

// DecodeCost bounds the live memory of one entry decoded into a []File (the
// small-manifest API, Decode); TestEntryCost measures it.
const DecodeCost = 300

// BudgetShare is the part of the memory limit (in percent) one index may
// use: the syncer can hold two at once (its ledger's baseline and, while it
// compacts a checkpoint whose files are not in path order, the fold in
// memory; a sorted one, what this version writes, is streamed); the rest is
// the Go runtime, the GC's headroom and the agent's work.
const BudgetShare = 45

// DefaultBudgetBytes bounds an index when no memory limit is known.
const DefaultBudgetBytes = 1 << 30

// DefaultMaxEntries bounds a manifest when no memory limit is known.
const DefaultMaxEntries = 4_000_000

// BudgetBytes is what the entries of one manifest may cost in this process:
// BudgetShare percent of the memory limit. A hostile manifest is refused with
// an error naming the limit instead of the container being OOM-killed.
func BudgetBytes() int64 {
	l, _ := memlimit.Limit()
	if l <= 0 {
		return DefaultBudgetBytes
	}
	return max(l/100*BudgetShare, 1000*int64(EntryCost))
}

// MaxEntries is the most file entries a manifest may list in this process:
// BudgetBytes over EntryCost (entries with names cost more, and the byte
// budget refuses them earlier).
func MaxEntries() int {
	l, _ := memlimit.Limit()
	if l <= 0 {
		return DefaultMaxEntries
	}
	return int(BudgetBytes() / int64(EntryCost))
}

// MaxFileEntries is the most entries Decode materializes as a []File.
func MaxFileEntries() int {
	l, _ := memlimit.Limit()
	if l <= 0 {
		return DefaultMaxEntries
	}
	return int(BudgetBytes() / DecodeCost)
}

func budgetSource() string {
	l, src := memlimit.Limit()
	if l <= 0 {
		return fmt.Sprintf("no memory limit known; default %d MiB, %d entries", DefaultBudgetBytes>>20, DefaultMaxEntries)
	}
	return fmt.Sprintf("%s %d MiB, %d%% of it for the entries at %d bytes each plus their names", src, l>>20, BudgetShare, EntryCost)
}
