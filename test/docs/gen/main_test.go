package main

import (
	"testing"

	"github.com/podkeeper/podkeeper/test/docs"
)

// TestReadmeTablesInSync fails when a variable was added, renamed or
// re-described without `make docs`.
func TestDocsTablesInSync(t *testing.T) {
	for _, tb := range tables {
		if err := docs.Check(tb.Name, tb.Config); err != nil {
			t.Error(err)
		}
	}
}
