//go:build e2e

package e2e

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/podkeeper/podkeeper/test/peers"
)

// Pods with a network namespace of their own (test/e2e/overlay/podnet). On the rig, veth-self gives
// each Pod an IP that is a loopback address of the host (127.244.0.N): the kubelet's probes and these
// tests dial POD_IP:PORT, and nsfwd relays it to whatever listens on that port inside the Pod. The
// other way, nsfwd listens on 127.0.0.1:PORT inside every Pod for the ports of E2E_FWD_PORTS (written
// here, read by nsfwd when a Pod starts and whenever it changes) and relays to the host's 127.0.0.1:PORT:
// the Pods reach the test's S3 server, log receiver and API server at the addresses a hostNetwork Pod uses.

// podNet makes the test's loopback servers on ports (plus the API server) reachable inside Pods started
// from now on. Needs the rig (run.sh sets E2E_FWD_PORTS); another cluster cannot relay its Pods to
// this machine's loopback, so the scenario is skipped there.
func podNet(t *testing.T, ports ...int) {
	t.Helper()
	file := os.Getenv("E2E_FWD_PORTS")
	if file == "" {
		t.Skip("needs the rig's per-Pod network relay (test/cluster/nsfwd; E2E_FWD_PORTS is set by run.sh)")
	}
	api, err := strconv.Atoi(apiserverPort())
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	for _, p := range append(ports, api) {
		fmt.Fprintln(&b, p)
	}
	if err := os.WriteFile(file+".tmp", []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(file+".tmp", file); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(file) })
}

// fleet is one test's podnet Deployment (kustomize/overlays/dev's upload-app, 3 replicas) on versitygw.
type fleet struct {
	*ns
	s        *peers.S3Server
	recv     *peers.LogReceiver
	selector string
	prefix   string // the workload's prefix in the bucket (podkeeper.io/store-url s3://podkeeper/uploads)
	http     *http.Client
}

func startFleet(t *testing.T, nsName string, cm map[string]string) *fleet {
	t.Helper()
	needAgents(t)
	s, keys := s3Peer(t)
	recv := peers.StartOtelFwd(t)
	podNet(t, s.Port, recv.Port)
	n := newNS(t, nsName)
	all := map[string]string{"S3_ENDPOINT": s.Endpoint, "FLUENT_ADDR": recv.Addr}
	for k, v := range cm {
		all[k] = v
	}
	n.applyOverlay("podnet", all, keys, "")
	return &fleet{ns: n, s: s, recv: recv, selector: "app.kubernetes.io/name=upload-app", prefix: "uploads/",
		http: &http.Client{Timeout: 30 * time.Second}}
}

// podInfo is what the scenarios need of a Pod.
type podInfo struct {
	Name, UID, IP string
	Ready         bool
	Terminating   bool
	Created       time.Time
	ReadyAt       time.Time // the Ready condition's last transition (1 s resolution)
	Restarts      int
}

func (p podInfo) readyAfter() time.Duration { return p.ReadyAt.Sub(p.Created) }

func (f *fleet) pods() []podInfo {
	f.t.Helper()
	out, err := f.k("get", "pods", "-l", f.selector, "-o", "json")
	if err != nil {
		f.t.Fatal(err)
	}
	var list struct {
		Items []struct {
			Metadata struct {
				Name              string     `json:"name"`
				UID               string     `json:"uid"`
				CreationTimestamp time.Time  `json:"creationTimestamp"`
				DeletionTimestamp *time.Time `json:"deletionTimestamp"`
			} `json:"metadata"`
			Status struct {
				PodIP      string `json:"podIP"`
				Conditions []struct {
					Type               string    `json:"type"`
					Status             string    `json:"status"`
					LastTransitionTime time.Time `json:"lastTransitionTime"`
				} `json:"conditions"`
				InitContainerStatuses []struct {
					RestartCount int `json:"restartCount"`
				} `json:"initContainerStatuses"`
				ContainerStatuses []struct {
					RestartCount int `json:"restartCount"`
				} `json:"containerStatuses"`
			} `json:"status"`
		} `json:"items"`
	}
	if err := json.Unmarshal([]byte(out), &list); err != nil {
		f.t.Fatal(err)
	}
	var ps []podInfo
	for _, it := range list.Items {
		p := podInfo{Name: it.Metadata.Name, UID: it.Metadata.UID, IP: it.Status.PodIP,
			Terminating: it.Metadata.DeletionTimestamp != nil, Created: it.Metadata.CreationTimestamp}
		for _, c := range it.Status.Conditions {
			if c.Type == "Ready" && c.Status == "True" {
				p.Ready, p.ReadyAt = true, c.LastTransitionTime
			}
		}
		for _, c := range it.Status.InitContainerStatuses {
			p.Restarts += c.RestartCount
		}
		for _, c := range it.Status.ContainerStatuses {
			p.Restarts += c.RestartCount
		}
		ps = append(ps, p)
	}
	sort.Slice(ps, func(i, j int) bool { return ps[i].Name < ps[j].Name })
	return ps
}

