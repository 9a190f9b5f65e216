// Command logshipper tails the app's log files and forwards every line
// at-least-once over the Fluent forward protocol. See docs/logshipper.md.
package main

import (
	"context"
	"os"

	"github.com/podkeeper/podkeeper/agents/lifecycle"
	"github.com/podkeeper/podkeeper/logshipper"
)

func main() {
	os.Exit(lifecycle.Agent[*logshipper.Config]{
		Name:    "logshipper",
		Summary: "tail log files and forward them at-least-once over the Fluent forward protocol",
		Run: func(ctx context.Context, cfg *logshipper.Config, deps lifecycle.Deps) error {
			return logshipper.New(cfg, deps).Run(ctx)
		},
	}.Main(&logshipper.Config{}, os.Args[1:], os.Environ(), os.Stdout, os.Stderr))
}
