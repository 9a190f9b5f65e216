package changelog

import (
	"testing"

	"github.com/podkeeper/podkeeper/agents/config"
)

func fileConfig(t *testing.T) *config.Store {
	dir := t.TempDir()
	return &config.Store{URL: "file://" + dir, Scheme: "file", Path: dir}
}
