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

// TestDeploymentSecondWriterRefused: a second Pod on the same prefix is refused by the syncer's
// lease with a clear Event. On this node every pod shares the host's network (see the sandbox
// component), so a second replica of the same Deployment could never be scheduled next to the
// first (same host ports). The second writer is therefore a copy of the rendered Deployment under
// another name, with only its listen ports moved — same STORE_URL, same agents, same settings.
func TestDeploymentSecondWriterRefused(t *testing.T) {
	needAgents(t)
	s, keys := s3Peer(t)
	recv := peers.StartOtelFwd(t)
	n := newNS(t, "e2e-lease")
	start := time.Now()
	rendered := n.applyOverlay("deployment", map[string]string{"S3_ENDPOINT": s.Endpoint, "FLUENT_ADDR": recv.Addr}, keys, "")
	first, _ := n.onePod("app.kubernetes.io/name=upload-app", "", 2*time.Minute)
	n.waitPodReady(first, 3*time.Minute)
	phase(t, "lease: first writer Ready", start)

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
	var events, syncLog string
	n.waitFor(2*time.Minute, "the second writer refused", func() error {
		events, _ = n.k("get", "events", "--field-selector", "involvedObject.name="+second, "-o", "custom-columns=TYPE:.type,REASON:.reason,MESSAGE:.message", "--no-headers")
		syncLog, _ = n.k("logs", second, "-c", "syncer")
		if !strings.Contains(events, "LeaseConflict") && !strings.Contains(syncLog, "LeaseConflict") {
			return fmt.Errorf("no LeaseConflict yet; events of %s:\n%s", second, events)
		}
		return nil
	})
	// The refusal must reach the user where they look: an Event on the refused Pod.
	n.waitFor(30*time.Second, "a LeaseConflict Event on "+second, func() error {
		events, _ = n.k("get", "events", "--field-selector", "involvedObject.name="+second, "-o", "custom-columns=TYPE:.type,REASON:.reason,MESSAGE:.message", "--no-headers")
		if !strings.Contains(events, "LeaseConflict") {
			return fmt.Errorf("the syncer refused the prefix (its log: %q) but posted no Event on its Pod; events:\n%s", lastLine(syncLog, "LeaseConflict"), events)
		}
		return nil
	})
	phase(t, "lease: second writer refused", start)
	t.Logf("events of %s:\n%s", second, events)
	if r := n.jsonpath("pod/"+second, `{.status.conditions[?(@.type=="Ready")].status}`); r == "True" {
		t.Errorf("the second writer's pod became Ready")
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
