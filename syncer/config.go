// Package syncer watches a directory and pushes every finished file to the
// object store, records snapshots restore can rebuild the directory from, and
// drains on shutdown.
package syncer

import (
	"github.com/podkeeper/podkeeper/agents/pack"
	"os"
	"path"
	"path/filepath"
	"strings"
	"time"

	"github.com/podkeeper/podkeeper/agents/config"
)

// DefaultExclude are the names of files that are still being written by the
// usual tools (download managers, editors, write-then-rename writers).
const DefaultExclude = "*.tmp,*.part,*.partial,*.swp,*~,.#*"

// StateDirName is the state directory inside SYNC_DIR shared with restore; it
// is never uploaded.
const StateDirName = ".podkeeper"

// Config is the syncer's configuration.
type Config struct {
	Base  config.Base
	Store config.Store

	Dir              string        `env:"SYNC_DIR,required" help:"Directory to watch and upload (the shared emptyDir)."`
	Exclude          []string      `env:"SYNC_EXCLUDE" envDefault:"*.tmp,*.part,*.partial,*.swp,*~,.#*" help:"Comma-separated globs of names never uploaded, matched against the path relative to SYNC_DIR and against the base name."`
	Settle           time.Duration `env:"SYNC_SETTLE" envDefault:"1s" help:"A file is uploaded once no write arrived for this long and its size and mtime are stable (files renamed into place go at once)."`
	Concurrency      int           `env:"SYNC_CONCURRENCY" envDefault:"16" help:"Uploads in flight at once to start with (and downloads of SYNC_PULL)."`
	MaxConcurrency   int           `env:"SYNC_MAX_CONCURRENCY" envDefault:"128" help:"Upper bound of uploads in flight: starting at SYNC_CONCURRENCY, the syncer adds uploads while the files/s grow (a backfill of small files at 20 ms round trip is capped near SYNC_CONCURRENCY / RTT otherwise) and halves them on 503 SlowDown or timeouts. Never below SYNC_CONCURRENCY; equal to it for a fixed number."`
	MaxFileSize      int64         `env:"SYNC_MAX_FILE_SIZE" envDefault:"0" help:"Files larger than this many bytes are skipped with a warning and a metric (0 = no limit)."`
	Delete           bool          `env:"SYNC_DELETE" envDefault:"false" help:"Record a file this syncer had and saw removed as a deletion (a tombstone in the change log: restore no longer brings it back), and let retention delete the data objects of deleted files. Off: restore brings back every file any writer uploaded."`
	LogInterval      time.Duration `env:"SYNC_LOG_INTERVAL" envDefault:"1s" help:"Uploads and deletions are appended to the change log (PREFIX/log/) at most this long after they finish, or every 1000 files; an upload counts as done only once its batch is stored."`
	SnapshotInterval time.Duration `env:"SYNC_SNAPSHOT_INTERVAL" envDefault:"1m" help:"Try this often to fold the change log into a checkpoint snapshot and apply retention (one syncer of the prefix at a time, under a short compaction lease; 0 = never)."`
	SnapshotRetain   int           `env:"SYNC_SNAPSHOT_RETAIN" envDefault:"48" help:"Number of newest checkpoints kept (the change log older than the oldest one is deleted: point-in-time restore reaches back to it)."`
	ShutdownTimeout  time.Duration `env:"SYNC_SHUTDOWN_TIMEOUT" envDefault:"25s" help:"Time to drain uploads and append them to the change log after SIGTERM; past it the syncer exits 1 listing what was left."`
	Watch            string        `env:"SYNC_WATCH" envDefault:"auto" enum:"auto|inotify|poll" help:"How changes are seen: inotify, or poll (walk SYNC_DIR every SYNC_POLL_INTERVAL: readdir and stat per directory; needed on shared volumes, where inotify misses other clients' writes). auto = poll on NFS, SMB/CIFS, FUSE, 9p and CephFS (statfs), inotify elsewhere."`
	PollInterval     time.Duration `env:"SYNC_POLL_INTERVAL" envDefault:"2s" help:"Time between two walks in poll mode."`
	Exclusive        bool          `env:"SYNC_EXCLUSIVE" envDefault:"false" help:"Hold the single-writer lease PREFIX/lease.json: a second syncer on the prefix (another namespace/Pod/UID) exits 1. Off: any number of syncers share the prefix."`
	Pull             bool          `env:"SYNC_PULL" envDefault:"false" help:"Follow the change log and bring the other writers' new, changed and (with SYNC_DELETE) deleted files into SYNC_DIR: replicas converge through the store, no shared volume. Pulled files are verified, placed atomically and never uploaded again."`
	PullInterval     time.Duration `env:"SYNC_PULL_INTERVAL" envDefault:"1s" help:"Time between two looks at the change log with SYNC_PULL (one LIST of PREFIX/log/ when nothing changed)."`
	PullMaxBytes     int64         `env:"SYNC_PULL_MAX_BYTES" envDefault:"0" help:"With SYNC_PULL, stop pulling new files once the files this replica holds (its own and pulled ones, as the change log knows them) would pass this many bytes; uploading goes on (0 = no limit)."`
	Compress         string        `env:"SYNC_COMPRESS" envDefault:"off" enum:"off|zstd|gzip" help:"Store files encoded with zstd or gzip (gzip objects get Content-Encoding: gzip, zstd ones Content-Encoding: zstd). Files below 16 MiB only; already compressed types (by extension or magic bytes) and files whose first 64 KiB or whole content saves less than 10 % are stored as they are. The manifest and the object's metadata record the encoding; restore decodes."`
	PackMaxFileSize  int64         `env:"SYNC_PACK_MAX_FILE_SIZE" envDefault:"262144" help:"After each checkpoint, the compactor copies the files of 1..this many bytes that no pack holds yet into packs (PREFIX/packs/, 8 MiB objects) that restore reads with ranged GETs: a restore of many small files costs a few dozen GETs instead of one per file. Packs are a copy, never the source of truth (restore checks every file against the snapshot's sha256 and falls back to data/); packs mostly stale are rewritten. 0 = no packs. At most 16777216."`
	StateDir         string        `env:"SYNC_STATE_DIR" defaultHelp:"SYNC_DIR/.podkeeper" help:"Directory for the syncer's state (multipart journals); never uploaded."`
	HTTPAddr         string        `env:"SYNC_HTTP_ADDR" envDefault:":8081" help:"Listen address of /healthz, /readyz and /metrics (off = disabled)."`
	AllowMassDelete  bool          `env:"SYNC_ALLOW_MASS_DELETE" envDefault:"false" help:"Record deletions even when more than half of the files this syncer had are gone (otherwise they are held back as a likely unmounted or wiped volume)."`
}

