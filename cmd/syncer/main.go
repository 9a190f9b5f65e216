// Command syncer is the native sidecar that pushes every finished file of a
// directory to S3, writes snapshots and drains on SIGTERM. See docs/syncer.md.
package main

import (
	"context"
	"os"

	"github.com/podkeeper/podkeeper/agents/lifecycle"
	"github.com/podkeeper/podkeeper/agents/store"
	_ "github.com/podkeeper/podkeeper/agents/store/backends"
	"github.com/podkeeper/podkeeper/syncer"
)

func main() {
	os.Exit(lifecycle.Agent[*syncer.Config]{
		Name:    "syncer",
		Summary: "Watches SYNC_DIR and pushes every finished file to S3, with snapshots restore can use; drains on SIGTERM.",
		Run: func(ctx context.Context, cfg *syncer.Config, deps lifecycle.Deps) error {
			st, err := store.Open(ctx, &cfg.Store, deps.Log)
			if err != nil {
				return err
			}
			deps.Store = st
			s, err := syncer.New(cfg, deps)
			if err != nil {
				return err
			}
			return s.Run(ctx)
		},
	}.Main(&syncer.Config{}, os.Args[1:], os.Environ(), os.Stdout, os.Stderr))
}
