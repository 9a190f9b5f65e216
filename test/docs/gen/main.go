// Command gen rewrites README.md's configuration tables from the config structs.
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

// tables lists every table of the README. Agents add themselves here.
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
	path := docs.Readme()
	if len(os.Args) > 1 {
		path = os.Args[1]
	}
	b, err := os.ReadFile(path)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	s := string(b)
	for _, t := range tables {
		if s, err = docs.Rewrite(s, t.Name, t.Config); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	}
	if err := os.WriteFile(path, []byte(s), 0o644); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
