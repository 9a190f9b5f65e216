//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestDeploymentFleet is issue 12 on the real kubelet: kustomize/overlays/dev's Deployment as a team
// writes it — 3 replicas, RollingUpdate maxSurge 1 / maxUnavailable 0, components/agents — each Pod in
// its own network namespace (test/e2e/overlay/podnet), versitygw as the store. The scenarios run one
// after the other on the same Deployment and prefix:
//
//  1. the 3 replicas become Ready on an empty prefix (no LeaseConflict, no restart); files uploaded over
//     HTTP through each replica's Pod IP all reach S3 and the change log (the union)
//  2. rolling update (a template annotation): completes with never fewer than 3 available replicas,
//     and every new Pod's restore brings back the union, byte-identical (sha256 inside the Pod)
//  3. a Pod SIGKILLed (every process, no drain) and force-deleted (--grace-period=0 --force) right after
//     the change log has its uploads: the replacement restores every acknowledged file
//  4. scale 3 -> 1 right after each replica took new uploads: the removed Pods drain; the remaining
//     Pod, restarted, restores the union
func TestDeploymentFleet(t *testing.T) {
	f := startFleet(t, "e2e-fleet", nil)
	var union []string
	add := func(lines []string) {
		union = append(union, lines...)
		slices.Sort(union)
	}

	// 1. Three replicas on one prefix.
	t.Log("scenario 1: 3 replicas Ready, uploads through each Pod IP reach S3 and the change log")
	start := time.Now()
	ps := f.waitFleet(3, 4*time.Minute)
	phase(t, "fleet: apply -> 3 replicas Ready ("+podNames(ps)+")", start)
	t.Logf("fleet: Pod ready times (created -> Ready): %s", readyTimes(ps))
	f.noLeaseConflict(ps)
	for _, p := range ps {
		f.checkRestored(p, nil)
	}
	start = time.Now()
	for i, p := range ps {
		add(f.uploadBatch(p, fmt.Sprintf("r%d-%s", i, p.Name), 10, 1024))
	}
	phase(t, fmt.Sprintf("fleet: %d files uploaded through the 3 Pod IPs", len(union)), start)
	ack := f.waitAcknowledged(union, 2*time.Minute)
	t.Logf("phase fleet: last upload -> every file in S3 and the change log: %.1fs", ack.Seconds())
	if t.Failed() {
		return
	}

	// 2. Rolling update.
	t.Log("scenario 2: rolling update (template annotation), maxSurge 1 / maxUnavailable 0")
	old := ps
	mon := f.watchAvailability()
	start = time.Now()
	f.mustK("patch", "deployment", "upload-app", "--type=merge", "-p", `{"spec":{"template":{"metadata":{"annotations":{"e2e.podkeeper.io/rev":"2"}}}}}`)
	ps = f.waitFleet(3, 6*time.Minute)
	rollout := time.Since(start)
	minAvail, maxPods, samples := mon.stop()
	t.Logf("phase fleet: rolling update complete: %.1fs (%s)", rollout.Seconds(), podNames(ps))
	t.Logf("fleet: new Pod ready times (created -> Ready): %s", readyTimes(ps))
	t.Logf("fleet: during the rollout (%d samples) available replicas >= %d, at most %d Pods", samples, minAvail, maxPods)
	if minAvail < 3 {
		t.Errorf("available replicas fell to %d during the rollout (maxUnavailable 0: want 3)", minAvail)
	}
	if maxPods > 4 {
		t.Errorf("%d Pods at once during the rollout (maxSurge 1: at most 4)", maxPods)
	}
	for _, p := range ps {
		if slices.ContainsFunc(old, func(o podInfo) bool { return o.UID == p.UID }) {
			t.Errorf("%s survived the rolling update", p.Name)
		}
		f.checkRestored(p, union)
	}
	f.noLeaseConflict(ps)
	f.checkAcknowledged("after the rollout", union)
	if t.Failed() {
		return
	}

	// 3. Force delete right after the uploads are acknowledged.
	t.Log("scenario 3: SIGKILL + force delete (--grace-period=0 --force) right after acknowledged uploads")
	victim, before := ps[0], ps
	start = time.Now()
	fresh := f.uploadBatch(victim, "forced-"+victim.Name, 10, 512)
	add(fresh)
	ack = f.waitAcknowledged(union, time.Minute)
	t.Logf("phase fleet: app acknowledged -> uploads in the change log: %.1fs", ack.Seconds())
	// kubectl's force delete alone still gets the containers a SIGTERM and 2 s (the kubelet's minimum
	// grace period): SIGKILL first, so nothing drains, then remove the Pod object at once.
	start = time.Now()
	killed := sigkillPod(t, victim.UID)
	f.mustK("delete", "pod", victim.Name, "--grace-period=0", "--force")
	t.Logf("fleet: %s: %d processes SIGKILLed, then force-deleted", victim.Name, killed)
	if killed < 4 {
		t.Errorf("SIGKILLed %d processes of %s, want at least the sandbox, app, syncer and logshipper", killed, victim.Name)
	}
	ps = f.waitFleet(3, 4*time.Minute)
	t.Logf("phase fleet: SIGKILL + force delete -> 3 replicas Ready again: %.1fs", time.Since(start).Seconds())
	var replacement []podInfo
	for _, p := range ps {
		if p.Name == victim.Name {
			t.Errorf("%s still there after the force delete", p.Name)
		}
		if !slices.ContainsFunc(before, func(o podInfo) bool { return o.UID == p.UID }) {
			replacement = append(replacement, p)
		}
	}
	if len(replacement) != 1 {
		t.Fatalf("want one replacement Pod, got %v (Pods %s)", podNames(replacement), podNames(ps))
	}
	t.Logf("fleet: replacement %s ready after %.0fs (created -> Ready)", replacement[0].Name, replacement[0].readyAfter().Seconds())
	f.checkRestored(replacement[0], union)
	if t.Failed() {
		return
	}

	// 4. Scale down right after every replica took new uploads.
	t.Log("scenario 4: scale 3 -> 1 right after new uploads through each replica")
	start = time.Now()
	for _, p := range ps {
		add(f.uploadBatch(p, "before-scale-"+p.Name, 5, 0))
	}
	f.mustK("scale", "deployment", "upload-app", "--replicas=1")
	ps = f.waitFleet(1, 3*time.Minute)
	t.Logf("phase fleet: scale 3 -> 1 (removed Pods drained and gone): %.1fs", time.Since(start).Seconds())
	f.checkAcknowledged("after the removed Pods drained", union)
	start = time.Now()
	survivor := ps[0]
	f.mustK("delete", "pod", survivor.Name, "--wait=false")
	f.waitFor(3*time.Minute, "a new Pod in place of "+survivor.Name, func() error {
		ps = f.pods()
		if len(ps) != 1 || ps[0].UID == survivor.UID || !ps[0].Ready {
			return fmt.Errorf("pods %s", podNames(ps))
		}
		return nil
	})
	t.Logf("phase fleet: remaining Pod restarted -> Ready: %.1fs", time.Since(start).Seconds())
	f.checkRestored(ps[0], union)
	t.Logf("fleet: %d files in the union", len(union))
}

// availability samples the Deployment while it rolls out: the fewest available replicas and the
// most Pods at once.
type availability struct {
	cancel   context.CancelFunc
	wg       sync.WaitGroup
	minAvail int
	maxPods  int
	samples  int
}

func (f *fleet) watchAvailability() *availability {
	ctx, cancel := context.WithCancel(f.ctx)
	a := &availability{cancel: cancel, minAvail: 1 << 30}
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		tick := time.NewTicker(250 * time.Millisecond)
		defer tick.Stop()
		for {
			out, err := kubectl(ctx, "", "-n", f.name, "get", "deployment/upload-app", "-o", "jsonpath={.status.availableReplicas} {.status.replicas}")
			if err == nil {
				if fs := strings.Fields(out); len(fs) == 2 {
					av, _ := strconv.Atoi(fs[0])
					n, _ := strconv.Atoi(fs[1])
					a.minAvail, a.maxPods = min(a.minAvail, av), max(a.maxPods, n)
					a.samples++
				}
			}
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
		}
	}()
	return a
}

func (a *availability) stop() (minAvail, maxPods, samples int) {
	a.cancel()
	a.wg.Wait()
	return a.minAvail, a.maxPods, a.samples
}