// BaseConfig implements lifecycle.Configurable.
func (c *Config) BaseConfig() *config.Base { return &c.Base }

// Validate checks what tags cannot.
func (c *Config) Validate(env config.Env, errs *config.Error) {
	if c.Dir != "" && !errs.Has("SYNC_DIR") {
		if !filepath.IsAbs(c.Dir) {
			errs.Add("SYNC_DIR", env.Get("SYNC_DIR"), "must be an absolute path")
		} else if fi, err := os.Stat(c.Dir); err != nil || !fi.IsDir() {
			errs.Add("SYNC_DIR", env.Get("SYNC_DIR"), "must be an existing directory")
		} else if real, err := filepath.EvalSymlinks(c.Dir); err == nil {
			// Events name paths under the real directory; a symlinked SYNC_DIR
			// would otherwise never match them.
			c.Dir = real
		}
	}
	if !errs.Has("SYNC_EXCLUDE") {
		clean := c.Exclude[:0]
		for _, p := range c.Exclude {
			p = strings.TrimSpace(p)
			if p == "" {
				continue
			}
			if _, err := path.Match(p, ""); err != nil {
				errs.Add("SYNC_EXCLUDE", env.Get("SYNC_EXCLUDE"), "pattern %q is not a valid glob: %v", p, err)
				continue
			}
			clean = append(clean, p)
		}
		c.Exclude = clean
	}
	if !errs.Has("SYNC_SETTLE") && (c.Settle < 0 || c.Settle > 24*time.Hour) {
		errs.Add("SYNC_SETTLE", env.Get("SYNC_SETTLE"), "must be between 0 and 24h")
	}
	if !errs.Has("SYNC_CONCURRENCY") && (c.Concurrency < 1 || c.Concurrency > 1024) {
		errs.Add("SYNC_CONCURRENCY", env.Get("SYNC_CONCURRENCY"), "must be between 1 and 1024")
	}
	if !errs.Has("SYNC_MAX_CONCURRENCY") && (c.MaxConcurrency < 1 || c.MaxConcurrency > 1024) {
		errs.Add("SYNC_MAX_CONCURRENCY", env.Get("SYNC_MAX_CONCURRENCY"), "must be between 1 and 1024")
	}
	c.MaxConcurrency = max(c.MaxConcurrency, c.Concurrency)
	if !errs.Has("SYNC_MAX_FILE_SIZE") && c.MaxFileSize < 0 {
		errs.Add("SYNC_MAX_FILE_SIZE", env.Get("SYNC_MAX_FILE_SIZE"), "must be 0 (no limit) or a positive number of bytes")
	}
	if !errs.Has("SYNC_SNAPSHOT_INTERVAL") && c.SnapshotInterval != 0 && c.SnapshotInterval < 100*time.Millisecond {
		errs.Add("SYNC_SNAPSHOT_INTERVAL", env.Get("SYNC_SNAPSHOT_INTERVAL"), "must be 0 (never) or at least 100ms")
	}
	c.validateFleet(env, errs)
	if !errs.Has("SYNC_SNAPSHOT_RETAIN") && c.SnapshotRetain < 1 {
		errs.Add("SYNC_SNAPSHOT_RETAIN", env.Get("SYNC_SNAPSHOT_RETAIN"), "must be at least 1")
	}
	if !errs.Has("SYNC_SHUTDOWN_TIMEOUT") && c.ShutdownTimeout <= 0 {
		errs.Add("SYNC_SHUTDOWN_TIMEOUT", env.Get("SYNC_SHUTDOWN_TIMEOUT"), "must be a positive duration, e.g. 25s")
	}
	if c.StateDir == "" && c.Dir != "" {
		c.StateDir = filepath.Join(c.Dir, StateDirName)
	} else if c.StateDir != "" {
		if !filepath.IsAbs(c.StateDir) {
			errs.Add("SYNC_STATE_DIR", env.Get("SYNC_STATE_DIR"), "must be an absolute path")
		} else {
			c.StateDir = filepath.Clean(c.StateDir)
		}
	}
}

