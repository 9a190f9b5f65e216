// Package lifecycle is the common main of every agent: --help/--version,
// configuration errors as exit code 2, slog from LOG_LEVEL/LOG_FORMAT, and a
// context cancelled on SIGTERM/SIGINT.
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

// Agent describes one binary.
type Agent[C Configurable] struct {
	Name    string
	Summary string
	// Run does the agent's work. ctx is cancelled on SIGTERM/SIGINT; the agent then
	// drains within its own shutdown timeout. Returning an error wrapping
	// *config.Error exits 2, any other error 1.
	Run func(ctx context.Context, cfg C, log *slog.Logger) error
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
	log.Info("starting", "version", Version)
	err := a.Run(ctx, cfg, log)
	return ExitCode(log, err)
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
