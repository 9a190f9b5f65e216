package k8s

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"
)

// registeredMetrics: every metric name the code registers, from the sources (each agent's
// health.Server names podkeeper_<agent>_<name>; the injector spells its names out).
func registeredMetrics(t *testing.T) map[string]bool {
	out := map[string]bool{}
	short := regexp.MustCompile(`(?:Name|\bc|\bg)\("([a-z_]+)"`)
	full := regexp.MustCompile(`"(podkeeper_[a-z_]+)"`)
	for _, agent := range []string{"syncer", "logshipper", "restore", "injector"} {
		files, _ := filepath.Glob(filepath.Join(root(), agent, "*.go"))
		for _, f := range files {
			if strings.HasSuffix(f, "_test.go") {
				continue
			}
			b, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			for _, m := range short.FindAllStringSubmatch(string(b), -1) {
				out["podkeeper_"+agent+"_"+m[1]] = true
			}
			for _, m := range full.FindAllStringSubmatch(string(b), -1) {
				out[m[1]] = true
			}
		}
	}
	if len(out) < 20 {
		t.Fatalf("only %d metric names found: the scan is broken", len(out))
	}
	return out
}

// kustomize/monitoring: the rules and the dashboard use only metrics the code registers, and
// promtool accepts the rules and passes rules_test.yaml.
func TestMonitoringRules(t *testing.T) {
	docs := parseDocs(t, "monitoring", render(t, filepath.Join(root(), "kustomize", "monitoring")))
	rule := find(docs, "PrometheusRule", "podkeeper")
	cm := find(docs, "ConfigMap", "podkeeper-dashboard")
	if rule == nil || cm == nil || str(cm, "metadata", "labels", "grafana_dashboard") != "1" {
		t.Fatal("kustomize/monitoring lacks the PrometheusRule or the labelled dashboard ConfigMap")
	}
	var dash obj
	if err := json.Unmarshal([]byte(str(cm, "data", "podkeeper.json")), &dash); err != nil {
		t.Fatalf("dashboard JSON: %v", err)
	}
	known := registeredMetrics(t)
	used := regexp.MustCompile(`podkeeper_[a-z_]+`)
	var exprs []string
	for _, g := range list(rule, "spec", "groups") {
		for _, r := range list(g, "rules") {
			exprs = append(exprs, str(r, "expr"))
		}
	}
	for _, p := range list(dash, "panels") {
		for _, tg := range list(p, "targets") {
			exprs = append(exprs, str(tg, "expr"))
		}
	}
	n := 0
	for _, e := range exprs {
		for _, m := range used.FindAllString(e, -1) {
			base := m
			for _, suf := range []string{"_bucket", "_sum", "_count"} {
				if strings.HasSuffix(m, suf) && known[strings.TrimSuffix(m, suf)] {
					base = strings.TrimSuffix(m, suf)
				}
			}
			if !known[base] {
				t.Errorf("%s: no such metric in the code (in %q)", m, e)
			}
			n++
		}
	}
	t.Logf("%d expressions, %d metric references, all registered by the code", len(exprs), n)

	promtool, err := exec.LookPath("promtool")
	if err != nil {
		if os.Getenv("PODKEEPER_K8S_API") == "1" {
			t.Fatal("promtool missing (check.sh installs it)")
		}
		t.Skip("promtool not installed: make k8s-check installs and runs it")
	}
	dir := t.TempDir()
	b, _ := yaml.Marshal(get(rule, "spec"))
	os.WriteFile(filepath.Join(dir, "rules.yaml"), b, 0o644)
	tb, err := os.ReadFile(filepath.Join(root(), "kustomize", "monitoring", "rules_test.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(dir, "rules_test.yaml"), tb, 0o644)
	for _, args := range [][]string{{"check", "rules", "rules.yaml"}, {"test", "rules", "rules_test.yaml"}} {
		cmd := exec.Command(promtool, args...)
		cmd.Dir = dir
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		t.Logf("promtool %s: %s", strings.Join(args, " "), strings.TrimSpace(string(out)))
	}
}
