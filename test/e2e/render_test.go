//go:build e2e

package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/podkeeper/podkeeper/test/peers"
)

// overlayDir is test/e2e/overlay/NAME (this package's directory is test/e2e).
func overlayDir(t *testing.T, name string) string {
	t.Helper()
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Join(wd, "overlay", name)
}

// applyOverlay renders test/e2e/overlay/NAME into the test's namespace with this run's values
// (the loopback ports of the S3 server and the log receiver change every run) and applies it.
// The values go where a user would put them: the agents' ConfigMap and the S3 Secret. extra
// is appended to the generated kustomization's patches (YAML list items).
func (n *ns) applyOverlay(name string, cm, secret map[string]string, extra string) string {
	n.t.Helper()
	out := n.renderOverlay(name, cm, secret, extra)
	n.mustApply(out)
	return out
}

// renderOverlay is applyOverlay without the apply: the YAML kustomize produced.
func (n *ns) renderOverlay(name string, cm, secret map[string]string, extra string) string {
	n.t.Helper()
	dir := n.t.TempDir()
	rel, err := filepath.Rel(dir, overlayDir(n.t, name))
	if err != nil {
		n.t.Fatal(err)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: %s\nresources:\n- %s\npatches:\n", n.name, rel)
	ops := func(kind, name, field string, m map[string]string) {
		if len(m) == 0 {
			return
		}
		fmt.Fprintf(&b, "- target: {kind: %s, name: %s}\n  patch: |-\n", kind, name)
		keys := make([]string, 0, len(m))
		for k := range m {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			fmt.Fprintf(&b, "    - {op: add, path: /%s/%s, value: %q}\n", field, k, m[k])
		}
	}
	ops("ConfigMap", "podkeeper", "data", cm)
	ops("Secret", "podkeeper-s3", "stringData", secret)
	b.WriteString(extra)
	if err := os.WriteFile(filepath.Join(dir, "kustomization.yaml"), []byte(b.String()), 0o644); err != nil {
		n.t.Fatal(err)
	}
	out, err := kubectl(n.ctx, "", "kustomize", dir)
	if err != nil {
		n.t.Fatalf("%v\n--- kustomization ---\n%s", err, b.String())
	}
	return out
}

// s3Peers starts versitygw with the bucket the real overlays name (s3://podkeeper/...) and
// returns the values the agents need to reach it.
func s3Peer(t *testing.T) (*peers.S3Server, map[string]string) {
	t.Helper()
	s := peers.StartS3(t, "versitygw")
	if _, err := s.Client().CreateBucket(context.Background(), &s3.CreateBucketInput{Bucket: aws.String(overlayBucket)}); err != nil {
		t.Fatal(err)
	}
	return s, map[string]string{"AWS_ACCESS_KEY_ID": peers.AccessKey, "AWS_SECRET_ACCESS_KEY": peers.SecretKey}
}

// objects turns rendered YAML into objects (kubectl prints one JSON document per object).
func (n *ns) objects(rendered string) []map[string]any {
	n.t.Helper()
	js, err := kubectl(n.ctx, rendered, "create", "--dry-run=client", "-o", "json", "-f", "-")
	if err != nil {
		n.t.Fatal(err)
	}
	var out []map[string]any
	dec := json.NewDecoder(strings.NewReader(js))
	for dec.More() {
		var o map[string]any
		if err := dec.Decode(&o); err != nil {
			n.t.Fatalf("rendered objects: %v", err)
		}
		if items, ok := o["items"].([]any); ok && o["kind"] == "List" {
			for _, it := range items {
				out = append(out, it.(map[string]any))
			}
			continue
		}
		out = append(out, o)
	}
	return out
}

// needAgents fails (never skips) a scenario when run.sh could not build the agents' images.
func needAgents(t *testing.T) {
	t.Helper()
	if msg := os.Getenv("E2E_AGENTS_MISSING"); msg != "" {
		t.Fatalf("the agents' images are missing: %s", msg)
	}
}

// overlayBucket is the bucket of the real overlays' STORE_URL.
const overlayBucket = "podkeeper"
