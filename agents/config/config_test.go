package config

import (
	"bytes"
	"errors"
	"strings"
	"testing"
	"time"
)

type testConfig struct {
	Base  Base
	Store Store
	Dir   string        `env:"T_DIR,required" help:"A directory."`
	Conc  int           `env:"T_CONCURRENCY" envDefault:"16" help:"Parallel transfers."`
	Wait  time.Duration `env:"T_WAIT" envDefault:"1s" help:"How long to wait."`
	On    bool          `env:"T_ON" envDefault:"true" help:"A switch."`
	Mode  string        `env:"T_MODE" envDefault:"merge" enum:"merge|mirror" help:"How to restore."`
}

func (c *testConfig) Validate(env Env, errs *Error) {
	if c.Conc < 1 && !errs.Has("T_CONCURRENCY") {
		errs.Add("T_CONCURRENCY", env.Get("T_CONCURRENCY"), "must be at least 1")
	}
}

func load(t *testing.T, env Env) (*testConfig, *Error) {
	t.Helper()
	var c testConfig
	err := Load(&c, env)
	if err == nil {
		return &c, nil
	}
	var ce *Error
	if !errors.As(err, &ce) {
		t.Fatalf("Load returned %T %v, want *config.Error", err, err)
	}
	return &c, ce
}

func TestDefaultsAndParsing(t *testing.T) {
	c, errs := load(t, Env{"T_DIR": "/data", "STORE_URL": "s3://my-bucket/team/app/", "S3_ENDPOINT": "http://minio:9000"})
	if errs != nil {
		t.Fatal(errs)
	}
	if c.Conc != 16 || c.Wait != time.Second || !c.On || c.Mode != "merge" || c.Base.LogLevel != "info" || c.Store.S3Region != "us-east-1" {
		t.Fatalf("defaults not applied: %+v", c)
	}
	if c.Store.Bucket != "my-bucket" || c.Store.Prefix != "team/app" || c.Store.Scheme != "s3" {
		t.Fatalf("store url parsed as %+v", c.Store)
	}
	if !c.Store.PathStyle() {
		t.Fatal("S3_PATH_STYLE defaults to true with an endpoint")
	}
	c, _ = load(t, Env{"T_DIR": "/data", "STORE_URL": "s3://my-bucket"})
	if c.Store.PathStyle() || c.Store.Prefix != "" {
		t.Fatalf("AWS default: path style %v prefix %q", c.Store.PathStyle(), c.Store.Prefix)
	}
	c, _ = load(t, Env{"T_DIR": "/data", "STORE_URL": "s3://my-bucket", "S3_ENDPOINT": "http://x:1", "S3_PATH_STYLE": "false"})
	if c.Store.PathStyle() {
		t.Fatal("explicit S3_PATH_STYLE=false ignored")
	}
	c, _ = load(t, Env{"T_DIR": "/data", "STORE_URL": "file:///var/lib/pk/"})
	if c.Store.Path != "/var/lib/pk" || c.Store.Scheme != "file" {
		t.Fatalf("file url: %+v", c.Store)
	}
}

// TestOneBadVariableIsNamed: each bad value alone yields exactly one error that
// names the variable and the value.
func TestOneBadVariableIsNamed(t *testing.T) {
	good := Env{"T_DIR": "/data", "STORE_URL": "s3://bucket/p"}
	cases := map[string]string{
		"T_CONCURRENCY":     "many",
		"T_WAIT":            "5 minutes",
		"T_ON":              "perhaps",
		"T_MODE":            "sideways",
		"LOG_LEVEL":         "loud",
		"LOG_FORMAT":        "xml",
		"STORE_URL":         "ftp://host/x",
		"S3_ENDPOINT":       "minio:9000",
		"S3_PATH_STYLE":     "yes please",
		"S3_CA_FILE":        "/nonexistent/ca.pem",
		"S3_SSE":            "rot13",
		"S3_SSE_KMS_KEY_ID": "key-1",
	}
	for name, value := range cases {
		t.Run(name, func(t *testing.T) {
			env := Env{}
			for k, v := range good {
				env[k] = v
			}
			env[name] = value
			_, errs := load(t, env)
			if errs == nil || len(errs.Errors) != 1 {
				t.Fatalf("want exactly one error, got %v", errs)
			}
			fe := errs.Errors[0]
			if fe.Var != name || fe.Value != value || !strings.Contains(errs.Error(), name) || !strings.Contains(errs.Error(), value) {
				t.Fatalf("error does not name %s=%q: %v", name, value, errs)
			}
		})
	}
	_, errs := load(t, Env{"T_DIR": "/data", "STORE_URL": "s3://bucket", "T_CONCURRENCY": "0"})
	if errs == nil || errs.Errors[0].Var != "T_CONCURRENCY" || !strings.Contains(errs.Error(), "at least 1") {
		t.Fatalf("agent rule: %v", errs)
	}
}

