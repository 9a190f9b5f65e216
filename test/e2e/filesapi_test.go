//go:build e2e

package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// TestFilesAPIAttached: kustomize/examples/files-api exactly as its user writes it — podkeeper
// fetched by kustomize from git (a local clone of this tree's kustomize/, tagged like the example
// pins), the team's Deployment with its own ServiceAccount, user and fsGroup 1000, a 300 s grace
// period and a migrate init container — on the real kubelet. The rig only swaps what it must: the
// images (nothing can be pulled), hostNetwork and the loopback S3 server. Proves: the Pod runs as
// the team wrote it (ServiceAccount, user, fsGroup, grace period), the agents run as 65532 next to
// an app running as 1000, migrate runs before restore, what the app (uid 1000) writes reaches S3,
// and a new Pod gets every file back before its app starts.
func TestFilesAPIAttached(t *testing.T) {
	needAgents(t)
	s, keys := s3Peer(t)
	n := newNS(t, "e2e-files-api")
	start := time.Now()
	dir := filesAPIKustomization(t, n.name, s.Endpoint)
	rendered, err := kubectl(n.ctx, "", "kustomize", dir)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := n.k("create", "secret", "generic", "podkeeper-s3",
		"--from-literal=AWS_ACCESS_KEY_ID="+keys["AWS_ACCESS_KEY_ID"], "--from-literal=AWS_SECRET_ACCESS_KEY="+keys["AWS_SECRET_ACCESS_KEY"]); err != nil {
		t.Fatal(err)
	}
	n.mustApply(rendered)
	const selector, prefix = "app.kubernetes.io/name=files-api", "files-api/"
	pod, uid1 := n.onePod(selector, "", 2*time.Minute)
	n.waitPodReady(pod, 3*time.Minute)
	phase(t, "files-api: apply -> "+pod+" Ready", start)

	// The Pod as the API holds it: the team's settings, the agents after migrate, as 65532.
	var p struct {
		Spec struct {
			ServiceAccountName            string `json:"serviceAccountName"`
			TerminationGracePeriodSeconds int    `json:"terminationGracePeriodSeconds"`
			SecurityContext               struct {
				RunAsUser, FSGroup int
			} `json:"securityContext"`
			InitContainers []struct {
				Name            string
				SecurityContext struct{ RunAsUser int } `json:"securityContext"`
			} `json:"initContainers"`
		}
		Status struct {
			InitContainerStatuses []struct {
				Name  string
				State struct {
					Terminated *struct{ StartedAt, FinishedAt time.Time }
					Running    *struct{ StartedAt time.Time }
				}
			} `json:"initContainerStatuses"`
		}
	}
	if err := json.Unmarshal([]byte(n.mustK("get", "pod", pod, "-o", "json")), &p); err != nil {
		t.Fatal(err)
	}
	if p.Spec.ServiceAccountName != "files-api" || p.Spec.TerminationGracePeriodSeconds != 300 ||
		p.Spec.SecurityContext.RunAsUser != 1000 || p.Spec.SecurityContext.FSGroup != 1000 {
		t.Errorf("the team's Pod settings were changed: %+v", p.Spec)
	}
	var order []string
	for _, c := range p.Spec.InitContainers {
		order = append(order, c.Name)
		if (c.Name == "restore" || c.Name == "syncer") && c.SecurityContext.RunAsUser != 65532 {
			t.Errorf("%s runs as %d, want 65532", c.Name, c.SecurityContext.RunAsUser)
		}
	}
	if !slices.Equal(order, []string{"migrate", "restore", "syncer"}) {
		t.Errorf("init containers %v, want migrate, restore, syncer", order)
	}
	checkMigrateFirst := func(pod string) {
		t.Helper()
		json.Unmarshal([]byte(n.mustK("get", "pod", pod, "-o", "json")), &p)
		var migrateDone, restoreStart time.Time
		for _, st := range p.Status.InitContainerStatuses {
			switch {
			case st.Name == "migrate" && st.State.Terminated != nil:
				migrateDone = st.State.Terminated.FinishedAt
			case st.Name == "restore" && st.State.Terminated != nil:
				restoreStart = st.State.Terminated.StartedAt
			}
		}
		if migrateDone.IsZero() || restoreStart.IsZero() || restoreStart.Before(migrateDone) {
			t.Errorf("%s: migrate finished %v, restore started %v: migrate must run first", pod, migrateDone, restoreStart)
		}
	}
	checkMigrateFirst(pod)

	// The app, running as 1000, writes files; the syncer (65532, fsGroup 1000) uploads them.
	start = time.Now()
	written := sumLines(n.mustK("exec", pod, "-c", "api", "--", "/upload-app", "write", "-dir", "/var/lib/files-api/app", "-files", "12", "-batch", "b1"))
	if len(written) != 12 {
		t.Fatalf("app wrote %d files, want 12", len(written))
	}
	var want []string
	for _, p := range pathsOf(written) {
		want = append(want, "app/"+p)
	}
	n.waitFor(2*time.Minute, "every file under "+prefix+"data/app/", func() error {
		if d := diff(keysWithPrefix(listObjects(t, s, overlayBucket, prefix+"data/"), prefix+"data/"), want); d != "" {
			return fmt.Errorf("S3 %s", d)
		}
		return nil
	})
	phase(t, "files-api: files of uid 1000 in S3", start)

	// A new Pod: migrate still runs first (on an empty volume), restore brings every file back
	// before the app starts.
	start = time.Now()
	n.mustK("delete", "pod", pod, "--wait=false")
	pod, _ = n.onePod(selector, uid1, 3*time.Minute)
	n.waitPodReady(pod, 3*time.Minute)
	phase(t, "files-api: new "+pod+" Ready (restored)", start)
	checkMigrateFirst(pod)
	if got := sumLines(n.mustK("logs", pod, "-c", "migrate")); len(got) != 0 {
		t.Errorf("migrate saw files, so it ran after restore: %v", got)
	}
	var appLog string
	n.waitFor(time.Minute, pod+" api start listing", func() error {
		appLog, _ = n.k("logs", pod, "-c", "api")
		if !strings.Contains(appLog, "end of files present at start") {
			return fmt.Errorf("api has not listed its files yet: %q", appLog)
		}
		return nil
	})
	if d := diff(appFiles(appLog), written); d != "" {
		t.Errorf("files the new app (uid 1000) saw at its start vs written: %s\n%s", d, appLog)
	}
}

