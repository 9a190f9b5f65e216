// Tests every agent binary under cmd/ as a user meets it: built with the
// Makefile's flags, then --version, --help and a bad variable (exit code 2).
package cmd_test

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/podkeeper/podkeeper/test/docs"
)

func agents(t *testing.T) []string {
	mains, _ := filepath.Glob("*/main.go")
	var names []string
	for _, m := range mains {
		// The injector is no agent: a webhook configured by flags (its own test,
		// cmd/injector/main_test.go).
		if filepath.Dir(m) != "injector" {
			names = append(names, filepath.Dir(m))
		}
	}
	return names
}

func build(t *testing.T, name string) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), name)
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w -X github.com/podkeeper/podkeeper/agents/lifecycle.Version=v9.9.9-test", "-o", bin, "./"+name)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build %s: %v\n%s", name, err, out)
	}
	return bin
}

func run(bin string, env []string, args ...string) (int, string, string) {
	cmd := exec.Command(bin, args...)
	cmd.Env = env
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		code = -1
	}
	return code, out.String(), errb.String()
}

var helpVar = regexp.MustCompile(`(?m)^  ([A-Z][A-Z0-9_]+)\s`)
var readmeVar = regexp.MustCompile("(?m)^\\| `([A-Z][A-Z0-9_]+)` \\|")

func TestAgentBinaries(t *testing.T) {
	names := agents(t)
	if len(names) == 0 {
		t.Skip("no agent binaries yet")
	}
	for _, name := range names {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			bin := build(t, name)
			env := []string{"PATH=" + os.Getenv("PATH"), "HOME=" + t.TempDir()}

			code, out, _ := run(bin, env, "--version")
			if code != 0 || strings.TrimSpace(out) != name+" v9.9.9-test" {
				t.Errorf("--version: exit %d, %q", code, out)
			}

			code, out, _ = run(bin, env, "--help")
			if code != 0 {
				t.Fatalf("--help exit %d", code)
			}
			var helpVars []string
			for _, m := range helpVar.FindAllStringSubmatch(out, -1) {
				if m[1] != "VARIABLE" { // the table's header
					helpVars = append(helpVars, m[1])
				}
			}
			for _, shared := range []string{"LOG_LEVEL", "LOG_FORMAT", "POD_NAME", "POD_NAMESPACE"} {
				if !slices.Contains(helpVars, shared) {
					t.Errorf("--help lacks %s", shared)
				}
			}
			// The table in docs/NAME.md (kept equal to the config struct by the docs
			// test) and --help list the same variables.
			readme, err := os.ReadFile(docs.File(name))
			if err != nil {
				t.Fatal(err)
			}
			section, err := docs.Section(string(readme), name)
			if err != nil {
				t.Fatal(err)
			}
			var docVars []string
			for _, m := range readmeVar.FindAllStringSubmatch(section, -1) {
				docVars = append(docVars, m[1])
			}
			if !slices.Equal(helpVars, docVars) {
				t.Errorf("--help lists %v\ndocs/%s.md lists %v", helpVars, name, docVars)
			}

			// One bad variable: exit 2 and a message naming it and its value.
			bad := append(slices.Clone(env), "LOG_LEVEL=loudest")
			code, _, stderr := run(bin, bad)
			if code != 2 || !strings.Contains(stderr, "LOG_LEVEL") || !strings.Contains(stderr, "loudest") {
				t.Errorf("LOG_LEVEL=loudest: exit %d, stderr %q", code, stderr)
			}
		})
	}
}
