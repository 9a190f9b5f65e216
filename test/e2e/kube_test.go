//go:build e2e

// Package e2e runs podkeeper's Pod life cycle on a real kubelet: `make e2e` (test/e2e/run.sh)
// starts the offline single-node cluster of test/cluster, imports the images and runs these
// tests with KUBECONFIG pointing at it. The tests drive the cluster with kubectl, like a user
// would, and never import client-go (the project's binaries must not, and the tests need
// nothing kubectl cannot show).
package e2e

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/podkeeper/podkeeper/test/peers"
)

// Images the tests run; run.sh builds and imports them (test/e2e/images.sh).
const appImage = "podkeeper.local/upload-app:e2e"

func kubectlBin() string {
	if b := os.Getenv("E2E_KUBECTL"); b != "" {
		return b
	}
	return "kubectl"
}

// apiserverPort is what pods on hostNetwork use to reach the API (no Service IPs on the rig).
func apiserverPort() string {
	if p := os.Getenv("E2E_APISERVER_PORT"); p != "" {
		return p
	}
	return "6443"
}

// kubectl runs kubectl with stdin (may be empty) and returns stdout; the error carries stderr.
func kubectl(ctx context.Context, stdin string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, kubectlBin(), args...)
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("kubectl %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return out.String(), nil
}

// ns is one test's namespace; everything a test creates lives in it and goes with it.
type ns struct {
	t    *testing.T
	name string
	ctx  context.Context
}

// newNS creates a fresh namespace. hostNetwork (the only way pods reach the loopback S3
// server and log receiver on this node) is not allowed under the restricted Pod Security
// level, so the namespace is labelled privileged. On failure the cleanup first keeps
// `kubectl describe`, the logs of every container and the events in the test log.
func newNS(t *testing.T, name string) *ns {
	t.Helper()
	n := &ns{t: t, name: name, ctx: context.Background()}
	kubectl(n.ctx, "", "delete", "namespace", name, "--ignore-not-found", "--wait=true", "--timeout=90s")
	n.mustApply(fmt.Sprintf(`apiVersion: v1
kind: Namespace
metadata:
  name: %s
  labels: {pod-security.kubernetes.io/enforce: privileged, podkeeper.e2e: "true"}
`, name))
	// The service-account controller creates "default" asynchronously; pods are refused until then.
	n.waitFor(30*time.Second, "default service account", func() error {
		_, err := n.k("get", "serviceaccount", "default")
		return err
	})
	t.Cleanup(func() {
		if t.Failed() {
			n.dump()
		}
		if os.Getenv("E2E_KEEP_NS") == "1" {
			return
		}
		if _, err := kubectl(n.ctx, "", "delete", "namespace", name, "--wait=true", "--timeout=120s"); err != nil {
			t.Logf("cleanup: %v", err)
		}
	})
	return n
}

// k runs kubectl in the namespace.
func (n *ns) k(args ...string) (string, error) {
	return kubectl(n.ctx, "", append([]string{"-n", n.name}, args...)...)
}

func (n *ns) mustK(args ...string) string {
	n.t.Helper()
	out, err := n.k(args...)
	if err != nil {
		n.t.Fatal(err)
	}
	return out
}

func (n *ns) mustApply(yaml string) {
	n.t.Helper()
	if _, err := kubectl(n.ctx, yaml, "-n", n.name, "apply", "-f", "-"); err != nil {
		n.t.Fatalf("%v\n--- manifest ---\n%s", err, yaml)
	}
}

func (n *ns) waitFor(timeout time.Duration, what string, cond func() error) {
	n.t.Helper()
	if err := peers.WaitFor(n.ctx, timeout, cond); err != nil {
		n.t.Fatalf("waiting for %s: %v", what, err)
	}
}

// jsonpath returns one field of an object ("" if it does not exist yet).
func (n *ns) jsonpath(obj, path string) string {
	out, _ := n.k("get", obj, "-o", "jsonpath="+path)
	return out
}

// waitPodReady waits for the Ready condition, failing early if the pod can never get there.
func (n *ns) waitPodReady(pod string, timeout time.Duration) {
	n.t.Helper()
	n.waitFor(timeout, pod+" Ready", func() error {
		phase := n.jsonpath("pod/"+pod, "{.status.phase}")
		if phase == "Failed" || phase == "Succeeded" {
			return fmt.Errorf("pod %s ended: %s", pod, phase)
		}
		if r := n.jsonpath("pod/"+pod, `{.status.conditions[?(@.type=="Ready")].status}`); r != "True" {
			return fmt.Errorf("pod %s phase %q ready %q", pod, phase, r)
		}
		return nil
	})
}

// dump keeps what is needed to understand a failure: describe, every container's logs
// (current and previous), events.
func (n *ns) dump() {
	out, _ := n.k("describe", "pods")
	n.t.Logf("--- kubectl -n %s describe pods ---\n%s", n.name, out)
	names, _ := n.k("get", "pods", "-o", "jsonpath={range .items[*]}{.metadata.name}{\"\\n\"}{end}")
	for _, p := range strings.Fields(names) {
		cs, _ := n.k("get", "pod", p, "-o", "jsonpath={.spec.initContainers[*].name} {.spec.containers[*].name}")
		for _, c := range strings.Fields(cs) {
			out, err := n.k("logs", p, "-c", c, "--tail=200")
			n.t.Logf("--- logs %s/%s ---\n%s%v", p, c, out, errOrEmpty(err))
			if prev, err := n.k("logs", p, "-c", c, "--previous", "--tail=50"); err == nil && prev != "" {
				n.t.Logf("--- previous logs %s/%s ---\n%s", p, c, prev)
			}
		}
	}
	out, _ = n.k("get", "events", "--sort-by=.lastTimestamp")
	n.t.Logf("--- events ---\n%s", out)
	out, _ = n.k("get", "all", "-o", "wide")
	n.t.Logf("--- objects ---\n%s", out)
}

func errOrEmpty(err error) any {
	if err == nil {
		return ""
	}
	return err
}

// phase prints how long a step of a scenario took (the issue asks for time per phase).
func phase(t *testing.T, name string, start time.Time) {
	t.Helper()
	t.Logf("phase %s: %.1fs", name, time.Since(start).Seconds())
}
