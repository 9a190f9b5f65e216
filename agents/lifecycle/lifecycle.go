// Package lifecycle is the common main of every agent: --help/--version,
// configuration errors as exit code 2, slog from LOG_LEVEL/LOG_FORMAT, a
// context cancelled on SIGTERM/SIGINT, and the one Deps value every agent's
// New(cfg, deps) receives.
package lifecycle

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/podkeeper/podkeeper/agents/config"
	"github.com/podkeeper/podkeeper/agents/events"
	"github.com/podkeeper/podkeeper/agents/health"
	"github.com/podkeeper/podkeeper/agents/kube"
	"github.com/podkeeper/podkeeper/agents/memlimit"
	"github.com/podkeeper/podkeeper/agents/store"
)

// Version is stamped at build time: -ldflags "-X github.com/podkeeper/podkeeper/agents/lifecycle.Version=v1.2.3".
var Version = "dev"

// Exit codes shared by every agent.
const (
	ExitOK      = 0
	ExitFailure = 1
	ExitConfig  = 2
)

// Configurable is an agent's configuration struct.
type Configurable interface {
	BaseConfig() *config.Base
}

// HTTPServing is implemented by configurations with a probe/metrics address:
// Main starts Deps.Health on addr, and a failure to listen is a configuration
// error naming variable (SYNC_HTTP_ADDR, ...).
type HTTPServing interface {
	HTTPListen() (addr, variable string)
}

// Draining is implemented by configurations with a shutdown timeout: it becomes
// Deps.DrainTimeout.
type Draining interface {
	DrainTimeout() time.Duration
}

// Deps is everything an agent takes from its surroundings, built once by Main
// (or by a test) and passed to the agent's New(cfg, deps). Agents never build
// their own logger, recorder, health server or store: one place decides, and
// tests substitute real ones pointed elsewhere instead of hooks.
type Deps struct {
	Log *slog.Logger
	// Events reaches the Pod's Events through agents/kube (which aggregates and
	// rate-limits), or only the log outside a cluster.
	Events events.Recorder
	// Health carries the agent's metrics, readiness and liveness. Main starts it
	// when the configuration is HTTPServing; tests start it where they like.
	Health *health.Server
	// Store is the object store of STORE_URL, opened by the main of the agents
	// that have one (nil for the logshipper).
	Store store.Store
	// Labels returns the Pod's labels (nil outside a cluster).
	Labels func() map[string]string
	// DrainTimeout bounds the shutdown phase after the run context ends (0 = no
	// bound, for agents without one).
	DrainTimeout time.Duration
}

// Drain returns the context of the shutdown phase: not cancelled by the
// signal that ended ctx, but bounded by DrainTimeout.
func (d Deps) Drain(ctx context.Context) (context.Context, context.CancelFunc) {
	if d.DrainTimeout <= 0 {
		return context.WithCancel(context.WithoutCancel(ctx))
	}
	return DrainContext(ctx, d.DrainTimeout)
}

// Agent describes one binary.
type Agent[C Configurable] struct {
	Name    string
	Summary string
	// Component names the agent in Kubernetes Events (default: Name).
	Component string
	// Run does the agent's work, typically New(cfg, deps) then Run(ctx). ctx is
	// cancelled on SIGTERM/SIGINT; the agent then drains within deps.Drain.
	// Returning an error wrapping *config.Error exits 2, any other error 1.
	Run func(ctx context.Context, cfg C, deps Deps) error
}

// Main runs the agent with the process's arguments and environment and returns
// the exit code.
func (a Agent[C]) Main(cfg C, args []string, environ []string, stdout, stderr io.Writer) int {
	for _, arg := range args {
		switch arg {
		case "-h", "--help", "-help", "help":
			config.Help(stdout, a.Name, a.Summary, cfg)
			return ExitOK
		case "-v", "--version", "-version", "version":
			fmt.Fprintf(stdout, "%s %s\n", a.Name, Version)
			return ExitOK
		}
	}
	if err := config.Load(cfg, EnvMap(environ)); err != nil {
		fmt.Fprintf(stderr, "%s: %v\n", a.Name, err)
		if errors.As(err, new(*config.Error)) {
			return ExitConfig
		}
		return ExitFailure
	}
	log := NewLogger(cfg.BaseConfig(), stderr).With("agent", a.Name)
	// Libraries that print with the standard log package (the S3 transfer manager
	// does) then reach the same structured log instead of raw stderr lines.
	slog.SetDefault(log)
	ctx, stop := SignalContext(context.Background(), log)
	defer stop()
	// A soft limit below the container's hard one: the GC works harder near
	// it instead of garbage taking the container over its limit.
	log.Info("starting", "version", Version, "gomemlimit", memlimit.Apply())
	err := a.run(ctx, cfg, log)
	return ExitCode(log, err)
}

