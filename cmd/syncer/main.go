// Command syncer is the native sidecar that pushes every finished file of a
// directory to S3, writes snapshots and drains on SIGTERM. See README.md.
package main

import (
	"context"
	"log/slog"
	"os"
	"time"

	"github.com/podkeeper/podkeeper/agents/kube"
	"github.com/podkeeper/podkeeper/agents/lifecycle"
	"github.com/podkeeper/podkeeper/syncer"
)

func main() {
	os.Exit(lifecycle.Agent[*syncer.Config]{
		Name:    "syncer",
		Summary: "Watches SYNC_DIR and pushes every finished file to S3, with snapshots restore can use; drains on SIGTERM.",
		Run: func(ctx context.Context, cfg *syncer.Config, log *slog.Logger) error {
			ev, err := kube.New(ctx, &cfg.Base, log, kube.Options{Component: "syncer"})
			if err != nil {
				return err
			}
			defer ev.CloseWithin(5 * time.Second)
			s, err := syncer.New(ctx, cfg, syncer.Options{Log: log, Recorder: ev})
			if err != nil {
				return err
			}
			return s.Run(ctx)
		},
	}.Main(&syncer.Config{}, os.Args[1:], os.Environ(), os.Stdout, os.Stderr))
}
