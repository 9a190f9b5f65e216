// Package restore is the init container that rebuilds the upload directory
// from a snapshot before the app starts: it plans against what is on disk,
// downloads in parallel into temp files in the state dir, renames each file
// into place only when complete and verified, makes everything durable, and
// writes restored.json last.
package restore

import (
	"path/filepath"
	"strings"
	"time"

	"github.com/podkeeper/podkeeper/agents/config"
	"github.com/podkeeper/podkeeper/agents/snapshot"
)

// Modes of RESTORE_MODE.
const (
	ModeMerge          = "merge"
	ModeMirror         = "mirror"
	ModeSkipIfNotEmpty = "skip-if-not-empty"
	ModeFailIfNotEmpty = "fail-if-not-empty"
)

// Values of RESTORE_IF_MISSING.
const (
	IfMissingEmpty = "empty"
	IfMissingFail  = "fail"
)

// StateDirName is the default state directory inside RESTORE_DIR, shared with
// the syncer, which never uploads it.
const StateDirName = ".podkeeper"

// MaxConcurrency bounds RESTORE_CONCURRENCY: more streams than this only add
// contention on one node's network and disk.
const MaxConcurrency = 256

// Config is the restore agent's configuration.
type Config struct {
	Base  config.Base
	Store config.Store

	Dir         string `env:"RESTORE_DIR,required" help:"Directory to restore into (the Pod's shared emptyDir). Absolute path; created when missing."`
	Snapshot    string `env:"RESTORE_SNAPSHOT" envDefault:"latest" help:"What to restore: latest (every writer's acknowledged files: the fold of the change log), an RFC 3339 time (the fold at that instant, within retention), or a snapshot id (restore list) as it was written."`
	IfMissing   string `env:"RESTORE_IF_MISSING" envDefault:"empty" enum:"empty|fail" help:"No snapshot found: empty = log it and exit 0 (first deploy), fail = exit 1."`
	Mode        string `env:"RESTORE_MODE" envDefault:"merge" enum:"merge|mirror|skip-if-not-empty|fail-if-not-empty" help:"merge = restore missing or different files, keep extra local ones; mirror = also remove files the snapshot lacks; skip-if-not-empty / fail-if-not-empty = do nothing / exit 1 when the directory holds anything."`
	Concurrency int    `env:"RESTORE_CONCURRENCY" envDefault:"16" help:"Parallel downloads (files, or byte ranges of one large file)."`
	Verify      bool   `env:"RESTORE_VERIFY" envDefault:"true" help:"Check each downloaded file's sha256 against the snapshot (a mismatch is retried once, then fails)."`
	StateDir    string `env:"RESTORE_STATE_DIR" defaultHelp:"RESTORE_DIR/.podkeeper" help:"State directory shared with the syncer (temp files, restored.json); must be on the same filesystem as RESTORE_DIR."`

	Packs bool `env:"RESTORE_PACKS" envDefault:"true" help:"Read small files from the packs the syncer writes (packs/: many small files per object, fetched with ranged GETs; each file still checked against the snapshot's sha256, anything missing or stale fetched from data/ one by one). false = one GET per file."`

	// MaxConcurrency bounds the adaptive concurrency of small-file downloads (limiter.go).
	MaxConcurrency int `env:"RESTORE_MAX_CONCURRENCY" envDefault:"128" help:"Upper bound of parallel small-file downloads: starting at RESTORE_CONCURRENCY, restore adds downloads while the files/s grow and halves them on 503 SlowDown or timeouts (at 20 ms round trip, 16 downloads are at most 800 files/s). Never below RESTORE_CONCURRENCY; equal to it for a fixed number."`
}

func (c *Config) BaseConfig() *config.Base { return &c.Base }

func (c *Config) Validate(env config.Env, errs *config.Error) {
	if c.Dir != "" && !errs.Has("RESTORE_DIR") {
		if !filepath.IsAbs(c.Dir) || filepath.Clean(c.Dir) == "/" {
			errs.Add("RESTORE_DIR", env.Get("RESTORE_DIR"), "must be an absolute path other than /, e.g. /data")
		} else {
			c.Dir = filepath.Clean(c.Dir)
		}
	}
	if !errs.Has("RESTORE_CONCURRENCY") && (c.Concurrency < 1 || c.Concurrency > MaxConcurrency) {
		errs.Add("RESTORE_CONCURRENCY", env.Get("RESTORE_CONCURRENCY"), "must be between 1 and %d", MaxConcurrency)
	}
	if !errs.Has("RESTORE_MAX_CONCURRENCY") && (c.MaxConcurrency < 1 || c.MaxConcurrency > MaxConcurrency) {
		errs.Add("RESTORE_MAX_CONCURRENCY", env.Get("RESTORE_MAX_CONCURRENCY"), "must be between 1 and %d", MaxConcurrency)
	}
	if err := ValidSnapshotSpec(c.Snapshot); err != nil {
		errs.Add("RESTORE_SNAPSHOT", env.Get("RESTORE_SNAPSHOT"), "%v", err)
	}
	switch {
	case c.StateDir == "":
		if c.Dir != "" {
			c.StateDir = filepath.Join(c.Dir, StateDirName)
		}
	case !filepath.IsAbs(c.StateDir) || filepath.Clean(c.StateDir) == "/":
		errs.Add("RESTORE_STATE_DIR", env.Get("RESTORE_STATE_DIR"), "must be an absolute path other than /")
	default:
		c.StateDir = filepath.Clean(c.StateDir)
		if c.Dir != "" && c.StateDir == c.Dir {
			errs.Add("RESTORE_STATE_DIR", env.Get("RESTORE_STATE_DIR"), "must not be RESTORE_DIR itself; use a subdirectory such as RESTORE_DIR/.podkeeper")
		}
	}
}

// ValidSnapshotSpec checks a RESTORE_SNAPSHOT value the way snapshot.Resolve
// reads it, so a typo is a configuration error (exit 2), not a failed restore.
func ValidSnapshotSpec(spec string) error {
	if spec == "" || spec == "latest" {
		return nil
	}
	if snapshot.ValidateID(spec) == nil {
		return nil
	}
	if _, err := time.Parse(time.RFC3339Nano, spec); err == nil {
		return nil
	}
	return errBadSpec
}

type specError struct{}

func (specError) Error() string {
	return `must be "latest", a snapshot id like 20260102T150405.000000000Z[-suffix], or an RFC 3339 time like 2026-01-02T15:04:05Z`
}

var errBadSpec error = specError{}

// stateRel returns the state dir relative to Dir ('/'-separated), or "" when
// it lies outside Dir.
func (c *Config) stateRel() string {
	rel, err := filepath.Rel(c.Dir, c.StateDir)
	if err != nil || rel == "." || rel == ".." || strings.HasPrefix(rel, "../") {
		return ""
	}
	return filepath.ToSlash(rel)
}

// OpsConfig configures the operator subcommands (restore list, restore
// verify): they only need the store.
type OpsConfig struct {
	Base        config.Base
	Store       config.Store
	Concurrency int `env:"RESTORE_CONCURRENCY" envDefault:"16" help:"Parallel requests of restore verify."`
}

func (c *OpsConfig) BaseConfig() *config.Base { return &c.Base }

func (c *OpsConfig) Validate(env config.Env, errs *config.Error) {
	if !errs.Has("RESTORE_CONCURRENCY") && (c.Concurrency < 1 || c.Concurrency > MaxConcurrency) {
		errs.Add("RESTORE_CONCURRENCY", env.Get("RESTORE_CONCURRENCY"), "must be between 1 and %d", MaxConcurrency)
	}
}
