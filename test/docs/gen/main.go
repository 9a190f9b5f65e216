// Command gen rewrites the configuration tables in docs/ (docs/NAME.md, the
// shared one in docs/configuration.md) from the config structs.
package main

import (
	"fmt"
	"os"

	"github.com/podkeeper/podkeeper/agents/config"
	"github.com/podkeeper/podkeeper/logshipper"
	"github.com/podkeeper/podkeeper/restore"
	"github.com/podkeeper/podkeeper/syncer"
	"github.com/podkeeper/podkeeper/test/docs"
)

// tables lists every documented configuration. Agents add themselves here.
var tables = []docs.Table{
	{Name: "shared", Config: &struct {
		Base  config.Base
		Store config.Store
	}{}},
	{Name: "syncer", Config: &syncer.Config{}},
	{Name: "restore", Config: &restore.Config{}},
	{Name: "logshipper", Config: &logshipper.Config{}},
}

func main() {
	for _, t := range tables {
		if err := rewrite(t); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	}
}

func rewrite(t docs.Table) error {
	path := docs.File(t.Name)
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	s, err := docs.Rewrite(string(b), t.Name, t.Config)
	if err != nil {
		return err
	}
	if s == string(b) {
		return nil
	}
	return os.WriteFile(path, []byte(s), 0o644)
}
