//go:build e2e

package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"
)

// sumLines extracts "SHA256  PATH" lines from an upload-app output, sorted.
func sumLines(out string) []string {
	re := regexp.MustCompile(`(?m)^(?:wrote )?([0-9a-f]{64}  \S+)$`)
	var s []string
	for _, m := range re.FindAllStringSubmatch(out, -1) {
		s = append(s, m[1])
	}
	sort.Strings(s)
	return s
}

// TestRigPodLifecycle proves the node itself, before any agent is involved: an init container
// writes into an emptyDir, a native sidecar starts, the app container sees the files when it
// starts, `kubectl exec` works, and deleting the pod stops the app before the sidecar. Everything
// runs from the project's own static test image, imported (never pulled).
func TestRigPodLifecycle(t *testing.T) {
	n := newNS(t, "e2e-rig")
	witnessDir := t.TempDir()
	os.Chmod(witnessDir, 0o777)
	start := time.Now()
	n.mustApply(fmt.Sprintf(`apiVersion: v1
kind: Pod
metadata: {name: rig}
spec:
  terminationGracePeriodSeconds: 20
  volumes:
  - {name: data, emptyDir: {}}
  - {name: witness, hostPath: {path: %[2]s, type: Directory}}
  initContainers:
  - name: seed
    image: %[1]s
    imagePullPolicy: Never
    args: [write, -dir, /data, -files, "5", -large-kib, "2048", -batch, seed]
    volumeMounts: [{name: data, mountPath: /data}]
  - name: sidecar
    image: %[1]s
    imagePullPolicy: Never
    restartPolicy: Always
    args: [pause]
    env: [{name: APP_WITNESS, value: /witness/signals}]
    volumeMounts: [{name: witness, mountPath: /witness}]
  containers:
  - name: app
    image: %[1]s
    imagePullPolicy: Never
    args: [run]
    env: [{name: APP_DATA_DIR, value: /data}, {name: APP_WITNESS, value: /witness/signals}]
    volumeMounts: [{name: data, mountPath: /data}, {name: witness, mountPath: /witness}]
`, appImage, witnessDir))
	n.waitPodReady("rig", 90*time.Second)
	phase(t, "rig pod created -> Ready", start)

	seeded := sumLines(n.mustK("logs", "rig", "-c", "seed"))
	if len(seeded) != 6 {
		t.Fatalf("seed wrote %d files, want 6 (5 + large): %v", len(seeded), seeded)
	}
	var seen string
	n.waitFor(30*time.Second, "app start listing", func() error {
		seen = n.mustK("logs", "rig", "-c", "app")
		if !strings.Contains(seen, "end of files present at start") {
			return fmt.Errorf("app has not listed its files yet: %q", seen)
		}
		return nil
	})
	if got := sumLines(seen); strings.Join(got, "\n") != strings.Join(seeded, "\n") {
		t.Fatalf("app saw at start:\n%s\nwant what the init container wrote:\n%s", strings.Join(got, "\n"), strings.Join(seeded, "\n"))
	}
	if got := sumLines(n.mustK("exec", "rig", "-c", "app", "--", "/upload-app", "sums", "-dir", "/data")); strings.Join(got, "\n") != strings.Join(seeded, "\n") {
		t.Fatalf("kubectl exec sums: %v, want %v", got, seeded)
	}

	start = time.Now()
	n.mustK("delete", "pod", "rig", "--wait=true", "--timeout=60s")
	phase(t, "rig pod deleted", start)
	b, err := os.ReadFile(filepath.Join(witnessDir, "signals"))
	if err != nil {
		t.Fatal(err)
	}
	var order []string
	for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		if f := strings.Fields(l); len(f) > 1 {
			order = append(order, f[1])
		}
	}
	if strings.Join(order, ",") != "app,pause" {
		t.Fatalf("termination order %v, want the app first, then the sidecar:\n%s", order, b)
	}
}
