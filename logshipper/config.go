// Package logshipper tails the application's log files and forwards every line
// at-least-once over the Fluent forward protocol (Fluentd, Fluent Bit, the
// OpenTelemetry Collector's fluent_forward receiver), batched with one ack per
// batch, surviving rotation, restarts and receiver outages.
package logshipper

import (
	"crypto/x509"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/podkeeper/podkeeper/agents/config"
)

// Config is the logshipper's configuration (see docs/logshipper.md).
type Config struct {
	Base config.Base

	Paths           []string      `env:"LOGSHIP_PATHS,required" help:"Comma-separated globs of the log files to tail, e.g. /var/log/app/*.log."`
	Output          string        `env:"LOGSHIP_OUTPUT" envDefault:"forward" enum:"forward|stdout" help:"forward = Fluent forward protocol to FLUENT_ADDR; stdout = JSON lines on stdout (local use)."`
	FluentAddr      string        `env:"FLUENT_ADDR" envDefault:"127.0.0.1:24224" help:"Forward receiver: HOST:PORT or unix:///path/to/socket."`
	FluentTag       string        `env:"FLUENT_TAG" envDefault:"podkeeper.logs" help:"Tag of every record."`
	FluentAck       bool          `env:"FLUENT_ACK" envDefault:"true" help:"Ask the receiver to ack each batch; checkpoints advance only on the ack (false = on a successful write, weaker)."`
	FluentTLS       bool          `env:"FLUENT_TLS" envDefault:"false" help:"Connect to the receiver over TLS."`
	FluentCAFile    string        `env:"FLUENT_CA_FILE" help:"PEM file with the CA certificates trusted for the receiver (FLUENT_TLS=true); empty = system roots."`
	FluentCompress  string        `env:"FLUENT_COMPRESS" envDefault:"none" enum:"none|gzip" help:"gzip = CompressedPackedForward."`
	FluentTimeout   time.Duration `env:"FLUENT_TIMEOUT" envDefault:"10s" help:"How long to wait for a connection, a write or a batch's ack before resending it."`
	StateDir        string        `env:"LOGSHIP_STATE_DIR,required" help:"Writable directory for checkpoints and the on-disk buffer (an emptyDir shared across restarts of the container)."`
	StartAt         string        `env:"LOGSHIP_START_AT" envDefault:"beginning" enum:"beginning|end" help:"Where to start in a file found at start-up without a checkpoint."`
	BatchRecords    int           `env:"LOGSHIP_BATCH_RECORDS" envDefault:"1000" help:"Most records in one batch (one ack)."`
	BatchBytes      int           `env:"LOGSHIP_BATCH_BYTES" envDefault:"1048576" help:"Most bytes of lines in one batch."`
	BatchWait       time.Duration `env:"LOGSHIP_BATCH_WAIT" envDefault:"200ms" help:"Longest a line waits for its batch to fill before the batch is sent."`
	BufferMaxBytes  int64         `env:"LOGSHIP_BUFFER_MAX_BYTES" envDefault:"268435456" help:"Most bytes of unacknowledged batches kept in LOGSHIP_STATE_DIR; beyond it reading pauses (backpressure)."`
	Parse           string        `env:"LOGSHIP_PARSE" envDefault:"none" enum:"none|json" help:"json = merge a line that is a JSON object into the record (other lines stay in log)."`
	MultilineStart  string        `env:"LOGSHIP_MULTILINE_START" help:"Regular expression matching the first line of a multi-line record; other lines join the record before them. Empty = off."`
	MaxLineBytes    int           `env:"LOGSHIP_MAX_LINE_BYTES" envDefault:"1048576" help:"Longer lines are split into records flagged partial_message."`
	ShutdownTimeout time.Duration `env:"LOGSHIP_SHUTDOWN_TIMEOUT" envDefault:"20s" help:"On SIGTERM: time to read every file to its end and deliver it."`
	HTTPAddr        string        `env:"LOGSHIP_HTTP_ADDR" envDefault:":8082" help:"Listen address of /healthz, /readyz and /metrics (off = disabled)."`

	// Filled by Validate.
	multiline *regexp.Regexp
	caPool    *x509.CertPool
}

func (c *Config) BaseConfig() *config.Base { return &c.Base }

