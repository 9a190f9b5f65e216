package lifecycle

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/podkeeper/podkeeper/agents/config"
)

type cfg struct {
	Base config.Base
	Dir  string `env:"X_DIR,required" help:"A directory."`
}

func (c *cfg) BaseConfig() *config.Base { return &c.Base }

func agent(run func(context.Context, *cfg, Deps) error) Agent[*cfg] {
	return Agent[*cfg]{Name: "x", Summary: "test agent", Run: run}
}

func TestMainExitCodes(t *testing.T) {
	ok := func(context.Context, *cfg, Deps) error { return nil }
	cases := []struct {
		name  string
		args  []string
		env   []string
		run   func(context.Context, *cfg, Deps) error
		code  int
		inOut string
		inErr string
	}{
		{"help", []string{"--help"}, nil, ok, 0, "X_DIR", ""},
		{"version", []string{"--version"}, nil, ok, 0, "x dev", ""},
		{"missing required", nil, nil, ok, 2, "", "X_DIR"},
		{"bad level", nil, []string{"X_DIR=/d", "LOG_LEVEL=chatty"}, ok, 2, "", `LOG_LEVEL="chatty"`},
		{"ok", nil, []string{"X_DIR=/d"}, ok, 0, "", `"msg":"stopped"`},
		{"runtime failure", nil, []string{"X_DIR=/d"}, func(context.Context, *cfg, Deps) error { return errors.New("disk on fire") }, 1, "", "disk on fire"},
		{"config error found at run time", nil, []string{"X_DIR=/d"}, func(context.Context, *cfg, Deps) error {
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

// served is an agent configuration with a health address and a drain bound.
type served struct {
	Base config.Base
	Addr string        `env:"X_HTTP_ADDR" help:"Health address."`
	Stop time.Duration `env:"X_STOP" envDefault:"3s" help:"Drain bound."`
}

func (c *served) BaseConfig() *config.Base            { return &c.Base }
func (c *served) HTTPListen() (addr, variable string) { return c.Addr, "X_HTTP_ADDR" }
func (c *served) DrainTimeout() time.Duration         { return c.Stop }

func TestMainBuildsDeps(t *testing.T) {
	var got Deps
	var status int
	a := Agent[*served]{Name: "x", Run: func(ctx context.Context, c *served, d Deps) error {
		got = d
		resp, err := http.Get("http://" + d.Health.Addr() + "/healthz")
		if err != nil {
			return err
		}
		resp.Body.Close()
		status = resp.StatusCode
		dctx, cancel := d.Drain(ctx)
		defer cancel()
		if dl, ok := dctx.Deadline(); !ok || time.Until(dl) > 3*time.Second || time.Until(dl) < time.Second {
			return fmt.Errorf("drain deadline %v %v, want about 3s", dl, ok)
		}
		return nil
	}}
	var out, errb bytes.Buffer
	env := []string{"X_HTTP_ADDR=127.0.0.1:0", "KUBE_EVENTS=false"}
	if code := a.Main(&served{}, nil, env, &out, &errb); code != 0 {
		t.Fatalf("exit %d: %s", code, errb.String())
	}
	if got.Log == nil || got.Events == nil || got.Health == nil || status != http.StatusOK {
		t.Fatalf("deps %+v, /healthz %d", got, status)
	}

	// A busy address is the variable's fault: exit 2 naming it.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	errb.Reset()
	env = []string{"X_HTTP_ADDR=" + ln.Addr().String(), "KUBE_EVENTS=false"}
	if code := a.Main(&served{}, nil, env, &out, &errb); code != 2 || !strings.Contains(errb.String(), "X_HTTP_ADDR") {
		t.Fatalf("exit %d, want 2 naming X_HTTP_ADDR: %s", code, errb.String())
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
