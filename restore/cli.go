package restore

import (
	"context"
	"fmt"
	"io"
	"strconv"
	"strings"

	"github.com/podkeeper/podkeeper/agents/config"
	"github.com/podkeeper/podkeeper/agents/lifecycle"
	"github.com/podkeeper/podkeeper/agents/pack"
	"github.com/podkeeper/podkeeper/agents/snapshot"
	"github.com/podkeeper/podkeeper/agents/store"
)

// Main is the restore binary: the init container, or with a first argument
// of list or verify the operator subcommands. It returns the exit code. The
// binary links the store backends (agents/store/backends); Main opens
// STORE_URL with store.Open into deps.Store.
func Main(args, environ []string, stdout, stderr io.Writer) int {
	if len(args) > 0 {
		switch args[0] {
		case "list":
			return listCommand(args[1:], stdout).Main(&OpsConfig{}, args[1:], environ, stdout, stderr)
		case "verify":
			return verifyCommand(args[1:], stdout).Main(&OpsConfig{}, args[1:], environ, stdout, stderr)
		case "conflicts":
			return conflictsCommand(args[1:], stdout).Main(&OpsConfig{}, args[1:], environ, stdout, stderr)
		case "pack":
			return packCommand(args[1:], stdout).Main(&OpsConfig{}, args[1:], environ, stdout, stderr)
		}
	}
	return lifecycle.Agent[*Config]{
		Name: "restore",
		Summary: "Init container: restores a snapshot (latest, by id or point in time) from the store onto RESTORE_DIR, " +
			"atomically and verified.\nSubcommands: `restore list` (snapshots), `restore verify [ID] [--deep]` (objects exist with the recorded size and sha256), " +
			"`restore conflicts` (the kept losers of write conflicts between syncers), " +
			"`restore pack [--max-file-size BYTES]` (packs the small files of the latest fold now, as the syncer's compactor does after each checkpoint).",
		Run: func(ctx context.Context, cfg *Config, deps lifecycle.Deps) error {
			if err := openStore(ctx, &cfg.Store, &deps); err != nil {
				return err
			}
			_, err := New(cfg, deps).Run(ctx)
			return err
		},
	}.Main(&Config{}, args, environ, stdout, stderr)
}

// openStore fills deps.Store: lifecycle builds Deps without one, as not
// every agent has a store.
func openStore(ctx context.Context, c *config.Store, deps *lifecycle.Deps) error {
	st, err := store.Open(ctx, c, deps.Log)
	deps.Store = st
	return err
}

func listCommand(args []string, stdout io.Writer) lifecycle.Agent[*OpsConfig] {
	return lifecycle.Agent[*OpsConfig]{
		Name:      "restore list",
		Component: "restore",
		Summary:   "Lists the snapshots in STORE_URL: id, creation time, files, bytes.",
		Run: func(ctx context.Context, cfg *OpsConfig, deps lifecycle.Deps) error {
			if len(args) > 0 {
				return fmt.Errorf("restore list takes no arguments, got %q", args)
			}
			if err := openStore(ctx, &cfg.Store, &deps); err != nil {
				return err
			}
			entries, err := List(ctx, deps.Store)
			if err != nil {
				return err
			}
			PrintList(stdout, entries)
			return nil
		},
	}
}

func conflictsCommand(args []string, stdout io.Writer) lifecycle.Agent[*OpsConfig] {
	return lifecycle.Agent[*OpsConfig]{
		Name:      "restore conflicts",
		Component: "restore",
		Summary: "Lists the write conflicts between syncers of STORE_URL: per path, the losing writer and where its bytes are kept " +
			"(data/PATH holds the winner: the newer mtime, then the greater writer id).",
		Run: func(ctx context.Context, cfg *OpsConfig, deps lifecycle.Deps) error {
			if len(args) > 0 {
				return fmt.Errorf("restore conflicts takes no arguments, got %q", args)
			}
			if err := openStore(ctx, &cfg.Store, &deps); err != nil {
				return err
			}
			cs, err := Conflicts(ctx, deps.Store)
			if err != nil {
				return err
			}
			PrintConflicts(stdout, cs)
			return nil
		},
	}
}

func verifyCommand(args []string, stdout io.Writer) lifecycle.Agent[*OpsConfig] {
	return lifecycle.Agent[*OpsConfig]{
		Name:      "restore verify",
		Component: "restore",
		Summary: "restore verify [ID|TIME|latest] [--deep]: checks that every object of a snapshot exists with the recorded size and " +
			"sha256 metadata; --deep also downloads and hashes each one. Exit 1 when anything is wrong.",
		Run: func(ctx context.Context, cfg *OpsConfig, deps lifecycle.Deps) error {
			spec, deep, err := parseVerifyArgs(args)
			if err != nil {
				return err
			}
			if err := openStore(ctx, &cfg.Store, &deps); err != nil {
				return err
			}
			rep, err := Verify(ctx, deps.Store, spec, deep, cfg.Concurrency)
			if err != nil {
				return err
			}
			return printVerify(stdout, rep, deep)
		},
	}
}