// filesAPIKustomization writes a kustomization that includes kustomize/examples/files-api as its
// user has it, podkeeper's address pointed at a file:// clone, plus what the offline rig needs.
func filesAPIKustomization(t *testing.T, namespace, s3Endpoint string) string {
	t.Helper()
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	root := filepath.Join(wd, "..", "..")
	example := filepath.Join(root, "kustomize", "examples", "files-api")
	k, err := os.ReadFile(filepath.Join(example, "kustomization.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	ref := ""
	if i := strings.Index(string(k), "?ref="); i >= 0 {
		ref = strings.Fields(string(k)[i+len("?ref="):])[0]
	}
	if ref == "" {
		t.Fatal("files-api example pins no ?ref=")
	}
	// The clone: this tree's kustomize/ committed and tagged.
	repo := t.TempDir()
	if err := os.CopyFS(filepath.Join(repo, "kustomize"), os.DirFS(filepath.Join(root, "kustomize"))); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{{"init", "-q", "-b", "main"}, {"add", "-A"}, {"commit", "-q", "-m", "tree under test"}, {"tag", ref}} {
		cmd := exec.Command("git", append([]string{"-c", "user.email=e2e@podkeeper", "-c", "user.name=e2e", "-c", "commit.gpgsign=false"}, args...)...)
		cmd.Dir = repo
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("git %v: %v\n%s", args, err, out)
		}
	}
	dir := t.TempDir()
	ex := filepath.Join(dir, "files-api")
	os.MkdirAll(ex, 0o755)
	os.WriteFile(filepath.Join(ex, "kustomization.yaml"), []byte(strings.ReplaceAll(string(k), "https://github.com/podkeeper/podkeeper", "file://"+repo)), 0o644)
	app, err := os.ReadFile(filepath.Join(example, "files-api.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(ex, "files-api.yaml"), app, 0o644)
	outer := fmt.Sprintf(`apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
namespace: %[1]s
resources:
- files-api
images:
- {name: registry.example.com/mirror/podkeeper-restore, newName: docker.io/podkeeper/agents, newTag: e2e}
- {name: registry.example.com/mirror/podkeeper-syncer, newName: docker.io/podkeeper/agents, newTag: e2e}
- {name: ghcr.io/example/files-api, newName: podkeeper.local/upload-app, newTag: e2e}
patches:
- target: {kind: ConfigMap, name: podkeeper}
  patch: |-
    - {op: add, path: /data/S3_ENDPOINT, value: %[2]q}
    - {op: replace, path: /data/S3_REGION, value: us-east-1}
    - {op: add, path: /data/KUBERNETES_SERVICE_HOST, value: 127.0.0.1}
    - {op: add, path: /data/KUBERNETES_SERVICE_PORT, value: %[3]q}
# The rig: hostNetwork (see the sandbox component), the test app in files-api's two containers.
# The team's containers are addressed by position, guarded by test: they are the team's own.
- target: {group: apps, kind: Deployment, name: files-api}
  patch: |-
    - {op: add, path: /spec/template/spec/hostNetwork, value: true}
    - {op: replace, path: /spec/template/metadata/annotations/podkeeper.io~1store-url, value: "s3://%[4]s/files-api"}
    - {op: test, path: /spec/template/spec/initContainers/0/name, value: migrate}
    - {op: add, path: /spec/template/spec/initContainers/0/imagePullPolicy, value: Never}
    - {op: add, path: /spec/template/spec/initContainers/0/command, value: [/upload-app]}
    - {op: replace, path: /spec/template/spec/initContainers/0/args, value: [sums, -dir, /var/lib/files-api/app]}
    - {op: test, path: /spec/template/spec/containers/0/name, value: api}
    - {op: add, path: /spec/template/spec/containers/0/imagePullPolicy, value: Never}
    - {op: add, path: /spec/template/spec/containers/0/command, value: [/upload-app]}
    - {op: replace, path: /spec/template/spec/containers/0/args, value: [run]}
    - op: add
      path: /spec/template/spec/containers/0/env
      value:
      - {name: APP_DATA_DIR, value: /var/lib/files-api/app}
      - {name: APP_HTTP_ADDR, value: ":8080"}
      - {name: APP_CHECK_READY, value: "http://127.0.0.1:8081/readyz"}
      - name: POD_NAME
        valueFrom: {fieldRef: {fieldPath: metadata.name}}
`, namespace, s3Endpoint, apiserverPort(), overlayBucket)
	os.WriteFile(filepath.Join(dir, "kustomization.yaml"), []byte(outer), 0o644)
	return dir
}