// waitFleet waits until the Deployment has finished rolling out want replicas, all Ready and no
// other Pod left (terminating ones included), and returns the Pods.
func (f *fleet) waitFleet(want int, timeout time.Duration) []podInfo {
	f.t.Helper()
	var ps []podInfo
	f.waitFor(timeout, fmt.Sprintf("%d Ready replicas and no other Pod", want), func() error {
		st := f.jsonpath("deployment/upload-app", "{.metadata.generation} {.status.observedGeneration} {.status.replicas} {.status.updatedReplicas} {.status.readyReplicas} {.status.availableReplicas}")
		w := fmt.Sprintf(" %d %d %d %d", want, want, want, want)
		if fs := strings.Fields(st); len(fs) != 6 || fs[0] != fs[1] || !strings.HasSuffix(st, w) {
			return fmt.Errorf("deployment status (generation observed replicas updated ready available) %q", st)
		}
		ps = f.pods()
		for _, p := range ps {
			if p.Restarts > 0 { // no restart is expected in any scenario: fail now, not at the deadline
				f.t.Fatalf("%s: a container restarted (%d restarts)", p.Name, p.Restarts)
			}
		}
		if len(ps) != want {
			return fmt.Errorf("%d pods (want %d): %+v", len(ps), want, ps)
		}
		for _, p := range ps {
			if !p.Ready || p.Terminating || p.IP == "" {
				return fmt.Errorf("pod %+v", p)
			}
		}
		return nil
	})
	return ps
}

// put uploads size random bytes as rel through the app at ip (what a client of the upload service
// does) and returns the "SUM  PATH" line the app acknowledged.
func (f *fleet) put(ip, rel string, size int, rng *rand.Rand) string {
	f.t.Helper()
	b := make([]byte, size)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	sum := sha256.Sum256(b)
	line := hex.EncodeToString(sum[:]) + "  " + rel
	req, _ := http.NewRequestWithContext(f.ctx, http.MethodPut, "http://"+ip+":8080/files/"+rel, bytes.NewReader(b))
	resp, err := f.http.Do(req)
	if err != nil {
		f.t.Fatalf("upload %s through %s: %v", rel, ip, err)
	}
	ack, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || strings.TrimSpace(string(ack)) != line {
		f.t.Fatalf("upload %s through %s: %d %q, want %q", rel, ip, resp.StatusCode, ack, line)
	}
	return line
}

// uploadBatch puts n files (1 B .. 64 KiB, nested) plus one of largeKiB through pod p, named after batch.
func (f *fleet) uploadBatch(p podInfo, batch string, n, largeKiB int) []string {
	f.t.Helper()
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 13))
	var lines []string
	for i := range n {
		lines = append(lines, f.put(p.IP, fmt.Sprintf("%s/d%d/file-%03d.bin", batch, i%3, i), 1+rng.IntN(64<<10), rng))
	}
	if largeKiB > 0 {
		lines = append(lines, f.put(p.IP, batch+"/large.bin", largeKiB<<10, rng))
	}
	return lines
}

// get fetches rel through the app at ip: its sha256 line, or an error (404 included).
func (f *fleet) get(ctx context.Context, ip, rel string) (string, error) {
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+ip+":8080/files/"+rel, nil)
	resp, err := f.http.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	h := sha256.New()
	if _, err := io.Copy(h, resp.Body); err != nil {
		return "", err
	}
	if resp.StatusCode != 200 {
		return "", fmt.Errorf("GET %s from %s: %d", rel, ip, resp.StatusCode)
	}
	return hex.EncodeToString(h.Sum(nil)) + "  " + rel, nil
}