// run builds the Deps, runs the agent and flushes the Events it left.
func (a Agent[C]) run(ctx context.Context, cfg C, log *slog.Logger) error {
	component := a.Component
	if component == "" {
		component = a.Name
	}
	ev, err := kube.New(ctx, cfg.BaseConfig(), log, kube.Options{Component: component})
	if err != nil {
		return err
	}
	// The last Events (Restored, Drained, ...) must reach the API before exit.
	defer ev.CloseWithin(5 * time.Second)
	deps := Deps{Log: log, Events: ev, Health: health.New(component), Labels: ev.Labels}
	if d, ok := any(cfg).(Draining); ok {
		deps.DrainTimeout = d.DrainTimeout()
	}
	if h, ok := any(cfg).(HTTPServing); ok {
		addr, variable := h.HTTPListen()
		if err := deps.Health.Start(addr, log); err != nil {
			return &config.Error{Errors: []config.FieldError{{Var: variable, Value: addr, Problem: err.Error()}}}
		}
		defer deps.Health.Close()
	}
	return a.Run(ctx, cfg, deps)
}

// ExitCode logs err and maps it to an exit code.
func ExitCode(log *slog.Logger, err error) int {
	switch {
	case err == nil:
		log.Info("stopped")
		return ExitOK
	case errors.As(err, new(*config.Error)):
		log.Error("configuration error", "err", err)
		return ExitConfig
	default:
		log.Error("failed", "err", err)
		return ExitFailure
	}
}

// EnvMap turns os.Environ()-style pairs into a map.
func EnvMap(environ []string) config.Env {
	m := make(config.Env, len(environ))
	for _, kv := range environ {
		for i := 0; i < len(kv); i++ {
			if kv[i] == '=' {
				m[kv[:i]] = kv[i+1:]
				break
			}
		}
	}
	return m
}

// NewLogger builds the agent's slog logger from LOG_LEVEL and LOG_FORMAT.
func NewLogger(b *config.Base, w io.Writer) *slog.Logger {
	var level slog.Level
	_ = level.UnmarshalText([]byte(b.LogLevel)) // validated by config; "" means info
	opts := &slog.HandlerOptions{Level: level}
	if b.LogFormat == "text" {
		return slog.New(slog.NewTextHandler(w, opts))
	}
	return slog.New(slog.NewJSONHandler(w, opts))
}

// SignalContext returns a context cancelled on the first SIGTERM or SIGINT. A
// second signal exits at once with code 1: an operator pressing Ctrl-C twice
// means it, and the kubelet's SIGKILL would follow anyway.
func SignalContext(parent context.Context, log *slog.Logger) (context.Context, func()) {
	ctx, cancel := context.WithCancel(parent)
	ch := make(chan os.Signal, 2)
	signal.Notify(ch, syscall.SIGTERM, syscall.SIGINT)
	done := make(chan struct{})
	go func() {
		select {
		case s := <-ch:
			log.Info("signal received, shutting down", "signal", s.String())
			cancel()
		case <-done:
			return
		}
		select {
		case s := <-ch:
			log.Error("second signal, exiting now", "signal", s.String())
			os.Exit(ExitFailure)
		case <-done:
		}
	}()
	return ctx, func() {
		signal.Stop(ch)
		close(done)
		cancel()
	}
}

// DrainContext returns a context for the shutdown phase: not cancelled by the
// signal that ended ctx, but bounded by timeout.
func DrainContext(ctx context.Context, timeout time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(ctx), timeout)
}