func (c *Config) Validate(env config.Env, errs *config.Error) {
	if !errs.Has("LOGSHIP_PATHS") {
		c.validatePaths(env, errs)
	}
	if c.Output != "stdout" && !errs.Has("FLUENT_ADDR") {
		if err := checkAddr(c.FluentAddr); err != nil {
			errs.Add("FLUENT_ADDR", c.FluentAddr, "%v", err)
		}
	}
	if c.FluentTag == "" {
		errs.Add("FLUENT_TAG", "", "must not be empty")
	}
	if c.FluentCAFile != "" {
		c.validateCA(errs)
	}
	if !errs.Has("FLUENT_TIMEOUT") && c.FluentTimeout <= 0 {
		errs.Add("FLUENT_TIMEOUT", env.Get("FLUENT_TIMEOUT"), "must be positive, e.g. 10s")
	}
	if !errs.Has("LOGSHIP_STATE_DIR") && c.StateDir != "" {
		if err := checkWritableDir(c.StateDir); err != nil {
			errs.Add("LOGSHIP_STATE_DIR", c.StateDir, "must be a writable directory: %v", err)
		}
	}
	positive := func(name string, v int64, min int64) {
		if !errs.Has(name) && v < min {
			errs.Add(name, env.Get(name), "must be at least %d", min)
		}
	}
	positive("LOGSHIP_BATCH_RECORDS", int64(c.BatchRecords), 1)
	positive("LOGSHIP_BATCH_BYTES", int64(c.BatchBytes), 1024)
	positive("LOGSHIP_MAX_LINE_BYTES", int64(c.MaxLineBytes), 64)
	if !errs.Has("LOGSHIP_BUFFER_MAX_BYTES") && !errs.Has("LOGSHIP_BATCH_BYTES") && c.BufferMaxBytes < 2*int64(c.BatchBytes) {
		// One batch must always fit, or reading would stop for good.
		errs.Add("LOGSHIP_BUFFER_MAX_BYTES", env.Get("LOGSHIP_BUFFER_MAX_BYTES"), "must be at least twice LOGSHIP_BATCH_BYTES (%d)", c.BatchBytes)
	}
	if !errs.Has("LOGSHIP_BATCH_WAIT") && c.BatchWait <= 0 {
		errs.Add("LOGSHIP_BATCH_WAIT", env.Get("LOGSHIP_BATCH_WAIT"), "must be positive, e.g. 200ms")
	}
	if !errs.Has("LOGSHIP_SHUTDOWN_TIMEOUT") && c.ShutdownTimeout <= 0 {
		errs.Add("LOGSHIP_SHUTDOWN_TIMEOUT", env.Get("LOGSHIP_SHUTDOWN_TIMEOUT"), "must be positive, e.g. 20s")
	}
	if c.MultilineStart != "" {
		re, err := regexp.Compile(c.MultilineStart)
		if err != nil {
			errs.Add("LOGSHIP_MULTILINE_START", c.MultilineStart, "is not a valid regular expression: %v", err)
		}
		c.multiline = re
	}
	if c.HTTPAddr != "off" && c.HTTPAddr != "" {
		if _, _, err := net.SplitHostPort(c.HTTPAddr); err != nil {
			errs.Add("LOGSHIP_HTTP_ADDR", c.HTTPAddr, "must be HOST:PORT, :PORT or off")
		}
	}
}

// validatePaths keeps the clean absolute globs of LOGSHIP_PATHS.
func (c *Config) validatePaths(env config.Env, errs *config.Error) {
	var clean []string
	for _, p := range c.Paths {
		p = strings.TrimSpace(p)
		if p == "" {
			continue
		}
		if !filepath.IsAbs(p) {
			errs.Add("LOGSHIP_PATHS", env.Get("LOGSHIP_PATHS"), "glob %q must be an absolute path", p)
			continue
		}
		if _, err := filepath.Match(p, ""); err != nil {
			errs.Add("LOGSHIP_PATHS", env.Get("LOGSHIP_PATHS"), "glob %q is malformed: %v", p, err)
			continue
		}
		clean = append(clean, filepath.Clean(p))
	}
	if len(clean) == 0 && !errs.Has("LOGSHIP_PATHS") {
		errs.Add("LOGSHIP_PATHS", env.Get("LOGSHIP_PATHS"), "needs at least one absolute glob, e.g. /var/log/app/*.log")
	}
	c.Paths = clean
}

// validateCA loads FLUENT_CA_FILE into the pool the forwarder trusts.
func (c *Config) validateCA(errs *config.Error) {
	pem, err := os.ReadFile(c.FluentCAFile)
	pool := x509.NewCertPool()
	switch {
	case err != nil:
		errs.Add("FLUENT_CA_FILE", c.FluentCAFile, "cannot be read: %v", err)
	case !pool.AppendCertsFromPEM(pem):
		errs.Add("FLUENT_CA_FILE", c.FluentCAFile, "holds no PEM certificate")
	case !c.FluentTLS:
		errs.Add("FLUENT_CA_FILE", c.FluentCAFile, "is only used with FLUENT_TLS=true")
	default:
		c.caPool = pool
	}
}

func checkAddr(a string) error {
	if p, ok := strings.CutPrefix(a, "unix://"); ok {
		if !filepath.IsAbs(p) {
			return fmt.Errorf("unix socket path must be absolute: unix:///path/to/socket")
		}
		return nil
	}
	host, port, err := net.SplitHostPort(a)
	if err != nil || host == "" || port == "" {
		return fmt.Errorf("must be HOST:PORT (e.g. fluentd:24224) or unix:///path")
	}
	return nil
}

func checkWritableDir(dir string) error {
	if !filepath.IsAbs(dir) {
		return fmt.Errorf("not an absolute path")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	f, err := os.CreateTemp(dir, ".probe-*")
	if err != nil {
		return err
	}
	name := f.Name()
	f.Close()
	return os.Remove(name)
}

// HTTPListen is where lifecycle starts the health server.
func (c *Config) HTTPListen() (addr, variable string) { return c.HTTPAddr, "LOGSHIP_HTTP_ADDR" }

// DrainTimeout bounds the shutdown phase (lifecycle.Deps.Drain).
func (c *Config) DrainTimeout() time.Duration { return c.ShutdownTimeout }
