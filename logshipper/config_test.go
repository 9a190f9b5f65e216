package logshipper_test

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/podkeeper/podkeeper/agents/config"
	"github.com/podkeeper/podkeeper/logshipper"
)

func TestConfigDefaults(t *testing.T) {
	var c logshipper.Config
	err := config.Load(&c, config.Env{"LOGSHIP_PATHS": "/var/log/app/*.log, /var/log/other.log", "LOGSHIP_STATE_DIR": t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Paths) != 2 || c.Paths[1] != "/var/log/other.log" || c.Output != "forward" || c.FluentAddr != "127.0.0.1:24224" ||
		!c.FluentAck || c.BatchRecords != 1000 || c.BatchBytes != 1<<20 || c.BufferMaxBytes != 256<<20 || c.HTTPAddr != ":8082" {
		t.Fatalf("defaults: %+v", c)
	}
}

// Every bad value is reported at once, naming the variable.
func TestConfigErrors(t *testing.T) {
	roDir := filepath.Join(t.TempDir(), "file")
	os.WriteFile(roDir, nil, 0o644) // a file, not a directory
	notPEM := filepath.Join(t.TempDir(), "ca.pem")
	os.WriteFile(notPEM, []byte("not a certificate"), 0o644)
	env := config.Env{
		"LOGSHIP_PATHS":            "relative/*.log",
		"LOGSHIP_STATE_DIR":        roDir,
		"LOGSHIP_OUTPUT":           "kafka",
		"FLUENT_ADDR":              "no-port",
		"FLUENT_TLS":               "true",
		"FLUENT_CA_FILE":           notPEM,
		"FLUENT_COMPRESS":          "zstd",
		"FLUENT_TIMEOUT":           "10",
		"LOGSHIP_START_AT":         "middle",
		"LOGSHIP_BATCH_RECORDS":    "0",
		"LOGSHIP_BUFFER_MAX_BYTES": "1000",
		"LOGSHIP_PARSE":            "xml",
		"LOGSHIP_MULTILINE_START":  "([",
		"LOGSHIP_MAX_LINE_BYTES":   "10",
		"LOGSHIP_HTTP_ADDR":        "8082",
	}
	var c logshipper.Config
	err := config.Load(&c, env)
	var ce *config.Error
	if !errors.As(err, &ce) {
		t.Fatalf("want *config.Error, got %v", err)
	}
	for name := range env {
		if name == "FLUENT_TLS" {
			continue
		}
		if !ce.Has(name) {
			t.Errorf("no error for %s=%q in:\n%v", name, env[name], err)
		}
	}
	if !strings.Contains(err.Error(), `FLUENT_ADDR="no-port"`) {
		t.Errorf("message does not quote the value: %v", err)
	}

	err = config.Load(&logshipper.Config{}, config.Env{})
	if !errors.As(err, &ce) || !ce.Has("LOGSHIP_PATHS") || !ce.Has("LOGSHIP_STATE_DIR") {
		t.Errorf("required variables not reported: %v", err)
	}
	err = config.Load(&logshipper.Config{}, config.Env{"LOGSHIP_PATHS": "/x/*.log", "LOGSHIP_STATE_DIR": t.TempDir(), "FLUENT_ADDR": "unix:///run/fluent.sock"})
	if err != nil {
		t.Errorf("unix socket address refused: %v", err)
	}
}
