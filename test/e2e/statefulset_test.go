//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/podkeeper/podkeeper/agents/changelog"
	"github.com/podkeeper/podkeeper/agents/snapshot"
	"github.com/podkeeper/podkeeper/agents/store"
	_ "github.com/podkeeper/podkeeper/agents/store/backends"
	"github.com/podkeeper/podkeeper/test/peers"
)

const (
	nFiles   = 20   // small files, nested over 6 directories
	largeKiB = 8192 // plus one large file (multipart in the syncer, ranged in restore)
	nLines   = 500
)

var (
	reAppSIGTERM   = regexp.MustCompile(`app \S+ received terminated`)
	reAgentSIGTERM = regexp.MustCompile(`signal received, shutting down`)
	// the agents' messages, in LOG_FORMAT json ("msg":"drained") or text (msg=drained)
	reDrained  = regexp.MustCompile(`msg"?[:=]"?drained\b`)
	reRestored = regexp.MustCompile(`msg"?[:=]"?restored\b`)
)

// TestStatefulSetLifecycle is the main scenario on the real StatefulSet overlay:
// first start on an empty prefix, files and log lines shipped, pod deletion (app stopped before
// the sidecars, every file acknowledged in the change log, every line delivered), and the StatefulSet's new upload-sts-0
// getting every file back byte-identical before its app starts, with nothing uploaded again.
func TestStatefulSetLifecycle(t *testing.T) {
	needAgents(t)
	lifecycle(t, "e2e-sts", "statefulset", "app.kubernetes.io/name=upload-sts", "statefulset/upload-sts-0/")
}

// TestDeploymentLifecycle: the same checks on the Deployment variant, where podkeeper is
// attached to an existing workload through components/agents (kustomize/overlays/dev).
func TestDeploymentLifecycle(t *testing.T) {
	needAgents(t)
	lifecycle(t, "e2e-deploy", "deployment", "app.kubernetes.io/name=upload-app", "uploads/")
}

