package syncer

import (
	"strings"
	"testing"
	"time"
)

func TestConflictName(t *testing.T) {
	at := time.Date(2026, 11, 30, 13, 0, 5, 0, time.UTC)
	for base, want := range map[string][2]string{
		"report.csv":     {"report.sync-conflict-20261130-130005-", ".csv"},
		".env":           {".env.sync-conflict-20261130-130005-", ""},
		"archive.tar.gz": {"archive.tar.sync-conflict-20261130-130005-", ".gz"},
		"README":         {"README.sync-conflict-20261130-130005-", ""},
	} {
		got := conflictName(base, at, "ns/pod/uid")
		hash := strings.TrimSuffix(strings.TrimPrefix(got, want[0]), want[1])
		if !strings.HasPrefix(got, want[0]) || !strings.HasSuffix(got, want[1]) || len(hash) != 8 {
			t.Errorf("conflictName(%q) = %q, want %s<8 hex>%s", base, got, want[0], want[1])
		}
		if !excluded(nil, true, "d/"+got) || excluded(nil, false, "d/"+got) {
			t.Errorf("%q: excluded only with SYNC_PULL", got)
		}
	}
}
