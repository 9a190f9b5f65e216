// Command restore is the init container that rebuilds the upload directory
// from a snapshot. `restore list` and `restore verify [ID] [--deep]` are the
// operator subcommands. See restore.Main.
package main

import (
	"os"

	_ "github.com/podkeeper/podkeeper/agents/store/backends"
	"github.com/podkeeper/podkeeper/restore"
)

func main() {
	os.Exit(restore.Main(os.Args[1:], os.Environ(), os.Stdout, os.Stderr))
}