// parseVerifyArgs reads `restore verify [ID|TIME|latest] [--deep]`.
func parseVerifyArgs(args []string) (spec string, deep bool, err error) {
	spec, specSet := "latest", false
	for _, a := range args {
		switch {
		case a == "--deep" || a == "-deep":
			deep = true
		case !specSet:
			if err := ValidSnapshotSpec(a); err != nil {
				return "", false, fmt.Errorf("snapshot %q: %w", a, err)
			}
			spec, specSet = a, true
		default:
			return "", false, fmt.Errorf("usage: restore verify [ID|TIME|latest] [--deep]; unexpected %q", a)
		}
	}
	return spec, deep, nil
}

// printVerify writes the report of `restore verify`: a line per problem and a
// verdict. It returns an error when anything failed, so the exit code says so.
func printVerify(w io.Writer, rep *VerifyReport, deep bool) error {
	for _, p := range rep.Problems {
		fmt.Fprintf(w, "BAD  %s: %s\n", p.Path, p.Reason)
	}
	how := "size and sha256 metadata"
	if deep {
		how = "size, sha256 metadata and downloaded content"
	}
	if len(rep.Problems) > 0 {
		fmt.Fprintf(w, "snapshot %s: %d of %d files failed (%s)\n", rep.Snapshot, len(rep.Problems), rep.Files, how)
		return fmt.Errorf("snapshot %s: %d of %d files failed verification", rep.Snapshot, len(rep.Problems), rep.Files)
	}
	fmt.Fprintf(w, "snapshot %s: all %d files (%d bytes) OK (%s)\n", rep.Snapshot, rep.Files, rep.Bytes, how)
	return nil
}

func packCommand(args []string, stdout io.Writer) lifecycle.Agent[*OpsConfig] {
	return lifecycle.Agent[*OpsConfig]{
		Name:      "restore pack",
		Component: "restore",
		Summary: "restore pack [--max-file-size BYTES]: copies the small files (1..BYTES, default 262144) of the latest fold that no pack " +
			"holds into packs (PREFIX/packs/), and deletes stale packs, as the syncer's compactor does after each checkpoint. " +
			"For a prefix written before packs existed, or one whose syncers run with SYNC_PACK_MAX_FILE_SIZE=0. Use the syncers' SYNC_PACK_MAX_FILE_SIZE.",
		Run: func(ctx context.Context, cfg *OpsConfig, deps lifecycle.Deps) error {
			maxSize, err := parsePackArgs(args)
			if err != nil {
				return err
			}
			if err := openStore(ctx, &cfg.Store, &deps); err != nil {
				return err
			}
			m, err := Resolve(ctx, deps.Store, "latest")
			if err != nil {
				return err
			}
			rep, err := pack.Update(ctx, deps.Store, func(fn func(snapshot.File) error) error {
				for _, f := range m.Files.All() {
					if err := fn(f); err != nil {
						return err
					}
				}
				return nil
			}, pack.Options{MaxFileSize: maxSize, Concurrency: cfg.Concurrency, Log: deps.Log})
			if err != nil {
				return err
			}
			fmt.Fprintf(stdout, "packs written: %d (%d files, %d bytes); packs deleted: %d; small files already packed: %d; small files in no pack: %d\n",
				rep.Packs, rep.Files, rep.Bytes, rep.Deleted, rep.Covered, rep.Unpacked)
			return nil
		},
	}
}

// parsePackArgs reads `restore pack [--max-file-size BYTES]`.
func parsePackArgs(args []string) (int64, error) {
	size := int64(pack.DefaultMaxFileSize)
	for i := 0; i < len(args); i++ {
		a := args[i]
		v, ok := strings.CutPrefix(a, "--max-file-size=")
		if !ok && a == "--max-file-size" && i+1 < len(args) {
			v, ok = args[i+1], true
			i++
		}
		if !ok {
			return 0, fmt.Errorf("usage: restore pack [--max-file-size BYTES]; unexpected %q", a)
		}
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n < 1 || n > pack.MaxFileSize {
			return 0, fmt.Errorf("--max-file-size %q: must be between 1 and %d bytes", v, pack.MaxFileSize)
		}
		size = n
	}
	return size, nil
}