// acknowledged is the prefix's restorable state (checkpoint + change log) as "SUM  PATH" lines.
func (f *fleet) acknowledged() ([]string, error) {
	f.t.Helper()
	m, err := foldState(f.t, f.s, f.prefix)
	if err != nil {
		return nil, err
	}
	var lines []string
	for _, fl := range m.Files {
		lines = append(lines, fl.SHA256+"  "+fl.Path)
	}
	sort.Strings(lines)
	return lines, nil
}

// checkAcknowledged: the change log holds exactly want.
func (f *fleet) checkAcknowledged(when string, want []string) {
	f.t.Helper()
	got, err := f.acknowledged()
	if err != nil {
		f.t.Errorf("change log %s: %v", when, err)
	} else if d := diff(got, want); d != "" {
		f.t.Errorf("change log %s vs uploaded: %s", when, d)
	}
}

// waitAcknowledged waits until every file of want is in the change log (object and batch stored:
// what the syncer acknowledges) and nothing else is, and returns how long that took.
func (f *fleet) waitAcknowledged(want []string, timeout time.Duration) time.Duration {
	f.t.Helper()
	start := time.Now()
	f.waitFor(timeout, fmt.Sprintf("%d files in the change log", len(want)), func() error {
		got, err := f.acknowledged()
		if err != nil {
			return err
		}
		if d := diff(got, want); d != "" {
			return fmt.Errorf("change log vs uploaded: %s", d)
		}
		if d := diff(keysWithPrefix(listObjects(f.t, f.s, overlayBucket, f.prefix+"data/"), f.prefix+"data/"), pathsOf(want)); d != "" {
			return fmt.Errorf("objects under %sdata/: %s", f.prefix, d)
		}
		return nil
	})
	return time.Since(start)
}

// noLeaseConflict checks the Pods' events and syncer logs: replicas share the prefix.
func (f *fleet) noLeaseConflict(ps []podInfo) {
	f.t.Helper()
	for _, p := range ps {
		events, _ := f.k("get", "events", "--field-selector", "involvedObject.name="+p.Name, "-o", "custom-columns=TYPE:.type,REASON:.reason,MESSAGE:.message", "--no-headers")
		syncLog, _ := f.k("logs", p.Name, "-c", "syncer")
		if strings.Contains(events, "LeaseConflict") || strings.Contains(syncLog, "LeaseConflict") {
			f.t.Errorf("%s: a LeaseConflict although replicas share the prefix: %q", p.Name, lastLine(syncLog, "LeaseConflict"))
		}
	}
}

// checkRestored checks that pod p's app found exactly want (sha256 computed inside the Pod before the
// app wrote anything), i.e. what its restore brought back.
func (f *fleet) checkRestored(p podInfo, want []string) {
	f.t.Helper()
	if d := diff(appFiles(f.waitAppStarted(p.Name)), want); d != "" {
		f.t.Errorf("%s: files its app found at start vs acknowledged uploads: %s", p.Name, d)
	}
}

func podNames(ps []podInfo) string {
	var s []string
	for _, p := range ps {
		s = append(s, p.Name+"@"+p.IP)
	}
	return strings.Join(s, " ")
}

func readyTimes(ps []podInfo) string {
	var s []string
	for _, p := range ps {
		s = append(s, fmt.Sprintf("%s %.0fs", p.Name, p.readyAfter().Seconds()))
	}
	return strings.Join(s, ", ")
}

// sigkillPod SIGKILLs every process of the Pod on this node (its containers and its sandbox, found by
// the Pod's cgroup): what a node crash or the OOM killer does — no SIGTERM, nothing drained. The node
// is this machine only on the rig (podNet's scenarios).
func sigkillPod(t *testing.T, uid string) int {
	t.Helper()
	needles := []string{"/pod" + uid + "/", "pod" + strings.ReplaceAll(uid, "-", "_") + ".slice"}
	procs, _ := filepath.Glob("/proc/[0-9]*/cgroup")
	n := 0
	for _, c := range procs {
		b, err := os.ReadFile(c)
		if err != nil || !slices.ContainsFunc(needles, func(s string) bool { return bytes.Contains(b, []byte(s)) }) {
			continue
		}
		pid, err := strconv.Atoi(filepath.Base(filepath.Dir(c)))
		if err == nil && syscall.Kill(pid, syscall.SIGKILL) == nil {
			n++
		}
	}
	return n
}
