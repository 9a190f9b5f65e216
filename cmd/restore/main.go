// Command restore is the init container that rebuilds the upload directory
// from a snapshot. `restore list` and `restore verify [ID] [--deep]` are the
// operator subcommands.
package main

import (
	"context"
	"fmt"
	"io"
	"os"

	"github.com/podkeeper/podkeeper/agents/lifecycle"
	"github.com/podkeeper/podkeeper/agents/store"
	_ "github.com/podkeeper/podkeeper/agents/store/backends"
	"github.com/podkeeper/podkeeper/restore"
)

func main() {
	os.Exit(run(os.Args[1:], os.Environ(), os.Stdout, os.Stderr))
}

func run(args, environ []string, stdout, stderr io.Writer) int {
	if len(args) > 0 {
		switch args[0] {
		case "list":
			return listCmd(args[1:], environ, stdout, stderr)
		case "verify":
			return verifyCmd(args[1:], environ, stdout, stderr)
		}
	}
	return lifecycle.Agent[*restore.Config]{
		Name: "restore",
		Summary: "Init container: restores a snapshot (latest, by id or point in time) from the store onto RESTORE_DIR, " +
			"atomically and verified.\nSubcommands: `restore list` (snapshots), `restore verify [ID] [--deep]` (objects exist with the recorded size and sha256).",
		Run: func(ctx context.Context, cfg *restore.Config, deps lifecycle.Deps) error {
			st, err := store.Open(ctx, &cfg.Store, deps.Log)
			if err != nil {
				return err
			}
			deps.Store = st
			_, err = restore.New(cfg, deps).Run(ctx)
			return err
		},
	}.Main(&restore.Config{}, args, environ, stdout, stderr)
}

func listCmd(args, environ []string, stdout, stderr io.Writer) int {
	return lifecycle.Agent[*restore.OpsConfig]{
		Name:      "restore list",
		Component: "restore",
		Summary:   "Lists the snapshots in STORE_URL: id, creation time, files, bytes.",
		Run: func(ctx context.Context, cfg *restore.OpsConfig, deps lifecycle.Deps) error {
			log := deps.Log
			if len(args) > 0 {
				return fmt.Errorf("restore list takes no arguments, got %q", args)
			}
			st, err := store.Open(ctx, &cfg.Store, log)
			if err != nil {
				return err
			}
			entries, err := restore.List(ctx, st)
			if err != nil {
				return err
			}
			restore.PrintList(stdout, entries)
			return nil
		},
	}.Main(&restore.OpsConfig{}, args, environ, stdout, stderr)
}

func verifyCmd(args, environ []string, stdout, stderr io.Writer) int {
	return lifecycle.Agent[*restore.OpsConfig]{
		Name:      "restore verify",
		Component: "restore",
		Summary: "restore verify [ID|TIME|latest] [--deep]: checks that every object of a snapshot exists with the recorded size and " +
			"sha256 metadata; --deep also downloads and hashes each one. Exit 1 when anything is wrong.",
		Run: func(ctx context.Context, cfg *restore.OpsConfig, deps lifecycle.Deps) error {
			log := deps.Log
			spec, deep := "latest", false
			specSet := false
			for _, a := range args {
				switch {
				case a == "--deep" || a == "-deep":
					deep = true
				case !specSet:
					if err := restore.ValidSnapshotSpec(a); err != nil {
						return fmt.Errorf("snapshot %q: %w", a, err)
					}
					spec, specSet = a, true
				default:
					return fmt.Errorf("usage: restore verify [ID|TIME|latest] [--deep]; unexpected %q", a)
				}
			}
			st, err := store.Open(ctx, &cfg.Store, log)
			if err != nil {
				return err
			}
			rep, err := restore.Verify(ctx, st, spec, deep, cfg.Concurrency)
			if err != nil {
				return err
			}
			for _, p := range rep.Problems {
				fmt.Fprintf(stdout, "BAD  %s: %s\n", p.Path, p.Reason)
			}
			how := "size and sha256 metadata"
			if deep {
				how = "size, sha256 metadata and downloaded content"
			}
			if len(rep.Problems) > 0 {
				fmt.Fprintf(stdout, "snapshot %s: %d of %d files failed (%s)\n", rep.Snapshot, len(rep.Problems), rep.Files, how)
				return fmt.Errorf("snapshot %s: %d of %d files failed verification", rep.Snapshot, len(rep.Problems), rep.Files)
			}
			fmt.Fprintf(stdout, "snapshot %s: all %d files (%d bytes) OK (%s)\n", rep.Snapshot, rep.Files, rep.Bytes, how)
			return nil
		},
	}.Main(&restore.OpsConfig{}, args, environ, stdout, stderr)
}
