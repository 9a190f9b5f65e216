//go:build e2e

package e2e

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/podkeeper/podkeeper/test/peers"
)

// TestDeploymentSecondWriterShares: a second Pod on the same prefix is no longer refused (issue 12:
// any number of syncers share a prefix through the change log; the single-writer lease is opt-in with
// SYNC_EXCLUSIVE=true). Here every pod shares the host's network (the sandbox component, as the
// lifecycle scenarios), so a second replica of the same Deployment could never be scheduled next to the
// first (same host ports). The second writer is therefore a copy of the rendered Deployment under another
// name, with only its listen ports moved — same STORE_URL, same agents, same settings. (Real replicas,
// each Pod in its own network namespace: TestDeploymentFleet.) Both become Ready, neither
// gets a LeaseConflict, and both syncers append to the prefix's change log.
func TestDeploymentSecondWriterShares(t *testing.T) {
	needAgents(t)
	s, keys := s3Peer(t)
	recv := peers.StartOtelFwd(t)
	n := newNS(t, "e2e-lease")
	start := time.Now()
	rendered := n.applyOverlay("deployment", map[string]string{"S3_ENDPOINT": s.Endpoint, "FLUENT_ADDR": recv.Addr}, keys, "")
	first, _ := n.onePod("app.kubernetes.io/name=upload-app", "", 2*time.Minute)
	n.waitPodReady(first, 3*time.Minute)
	phase(t, "writers: first writer Ready", start)

	var dep map[string]any
	for _, it := range n.objects(rendered) {
		if it["kind"] == "Deployment" {
			dep = it
		}
	}
	if dep == nil {
		t.Fatal("no Deployment in the deployment overlay")
	}
	// Rename and move ports: the text of the object is rewritten, so every reference follows.
	b, _ := json.Marshal(dep)
	txt := string(b)
	for _, r := range [][2]string{{`"upload-app"`, `"upload-app-b"`}, {"8080", "18080"}, {"8081", "18081"}, {"8082", "18082"}} {
		txt = strings.ReplaceAll(txt, r[0], r[1])
	}
	if _, err := kubectl(n.ctx, txt, "-n", n.name, "apply", "-f", "-"); err != nil {
		t.Fatal(err)
	}
	second, _ := n.onePod("app.kubernetes.io/name=upload-app-b", "", 2*time.Minute)
	start = time.Now()
	n.waitPodReady(second, 3*time.Minute)
	phase(t, "writers: second writer Ready next to the first", start)
	for _, pod := range []string{first, second} {
		events, _ := n.k("get", "events", "--field-selector", "involvedObject.name="+pod, "-o", "custom-columns=TYPE:.type,REASON:.reason,MESSAGE:.message", "--no-headers")
		syncLog, _ := n.k("logs", pod, "-c", "syncer")
		if strings.Contains(events, "LeaseConflict") || strings.Contains(syncLog, "LeaseConflict") {
			t.Errorf("%s: a LeaseConflict although writers share the prefix: %q", pod, lastLine(syncLog, "LeaseConflict"))
		}
		if !strings.Contains(syncLog, "exclusive=false") && !strings.Contains(syncLog, `"exclusive":false`) {
			t.Errorf("%s: the syncer does not say it shares the prefix (exclusive=false):\n%s", pod, syncLog)
		}
	}
	// The first writer is undisturbed.
	if r := n.jsonpath("pod/"+first, `{.status.conditions[?(@.type=="Ready")].status}`); r != "True" {
		t.Errorf("the first writer is no longer Ready")
	}
}

func lastLine(log, substr string) string {
	var last string
	for _, l := range strings.Split(log, "\n") {
		if strings.Contains(l, substr) {
			last = l
		}
	}
	return last
}