// validateFleet checks the many-writer settings.
func (c *Config) validateFleet(env config.Env, errs *config.Error) {
	if !errs.Has("SYNC_LOG_INTERVAL") && (c.LogInterval < 10*time.Millisecond || c.LogInterval > time.Minute) {
		errs.Add("SYNC_LOG_INTERVAL", env.Get("SYNC_LOG_INTERVAL"), "must be between 10ms and 1m")
	}
	if !errs.Has("SYNC_PULL_INTERVAL") && (c.PullInterval < 100*time.Millisecond || c.PullInterval > time.Hour) {
		errs.Add("SYNC_PULL_INTERVAL", env.Get("SYNC_PULL_INTERVAL"), "must be between 100ms and 1h")
	}
	if !errs.Has("SYNC_PULL_MAX_BYTES") && c.PullMaxBytes < 0 {
		errs.Add("SYNC_PULL_MAX_BYTES", env.Get("SYNC_PULL_MAX_BYTES"), "must be 0 (no limit) or a positive number of bytes")
	}
	if !errs.Has("SYNC_PACK_MAX_FILE_SIZE") && (c.PackMaxFileSize < 0 || c.PackMaxFileSize > pack.MaxFileSize) {
		errs.Add("SYNC_PACK_MAX_FILE_SIZE", env.Get("SYNC_PACK_MAX_FILE_SIZE"), "must be between 0 (no packs) and %d bytes", pack.MaxFileSize)
	}
	if !errs.Has("SYNC_POLL_INTERVAL") && (c.PollInterval < 100*time.Millisecond || c.PollInterval > time.Hour) {
		errs.Add("SYNC_POLL_INTERVAL", env.Get("SYNC_POLL_INTERVAL"), "must be between 100ms and 1h")
	}
}

// HTTPListen is where lifecycle starts the health server.
func (c *Config) HTTPListen() (addr, variable string) { return c.HTTPAddr, "SYNC_HTTP_ADDR" }

// DrainTimeout bounds the shutdown phase (lifecycle.Deps.Drain).
func (c *Config) DrainTimeout() time.Duration { return c.ShutdownTimeout }
