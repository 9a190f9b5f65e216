// Package memlimit tells an agent how much memory it may use, so that what it
// loads from the store (manifests, listings) is refused with a clear error
// before the kernel's OOM killer ends the container without one.
package memlimit

import (
	"math"
	"os"
	"runtime/debug"
	"strconv"
	"strings"
)

// cgroupFiles are the container memory limits of cgroup v2 and v1.
var cgroupFiles = []string{"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"}

// Limit returns the memory limit in force and where it comes from: the Go
// runtime's (GOMEMLIMIT, or what Apply set) when there is one, else the
// container's cgroup limit, else (0, "none").
func Limit() (int64, string) {
	if l := debug.SetMemoryLimit(-1); l > 0 && l != math.MaxInt64 {
		return l, "GOMEMLIMIT"
	}
	if l := cgroupLimit(); l > 0 {
		return l, "cgroup memory limit"
	}
	return 0, "none"
}

func cgroupLimit() int64 {
	for _, f := range cgroupFiles {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		if v := parseLimit(string(b)); v > 0 {
			return v
		}
	}
	return 0
}

// parseLimit reads a cgroup limit file: "max" (v2) or a near-MaxInt64
// page-rounded value (v1) mean no limit (0).
func parseLimit(s string) int64 {
	v, err := strconv.ParseInt(strings.TrimSpace(s), 10, 64)
	if err != nil || v <= 0 || v >= 1<<62 {
		return 0
	}
	return v
}

// Apply sets the Go runtime's soft limit to 90% of the container's limit when
// GOMEMLIMIT is not set: the GC then works harder near the limit instead of
// letting garbage push the process over it. It returns the limit set (0: none).
func Apply() int64 {
	if os.Getenv("GOMEMLIMIT") != "" {
		return 0
	}
	l := cgroupLimit()
	if l <= 0 {
		return 0
	}
	soft := l / 10 * 9
	debug.SetMemoryLimit(soft)
	return soft
}
