package lifecycle

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"testing"

	"github.com/podkeeper/podkeeper/agents/config"
)

type cfg struct {
	Base config.Base
	Dir  string `env:"X_DIR,required" help:"A directory."`
}

func (c *cfg) BaseConfig() *config.Base { return &c.Base }

func agent(run func(context.Context, *cfg, *slog.Logger) error) Agent[*cfg] {
	return Agent[*cfg]{Name: "x", Summary: "test agent", Run: run}
}

func TestMainExitCodes(t *testing.T) {
	ok := func(context.Context, *cfg, *slog.Logger) error { return nil }
	cases := []struct {
		name  string
		args  []string
		env   []string
		run   func(context.Context, *cfg, *slog.Logger) error
		code  int
		inOut string
		inErr string
	}{
		{"help", []string{"--help"}, nil, ok, 0, "X_DIR", ""},
		{"version", []string{"--version"}, nil, ok, 0, "x dev", ""},
		{"missing required", nil, nil, ok, 2, "", "X_DIR"},
		{"bad level", nil, []string{"X_DIR=/d", "LOG_LEVEL=chatty"}, ok, 2, "", `LOG_LEVEL="chatty"`},
		{"ok", nil, []string{"X_DIR=/d"}, ok, 0, "", `"msg":"stopped"`},
		{"runtime failure", nil, []string{"X_DIR=/d"}, func(context.Context, *cfg, *slog.Logger) error { return errors.New("disk on fire") }, 1, "", "disk on fire"},
		{"config error found at run time", nil, []string{"X_DIR=/d"}, func(context.Context, *cfg, *slog.Logger) error {
			e := &config.Error{}
			e.Add("X_DIR", "/d", "is not writable")
			return fmt.Errorf("state: %w", e)
		}, 2, "", "is not writable"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var out, errb bytes.Buffer
			code := agent(c.run).Main(&cfg{}, c.args, c.env, &out, &errb)
			if code != c.code || !strings.Contains(out.String(), c.inOut) || !strings.Contains(errb.String(), c.inErr) {
				t.Fatalf("exit %d (want %d)\nstdout: %s\nstderr: %s", code, c.code, out.String(), errb.String())
			}
		})
	}
}

func TestLoggerFormat(t *testing.T) {
	var buf bytes.Buffer
	NewLogger(&config.Base{LogLevel: "warn", LogFormat: "text"}, &buf).Info("hidden")
	NewLogger(&config.Base{LogLevel: "warn", LogFormat: "text"}, &buf).Warn("shown")
	if s := buf.String(); strings.Contains(s, "hidden") || !strings.Contains(s, "level=WARN msg=shown") {
		t.Fatalf("log: %q", s)
	}
}