// lifecycle runs the scenario on the overlay's single-replica workload whose pods match
// selector, with the agents storing under prefix in the overlays' bucket.
func lifecycle(t *testing.T, nsName, overlay, selector, prefix string) {
	s, keys := s3Peer(t)
	recv := peers.StartOtelFwd(t)
	n := newNS(t, nsName)

	// 1. First start on an empty prefix.
	start := time.Now()
	n.applyOverlay(overlay, map[string]string{"S3_ENDPOINT": s.Endpoint, "FLUENT_ADDR": recv.Addr}, keys, "")
	pod, uid1 := n.onePod(selector, "", 2*time.Minute)
	n.waitPodReady(pod, 3*time.Minute)
	phase(t, overlay+": apply -> "+pod+" Ready (empty prefix)", start)
	restoreLog := n.mustK("logs", pod, "-c", "restore")
	events := n.mustK("get", "events", "--field-selector", "involvedObject.name="+pod, "-o", "custom-columns=REASON:.reason,MESSAGE:.message", "--no-headers")
	if !strings.Contains(restoreLog, "starting empty") && !strings.Contains(events, "Restored") {
		t.Errorf("restore on an empty prefix: neither the empty-start message nor a Restored event\n--- restore log ---\n%s\n--- events ---\n%s", restoreLog, events)
	}
	appLog := n.waitAppStarted(pod)
	for _, port := range []string{"8081", "8082"} {
		if !strings.Contains(appLog, "127.0.0.1:"+port+"/readyz: status 200") {
			t.Errorf("sidecar on :%s was not ready when the app started:\n%s", port, appLog)
		}
	}
	if got := appFiles(appLog); len(got) != 0 {
		t.Errorf("app saw files on an empty prefix: %v", got)
	}

	// 2. The app writes N files (nested, one large) and M log lines; all reach S3 and the receiver.
	start = time.Now()
	written := sumLines(n.mustK("exec", pod, "-c", "app", "--", "/upload-app", "write",
		"-files", fmt.Sprint(nFiles), "-large-kib", fmt.Sprint(largeKiB), "-lines", fmt.Sprint(nLines), "-batch", "b1"))
	if len(written) != nFiles+1 {
		t.Fatalf("app wrote %d files, want %d", len(written), nFiles+1)
	}
	n.waitFor(2*time.Minute, "every file under "+prefix+"data/", func() error {
		if d := diff(keysWithPrefix(listObjects(t, s, overlayBucket, prefix+"data/"), prefix+"data/"), pathsOf(written)); d != "" {
			return fmt.Errorf("S3 %s", d)
		}
		return nil
	})
	phase(t, fmt.Sprintf(overlay+": %d files (%d KiB large) in S3", len(written), largeKiB), start)
	start = time.Now()
	n.waitLines(recv, "b1", nLines, pod)
	phase(t, fmt.Sprintf(overlay+": %d log lines at the receiver", nLines), start)
	before := listObjects(t, s, overlayBucket, prefix+"data/")

	// 3. Delete the pod: SIGTERM to the app first, then the sidecars; every file in the change log; every line delivered.
	start = time.Now()
	fApp, fSync, fShip := n.follow(pod, "app"), n.follow(pod, "syncer"), n.follow(pod, "logshipper")
	n.waitFor(20*time.Second, "log streams attached", func() error {
		_, err := n.k("get", "pod", pod)
		return err
	})
	n.mustK("delete", "pod", pod, "--wait=false")
	appOut, syncOut, shipOut := fApp.wait(t, 90*time.Second), fSync.wait(t, 90*time.Second), fShip.wait(t, 90*time.Second)
	tApp, ok1 := firstAt(appOut, reAppSIGTERM)
	tSync, ok2 := firstAt(syncOut, reAgentSIGTERM)
	tShip, ok3 := firstAt(shipOut, reAgentSIGTERM)
	if !ok1 || !ok2 || !ok3 {
		t.Fatalf("SIGTERM not seen in every container (app %v, syncer %v, logshipper %v)\n--- app ---\n%s\n--- syncer ---\n%s\n--- logshipper ---\n%s", ok1, ok2, ok3, appOut, syncOut, shipOut)
	}
	t.Logf("SIGTERM seen: app %s, logshipper %s, syncer %s", tApp.Format(time.StampMicro), tShip.Format(time.StampMicro), tSync.Format(time.StampMicro))
	if !tApp.Before(tSync) || !tApp.Before(tShip) {
		t.Errorf("the app must get SIGTERM before the sidecars: app %s, syncer %s, logshipper %s", tApp, tSync, tShip)
	}
	if !reDrained.MatchString(syncOut) {
		t.Errorf("syncer did not report a complete drain:\n%s", syncOut)
	}
	m := latestState(t, s, prefix)
	var inSnap []string
	for _, f := range m.Files {
		inSnap = append(inSnap, f.SHA256+"  "+f.Path)
	}
	sort.Strings(inSnap)
	if d := diff(inSnap, written); d != "" {
		t.Errorf("restorable state (checkpoint + change log) vs files written: %s", d)
	}
	n.waitLines(recv, "b1", nLines, pod)
	phase(t, overlay+": delete -> app, sidecars stopped, every file in the change log", start)

	// 4. The StatefulSet brings upload-sts-0 back: every file restored byte-identical before the app starts.
	start = time.Now()
	pod, _ = n.onePod(selector, uid1, 2*time.Minute)
	n.waitPodReady(pod, 3*time.Minute)
	phase(t, overlay+": new "+pod+" Ready (restored)", start)
	appLog = n.waitAppStarted(pod)
	if d := diff(appFiles(appLog), written); d != "" {
		t.Errorf("files the new app saw at its start (sha256 computed inside the pod) vs written: %s\n%s", d, appLog)
	}
	if d := diff(appFiles(n.mustK("exec", pod, "-c", "app", "--", "/upload-app", "sums", "-dir", "/srv/uploads")), written); d != "" {
		t.Errorf("sha256 inside the new pod vs written: %s", d)
	}
	restoreLog = n.mustK("logs", pod, "-c", "restore")
	if !reRestored.MatchString(restoreLog) {
		t.Errorf("restore did not report a restore:\n%s", restoreLog)
	}
	// The syncer uploads nothing again: after a new file made it to S3 (so the syncer has
	// scanned and is uploading), every earlier object is the very object written before.
	fresh := sumLines(n.mustK("exec", pod, "-c", "app", "--", "/upload-app", "write", "-files", "1", "-batch", "b2"))
	n.waitFor(time.Minute, "the new pod's first upload", func() error {
		if _, ok := listObjects(t, s, overlayBucket, prefix+"data/")[prefix+"data/"+pathsOf(fresh)[0]]; !ok {
			return fmt.Errorf("%s not uploaded yet", pathsOf(fresh)[0])
		}
		return nil
	})
	after := listObjects(t, s, overlayBucket, prefix+"data/")
	for k, o := range before {
		if a := after[k]; a != o {
			t.Errorf("%s was uploaded again after the restore: before %+v, after %+v", k, o, a)
		}
	}
	phase(t, overlay+": restored pod uploads only new files", start)
}

