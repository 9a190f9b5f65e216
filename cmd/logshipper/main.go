// Command logshipper tails the app's log files and forwards every line
// at-least-once over the Fluent forward protocol. See README "logshipper".
package main

import (
	"context"
	"log/slog"
	"os"
	"time"

	"github.com/podkeeper/podkeeper/agents/kube"
	"github.com/podkeeper/podkeeper/agents/lifecycle"
	"github.com/podkeeper/podkeeper/logshipper"
)

func main() {
	os.Exit(lifecycle.Agent[*logshipper.Config]{
		Name:    "logshipper",
		Summary: "tail log files and forward them at-least-once over the Fluent forward protocol",
		Run: func(ctx context.Context, cfg *logshipper.Config, log *slog.Logger) error {
			ev, err := kube.New(ctx, &cfg.Base, log, kube.Options{Component: "logshipper"})
			if err != nil {
				return err
			}
			defer ev.CloseWithin(5 * time.Second)
			return logshipper.New(cfg, log, ev, logshipper.Options{Labels: ev.Labels}).Run(ctx)
		},
	}.Main(&logshipper.Config{}, os.Args[1:], os.Environ(), os.Stdout, os.Stderr))
}
