//go:build e2e

package e2e

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/podkeeper/podkeeper/test/peers"
)

// TestJobCompletes: a Job whose Pod carries the agents completes — native sidecars do not keep
// it running — and what the app wrote just before it exited is still uploaded and shipped (the
// sidecars drain after the app is gone). components/agents only patches apps/v1 workloads
// (Deployments, StatefulSets), so the Job's Pod template is taken verbatim from the rendered Deployment
// variant: the same agents, settings and security context a user gets.
func TestJobCompletes(t *testing.T) {
	needAgents(t)
	s, keys := s3Peer(t)
	recv := peers.StartOtelFwd(t)
	n := newNS(t, "e2e-job")
	start := time.Now()
	rendered := n.renderOverlay("deployment", map[string]string{"S3_ENDPOINT": s.Endpoint, "FLUENT_ADDR": recv.Addr}, keys, "")
	var tmpl map[string]any
	var keep []any
	for _, it := range n.objects(rendered) {
		switch it["kind"] {
		case "Deployment":
			tmpl = it["spec"].(map[string]any)["template"].(map[string]any)
		case "Service":
		default:
			keep = append(keep, it)
		}
	}
	if tmpl == nil {
		t.Fatal("no Deployment in the deployment overlay")
	}
	spec := tmpl["spec"].(map[string]any)
	spec["restartPolicy"] = "Never"
	for _, c := range spec["containers"].([]any) {
		c := c.(map[string]any)
		if c["name"] != "app" {
			continue
		}
		// A batch app: write, then exit; it serves no traffic, so the example's probes go.
		c["env"] = append(c["env"].([]any),
			map[string]any{"name": "APP_FILES", "value": "10"}, map[string]any{"name": "APP_LINES", "value": "100"},
			map[string]any{"name": "APP_BATCH", "value": "job"}, map[string]any{"name": "APP_EXIT", "value": "true"})
		for _, p := range []string{"startupProbe", "readinessProbe", "livenessProbe"} {
			delete(c, p)
		}
	}
	job := map[string]any{"apiVersion": "batch/v1", "kind": "Job", "metadata": map[string]any{"name": "upload-job"},
		"spec": map[string]any{"backoffLimit": 0, "template": tmpl}}
	out, _ := json.Marshal(map[string]any{"apiVersion": "v1", "kind": "List", "items": append(keep, job)})
	if _, err := kubectl(n.ctx, string(out), "-n", n.name, "apply", "-f", "-"); err != nil {
		t.Fatal(err)
	}
	n.waitFor(3*time.Minute, "Job complete", func() error {
		if f := n.jsonpath("job/upload-job", `{.status.conditions[?(@.type=="Failed")].status}`); f == "True" {
			t.Fatalf("job failed: %s", n.jsonpath("job/upload-job", "{.status}")) // the dump shows why
		}
		if c := n.jsonpath("job/upload-job", `{.status.conditions[?(@.type=="Complete")].status}`); c != "True" {
			return fmt.Errorf("job not complete")
		}
		return nil
	})
	phase(t, "job: apply -> Complete", start)
	pod := strings.TrimSpace(n.mustK("get", "pods", "-l", "job-name=upload-job", "-o", "jsonpath={.items[0].metadata.name}"))
	if ph := n.jsonpath("pod/"+pod, "{.status.phase}"); ph != "Succeeded" {
		t.Errorf("job pod phase %s, want Succeeded", ph)
	}
	written := sumLines(n.mustK("logs", pod, "-c", "app"))
	if len(written) != 10 {
		t.Fatalf("job app wrote %d files, want 10", len(written))
	}
	if d := diff(keysWithPrefix(listObjects(t, s, overlayBucket, "uploads/data/"), "uploads/data/"), pathsOf(written)); d != "" {
		t.Errorf("files of the job in S3: %s", d)
	}
	n.waitLines(recv, "job", 100, pod)
}