// onePod waits for exactly one live pod matching selector whose UID is not notUID, and
// returns its name and UID.
func (n *ns) onePod(selector, notUID string, timeout time.Duration) (name, uid string) {
	n.t.Helper()
	n.waitFor(timeout, "one pod "+selector, func() error {
		out, err := n.k("get", "pods", "-l", selector, "-o", `jsonpath={range .items[*]}{.metadata.name} {.metadata.uid} {.metadata.deletionTimestamp}{"\n"}{end}`)
		if err != nil {
			return err
		}
		var live []string
		for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
			// a third field is the deletion time: that pod is on its way out
			if f := strings.Fields(l); len(f) == 2 && f[1] != notUID {
				live = append(live, l)
			}
		}
		if len(live) != 1 {
			return fmt.Errorf("pods %q", out)
		}
		f := strings.Fields(live[0])
		name, uid = f[0], f[1]
		return nil
	})
	return name, uid
}

// waitAppStarted returns the app's log once it has listed the files it found at start.
func (n *ns) waitAppStarted(pod string) string {
	n.t.Helper()
	var out string
	n.waitFor(time.Minute, pod+" app start listing", func() error {
		out, _ = n.k("logs", pod, "-c", "app")
		if !strings.Contains(out, "end of files present at start") {
			return fmt.Errorf("app has not listed its files yet: %q", out)
		}
		return nil
	})
	return out
}

// appFiles is the app's start listing without podkeeper's own state directory (restore's
// marker and the syncer's journals live in the shared volume under .podkeeper/).
func appFiles(log string) []string {
	if i := strings.Index(log, "end of files present at start"); i >= 0 {
		log = log[:i]
	}
	var out []string
	for _, l := range sumLines(log) {
		if !strings.HasPrefix(l[66:], ".podkeeper/") {
			out = append(out, l)
		}
	}
	return out
}

// waitLines waits until the receiver holds every line of batch, each carrying the pod's
// name and namespace, then checks that they also carry the pod's labels (reported on its own,
// so a missing label does not hide what the rest of the scenario shows).
func (n *ns) waitLines(recv *peers.LogReceiver, batch string, want int, pod string) {
	n.t.Helper()
	var unlabelled int
	var example peers.LogRecord
	n.waitFor(2*time.Minute, fmt.Sprintf("%d %s lines at the receiver", want, batch), func() error {
		recs, err := recv.Records()
		if err != nil {
			return err
		}
		seen := map[string]bool{}
		unlabelled = 0
		for _, r := range recs {
			if !strings.Contains(r.Log, "upload-app "+batch+" line ") {
				continue
			}
			if r.Attrs["pod"] != pod || r.Attrs["namespace"] != n.name {
				return fmt.Errorf("record without the pod's name and namespace: %+v", r)
			}
			if l, _ := r.Attrs["labels"].(map[string]any); l["app.kubernetes.io/name"] == nil {
				unlabelled++
				example = r
			}
			seen[r.Log[strings.Index(r.Log, "line "):]] = true
		}
		if len(seen) != want {
			return fmt.Errorf("%d distinct %s lines of %d (%d records in all)", len(seen), batch, want, len(recs))
		}
		return nil
	})
	if unlabelled > 0 {
		n.t.Errorf("%d %s records without the pod's labels, e.g. %+v", unlabelled, batch, example)
	}
}

// latestState is what a restore started now would bring back: the fold of the
// prefix's change log (newest checkpoint + every batch after it), read straight
// from S3. The syncer acknowledges an upload only once its batch is stored, so
// after a clean drain every file is in it, whether or not a checkpoint was written.
func latestState(t *testing.T, s *peers.S3Server, prefix string) *snapshot.Manifest {
	t.Helper()
	m, err := foldState(t, s, prefix)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// foldState is latestState returning the error (none yet is one: "no checkpoint and no change log").
func foldState(t *testing.T, s *peers.S3Server, prefix string) (*snapshot.Manifest, error) {
	t.Helper()
	c := s.StoreConfig(t, "x")
	c.Bucket, c.Prefix = overlayBucket, strings.TrimSuffix(prefix, "/")
	c.URL = "s3://" + c.Bucket + "/" + c.Prefix
	st, err := store.Open(context.Background(), c, nil)
	if err != nil {
		t.Fatal(err)
	}
	m, err := changelog.Fold(context.Background(), st, time.Time{})
	if err != nil {
		return nil, fmt.Errorf("fold of %s: %w", prefix, err)
	}
	return m, nil
}