func TestEveryProblemReportedAtOnce(t *testing.T) {
	_, errs := load(t, Env{"T_CONCURRENCY": "x", "LOG_LEVEL": "loud", "STORE_URL": "s3://UPPER/x", "T_MODE": "?"})
	if errs == nil {
		t.Fatal("accepted")
	}
	var names []string
	for _, fe := range errs.Errors {
		names = append(names, fe.Var)
	}
	for _, want := range []string{"T_DIR", "T_CONCURRENCY", "LOG_LEVEL", "STORE_URL", "T_MODE"} {
		if !strings.Contains(strings.Join(names, ","), want) {
			t.Errorf("missing an error for %s (got %v)", want, names)
		}
	}
}

func TestStoreURLs(t *testing.T) {
	for _, bad := range []string{"s3://", "s3://ab", "s3://Bucket/x", "s3://b..x/y", "s3://bucket/a//b", "s3://bucket/../x", "s3://u:p@bucket/x",
		"file://relative/x", "file:///", "file://host/x", "/plain/path", "bucket/prefix"} {
		_, errs := load(t, Env{"T_DIR": "/d", "STORE_URL": bad})
		if errs == nil || !errs.Has("STORE_URL") {
			t.Errorf("STORE_URL=%q accepted", bad)
		}
	}
}

// A refused STORE_URL names the variable but never prints a credential it
// carries, also when the value does not even parse.
func TestStoreURLSecretNotPrinted(t *testing.T) {
	for _, bad := range []string{"s3://AKIDEXAMPLE:s3cr3tKEY@bucket/p", "s3://AKIDEXAMPLE:s3cr3tKEY@bucket/%zz",
		"s3://AKIDEXAMPLE:s3cr3t/KEY@bucket/p", "file://AKIDEXAMPLE:s3cr3tKEY@host/x"} {
		_, errs := load(t, Env{"T_DIR": "/d", "STORE_URL": bad})
		if errs == nil || !errs.Has("STORE_URL") {
			t.Fatalf("STORE_URL=%q accepted", bad)
		}
		if msg := errs.Error(); strings.Contains(msg, "s3cr3t") || strings.Contains(msg, "AKIDEXAMPLE") {
			t.Errorf("STORE_URL=%q: the error prints the credential: %s", bad, msg)
		}
	}
}

func TestHelpListsEveryVariable(t *testing.T) {
	var buf bytes.Buffer
	Help(&buf, "tester", "a test agent", &testConfig{})
	out := buf.String()
	vars := Vars(&testConfig{})
	if len(vars) != 19 {
		t.Fatalf("Vars found %d variables, want 19", len(vars))
	}
	for _, v := range vars {
		if !strings.Contains(out, v.Name) {
			t.Errorf("--help lacks %s", v.Name)
		}
		if v.Help == "" {
			t.Errorf("%s has no help text", v.Name)
		}
	}
	for _, want := range []string{"T_DIR", "(required)", "merge", "One of: merge, mirror", "true if S3_ENDPOINT is set", "Exit codes"} {
		if !strings.Contains(out, want) {
			t.Errorf("--help lacks %q:\n%s", want, out)
		}
	}
	md := Markdown(&testConfig{})
	if !strings.Contains(md, "| `T_CONCURRENCY` | `16` | Parallel transfers. |") {
		t.Errorf("markdown row:\n%s", md)
	}
}

// Whatever variable carries a credential in a URL or HOST:PORT, its refusal
// prints neither the key nor the secret, in the value or in the problem.
func TestCredentialsNotPrintedInAnyRefusal(t *testing.T) {
	for name, bad := range map[string]string{
		"S3_ENDPOINT": "http://AKIDEXAMPLE:s3cr3tKEY@minio:9000",
		"STORE_URL":   "s3://AKIDEXAMPLE:s3cr3t%2FKEY@bucket/p",
	} {
		_, errs := load(t, Env{"T_DIR": "/d", "STORE_URL": "s3://bucket/p", name: bad})
		if errs == nil || !errs.Has(name) {
			t.Fatalf("%s=%q accepted", name, bad)
		}
		if msg := errs.Error(); strings.Contains(msg, "s3cr3t") || strings.Contains(msg, "AKIDEXAMPLE") {
			t.Errorf("%s=%q: the error prints the credential: %s", name, bad, msg)
		}
	}
	var errs Error
	errs.Add("FLUENT_ADDR", "AKIDEXAMPLE:s3cr3t@host:24224", "%q is not HOST:PORT", "AKIDEXAMPLE:s3cr3t@host:24224")
	if msg := errs.Error(); strings.Contains(msg, "s3cr3t") || strings.Contains(msg, "AKIDEXAMPLE") || !strings.Contains(msg, "xxxxx@host:24224") {
		t.Errorf("a scheme-less value: %s", msg)
	}
	for v, want := range map[string]string{"/var/log/a@b/*.log": "/var/log/a@b/*.log", "user@host": "user@host",
		"tcp://k:s@h:1": "tcp://xxxxx@h:1", "s3://k:s/x@b/p": "s3://xxxxx@b/p"} {
		if got := RedactURL(v); got != want {
			t.Errorf("RedactURL(%q) = %q, want %q", v, got, want)
		}
	}
}
