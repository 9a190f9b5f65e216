//go:build e2e

package e2e

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"
	"time"
)

// Issue 13's settings: replicas converge through the store.
const (
	pullSettle   = time.Second // SYNC_SETTLE
	pullInterval = time.Second // SYNC_PULL_INTERVAL
)

// TestDeploymentSyncPull is issue 13 on the real kubelet: the 3-replica Deployment of
// TestDeploymentFleet with SYNC_PULL=true in the agents' ConfigMap. A file uploaded over HTTP through
// one replica's Pod IP is served (HTTP GET through their Pod IPs) by each of the other two within
// SYNC_SETTLE + 2 × SYNC_PULL_INTERVAL + 250 ms of the upload's acknowledgement, byte-identical; each
// replica takes one upload in turn, so every direction is measured.
func TestDeploymentSyncPull(t *testing.T) {
	f := startFleet(t, "e2e-pull", map[string]string{
		"SYNC_PULL":          "true",
		"SYNC_SETTLE":        pullSettle.String(),
		"SYNC_PULL_INTERVAL": pullInterval.String(),
	})
	target := pullSettle + 2*pullInterval + 250*time.Millisecond
	start := time.Now()
	ps := f.waitFleet(3, 4*time.Minute)
	phase(t, "pull: apply -> 3 replicas Ready ("+podNames(ps)+")", start)
	t.Logf("pull: Pod ready times (created -> Ready): %s", readyTimes(ps))
	f.noLeaseConflict(ps)

	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 21))
	var all []time.Duration
	var union []string
	for i, src := range ps {
		rel := fmt.Sprintf("pull/%s/file-%d.bin", src.Name, i)
		line := f.put(src.IP, rel, 1+rng.IntN(256<<10), rng)
		acked := time.Now()
		union = append(union, line)
		var mu sync.Mutex
		var wg sync.WaitGroup
		for _, dst := range ps {
			if dst.UID == src.UID {
				continue
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				var took time.Duration
				err := pollUntil(f, 3*target+30*time.Second, func() error {
					got, err := f.get(f.ctx, dst.IP, rel)
					if err != nil {
						return err
					}
					if got != line {
						return fmt.Errorf("served %q, uploaded %q", got, line)
					}
					took = time.Since(acked)
					return nil
				})
				mu.Lock()
				defer mu.Unlock()
				if err != nil {
					t.Errorf("%s uploaded through %s: not served by %s: %v", rel, src.Name, dst.Name, err)
					return
				}
				all = append(all, took)
				t.Logf("pull: %s -> %s: served %.0f ms after the upload was acknowledged (target %.0f ms)", src.Name, dst.Name, ms(took), ms(target))
				// Printed, not asserted: a timing on the shared 2-core rig is the
				// benchmark's to judge (bench/pull_test.go), a test must not
				// depend on the machine's load.
				if took > target {
					t.Logf("%s -> %s: %.0f ms is over the target %.0f ms (SYNC_SETTLE + 2 × SYNC_PULL_INTERVAL + 250 ms)", src.Name, dst.Name, ms(took), ms(target))
				}
			}()
		}
		wg.Wait()
	}
	slices.Sort(all)
	if len(all) > 0 {
		t.Logf("pull: %d latencies: min %.0f ms, median %.0f ms, max %.0f ms (target %.0f ms)", len(all), ms(all[0]), ms(all[len(all)/2]), ms(all[len(all)-1]), ms(target))
	}
	// Each replica uploaded one file; the change log holds exactly those (pulled copies are not uploaded again).
	slices.Sort(union)
	f.waitAcknowledged(union, time.Minute)
}

// pollUntil retries cond every 20 ms until it succeeds or timeout passes (never a blind sleep).
func pollUntil(f *fleet, timeout time.Duration, cond func() error) error {
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		err := cond()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return err
		}
		select {
		case <-f.ctx.Done():
			return f.ctx.Err()
		case <-tick.C:
		}
	}
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
