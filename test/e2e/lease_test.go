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

	js, err := kubectl(n.ctx, rendered, "create", "--dry-run=client", "-o", "json", "-f", "-")
	if err != nil {
		t.Fatal(err)
	}
	var list struct {
		Items []map[string]any `json:"items"`
	}
	if err := json.Unmarshal([]byte(js), &list); err != nil {
		t.Fatal(err)
	}
	var dep map[string]any
	for _, it := range list.Items {
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
	var events string
	n.waitFor(2*time.Minute, "a LeaseConflict Event on "+second, func() error {
		events, _ = n.k("get", "events", "--field-selector", "involvedObject.name="+second, "-o", "custom-columns=TYPE:.type,REASON:.reason,MESSAGE:.message", "--no-headers")
		if !strings.Contains(events, "LeaseConflict") {
			return fmt.Errorf("events of %s:\n%s", second, events)
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
