//go:build e2e

package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/podkeeper/podkeeper/test/peers"
)

// TestInjectorAttached: the admission webhook (cmd/injector) attaches the agents to a plain
// Deployment on the real kubelet. The injector runs on loopback (the rig's API server calls it by
// URL, as in test/k8s's TestAPIInjector) as the ServiceAccount of manifests/injector.yaml, whose RBAC
// is applied, so it creates its TLS Secret and sets the caBundle itself. The Deployment is what a
// team writes: no kustomize, no agents, only the annotations podkeeper.io/inject and
// podkeeper.io/store-url; the namespace holds what the agents read (ConfigMap podkeeper, Secret
// podkeeper-s3, the agents' Role bound to the Pod's ServiceAccount). Proves: the Pod as created has
// restore + syncer + logshipper as native sidecars (the Deployment's template has none), it becomes
// Ready, what the app writes reaches S3 and the log receiver, the Pod is deleted (the syncer
// drains) and the ReplicaSet's new Pod, injected again, restores every file byte-identical
// before its app starts.
func TestInjectorAttached(t *testing.T) {
	needAgents(t)
	s, keys := s3Peer(t)
	recv := peers.StartOtelFwd(t)
	n := newNS(t, "e2e-injector")

	start := time.Now()
	inj := startInjector(t, n)
	phase(t, "injector: build, RBAC, webhook configuration, Secret + caBundle, API server calls it", start)

	// What the agents read in the team's namespace (manifests/config.yaml and manifests/rbac.yaml,
	// with this run's values), and the team's Deployment.
	const selector, prefix, agentsImage = "app.kubernetes.io/name=files", "injected/", "docker.io/podkeeper/agents:e2e"
	start = time.Now()
	var apply []any
	for _, o := range n.objects(readRepoFile(t, "manifests/config.yaml") + "\n---\n" + readRepoFile(t, "manifests/rbac.yaml")) {
		md := o["metadata"].(map[string]any)
		delete(md, "namespace")
		switch o["kind"].(string) + "/" + md["name"].(string) {
		case "ConfigMap/podkeeper":
			d := o["data"].(map[string]any)
			d["S3_ENDPOINT"], d["FLUENT_ADDR"] = s.Endpoint, recv.Addr
			d["KUBERNETES_SERVICE_HOST"], d["KUBERNETES_SERVICE_PORT"] = "127.0.0.1", apiserverPort()
		case "Secret/podkeeper-s3":
			o["stringData"] = map[string]any{"AWS_ACCESS_KEY_ID": keys["AWS_ACCESS_KEY_ID"], "AWS_SECRET_ACCESS_KEY": keys["AWS_SECRET_ACCESS_KEY"]}
		case "ServiceAccount/podkeeper":
			continue // the Pod's own ServiceAccount (files) gets the agents' Role
		case "RoleBinding/podkeeper-agents":
			o["subjects"] = []any{map[string]any{"kind": "ServiceAccount", "name": "files", "namespace": n.name}}
		}
		apply = append(apply, o)
	}
	apply = append(apply, map[string]any{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": map[string]any{"name": "files"},
		"automountServiceAccountToken": false}, filesDeployment(prefix))
	applyJSON(t, n, n.name, apply...)
	pod, uid1 := n.onePod(selector, "", 2*time.Minute)

	// The Pod as the API holds it: the agents were added at admission, nothing else changed.
	if tmpl := n.jsonpath("deployment/files", "{.spec.template.spec.initContainers}"); tmpl != "" {
		t.Fatalf("the Deployment's template has init containers: %s", tmpl)
	}
	checkInjected := func(pod string) {
		t.Helper()
		var p struct {
			Metadata struct{ Annotations map[string]string }
			Spec     struct {
				ServiceAccountName string `json:"serviceAccountName"`
				HostNetwork        bool   `json:"hostNetwork"`
				InitContainers     []struct {
					Name, Image   string
					RestartPolicy string `json:"restartPolicy"`
				} `json:"initContainers"`
				Containers []struct{ Name string }
				Volumes    []struct{ Name string }
			}
		}
		if err := json.Unmarshal([]byte(n.mustK("get", "pod", pod, "-o", "json")), &p); err != nil {
			t.Fatal(err)
		}
		var inits, conts, vols []string
		for _, c := range p.Spec.InitContainers {
			inits = append(inits, c.Name)
			if want := map[bool]string{true: "Always", false: ""}[c.Name != "restore"]; c.RestartPolicy != want {
				t.Errorf("%s: %s has restartPolicy %q, want %q", pod, c.Name, c.RestartPolicy, want)
			}
			if c.Image != agentsImage {
				t.Errorf("%s: %s runs %s, want %s (the injector's defaults)", pod, c.Name, c.Image, agentsImage)
			}
		}
		for _, c := range p.Spec.Containers {
			conts = append(conts, c.Name)
		}
		for _, v := range p.Spec.Volumes {
			vols = append(vols, v.Name)
		}
		if !slices.Equal(inits, []string{"restore", "syncer", "logshipper"}) || !slices.Equal(conts, []string{"app"}) {
			t.Fatalf("%s: init containers %v, containers %v; want restore, syncer, logshipper (native sidecars) and app", pod, inits, conts)
		}
		slices.Sort(vols)
		if !slices.Equal(vols, []string{"logs", "podkeeper-kube-api", "podkeeper-state", "uploads"}) {
			t.Errorf("%s: volumes %v, want the Pod's uploads and logs plus podkeeper-kube-api and podkeeper-state", pod, vols)
		}
		if a := p.Metadata.Annotations["podkeeper.io/injected"]; a != "restore,syncer,logshipper (native)" {
			t.Errorf("%s: podkeeper.io/injected %q", pod, a)
		}
		if p.Spec.ServiceAccountName != "files" || !p.Spec.HostNetwork {
			t.Errorf("%s: the team's Pod settings changed: serviceAccountName %q hostNetwork %v", pod, p.Spec.ServiceAccountName, p.Spec.HostNetwork)
		}
	}
	checkInjected(pod)
	n.waitPodReady(pod, 3*time.Minute)
	phase(t, "injector: apply Deployment -> "+pod+" injected, Ready (empty prefix)", start)
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

	// The app writes files (nested, one large) and log lines: all reach S3 and the receiver.
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
	phase(t, fmt.Sprintf("injector: %d files (%d KiB large) in S3", len(written), largeKiB), start)
	start = time.Now()
	n.waitLines(recv, "b1", nLines, pod)
	phase(t, fmt.Sprintf("injector: %d log lines at the receiver", nLines), start)

	// Kill: the Pod is deleted; the syncer drains (every file uploaded and in the change log).
	start = time.Now()
	fSync := n.follow(pod, "syncer")
	n.waitFor(20*time.Second, "log stream attached", func() error {
		_, err := n.k("get", "pod", pod)
		return err
	})
	n.mustK("delete", "pod", pod, "--wait=false")
	syncOut := fSync.wait(t, 90*time.Second)
	if !reDrained.MatchString(syncOut) {
		t.Errorf("syncer did not report a complete drain:\n%s", syncOut)
	}
	// (No snapshots/ checkpoint is asserted: "drained" means every file is uploaded and in the
	// prefix's change log, which is what restore folds; checkpoints come every SYNC_SNAPSHOT_INTERVAL.)
	phase(t, "injector: delete -> syncer drained", start)

	// The ReplicaSet's new Pod goes through the webhook again and gets every file back,
	// byte-identical, before its app starts.
	start = time.Now()
	pod, _ = n.onePod(selector, uid1, 3*time.Minute)
	checkInjected(pod)
	n.waitPodReady(pod, 3*time.Minute)
	phase(t, "injector: new "+pod+" injected, Ready (restored)", start)
	appLog = n.waitAppStarted(pod)
	if d := diff(appFiles(appLog), written); d != "" {
		t.Errorf("files the new app saw at its start (sha256 computed inside the pod) vs written: %s\n%s", d, appLog)
	}
	if d := diff(appFiles(n.mustK("exec", pod, "-c", "app", "--", "/upload-app", "sums", "-dir", "/srv/uploads")), written); d != "" {
		t.Errorf("sha256 inside the new pod vs written: %s", d)
	}
	if restoreLog = n.mustK("logs", pod, "-c", "restore"); !reRestored.MatchString(restoreLog) {
		t.Errorf("restore did not report a restore:\n%s", restoreLog)
	}
	if met := inj.metrics(t); !strings.Contains(met, `podkeeper_injector_admissions_total{result="injected"}`) {
		t.Errorf("the injector counted no injected admission:\n%s", met)
	}
}

// filesDeployment is a team's plain Deployment asking the injector for the agents: the test app
// (test/e2e/app) with its uploads and logs volumes under the injector's default names, hostNetwork
// as every e2e workload (test/e2e/overlay/sandbox), the image imported, never pulled. The app's
// port is declared, so on hostNetwork a replacement Pod is scheduled only once the old one is gone.
func filesDeployment(prefix string) map[string]any {
	type m = map[string]any
	labels := m{"app.kubernetes.io/name": "files"}
	return m{"apiVersion": "apps/v1", "kind": "Deployment", "metadata": m{"name": "files", "labels": labels},
		"spec": m{"replicas": 1, "selector": m{"matchLabels": labels}, "template": m{
			"metadata": m{"labels": labels, "annotations": m{
				"podkeeper.io/inject":    "true",
				"podkeeper.io/store-url": "s3://" + overlayBucket + "/" + strings.TrimSuffix(prefix, "/"),
			}},
			"spec": m{
				"serviceAccountName":            "files",
				"automountServiceAccountToken":  false,
				"hostNetwork":                   true,
				"terminationGracePeriodSeconds": 60,
				"securityContext": m{"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532,
					"seccompProfile": m{"type": "RuntimeDefault"}},
				"volumes": []any{m{"name": "uploads", "emptyDir": m{}}, m{"name": "logs", "emptyDir": m{}}},
				"containers": []any{m{
					"name": "app", "image": appImage, "imagePullPolicy": "Never",
					"command": []any{"/upload-app"}, "args": []any{"run"},
					"ports": []any{m{"name": "http", "containerPort": 8080}},
					"env": []any{
						m{"name": "APP_DATA_DIR", "value": "/srv/uploads"},
						m{"name": "APP_LOG_FILE", "value": "/var/log/app/app.log"},
						m{"name": "APP_HTTP_ADDR", "value": ":8080"},
						m{"name": "APP_CHECK_READY", "value": "http://127.0.0.1:8081/readyz,http://127.0.0.1:8082/readyz"},
						m{"name": "POD_NAME", "valueFrom": m{"fieldRef": m{"fieldPath": "metadata.name"}}},
					},
					"volumeMounts":   []any{m{"name": "uploads", "mountPath": "/srv/uploads"}, m{"name": "logs", "mountPath": "/var/log/app"}},
					"readinessProbe": m{"tcpSocket": m{"port": "http"}, "periodSeconds": 2},
					"securityContext": m{"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
						"capabilities": m{"drop": []any{"ALL"}}},
				}},
			},
		}}}
}

type injectorProc struct {
	health int
	log    *peers.LockedBuffer
}

func (p *injectorProc) metrics(t *testing.T) string {
	t.Helper()
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/metrics", p.health))
	if err != nil {
		t.Errorf("injector metrics: %v", err)
		return ""
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// startInjector builds cmd/injector and runs it on loopback as the injector's ServiceAccount
// (manifests/injector.yaml's Namespace, ServiceAccount and RBAC applied; a token from the
// TokenRequest API, as the kubelet would mount it). The manifest's MutatingWebhookConfiguration is
// applied with its clientConfig pointed at the process by URL and limited to n's namespace (the
// other scenarios' Pods are not its business). The injector creates its Secret and sets the
// caBundle; it is ready when /readyz says so and the API server's dry-run of an annotated Pod in n
// comes back with the agents (the API server has picked the caBundle up). Agents' images: the e2e
// image, through the injector's defaults (the ConfigMap's files).
func startInjector(t *testing.T, n *ns) *injectorProc {
	t.Helper()
	const injNS, mwcName = "podkeeper-injector", "podkeeper-injector"
	dir := t.TempDir()
	start := time.Now()
	bin := filepath.Join(dir, "injector")
	build := exec.Command("go", "build", "-o", bin, "./cmd/injector")
	build.Dir = repoRoot(t)
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build ./cmd/injector: %v\n%s", err, out)
	}
	phase(t, "injector: go build ./cmd/injector", start)

	var rbac []any
	var mwc map[string]any
	for _, o := range n.objects(readRepoFile(t, "manifests/injector.yaml")) {
		switch o["kind"] {
		case "Namespace": // first: the others live in it
			rbac = append([]any{o}, rbac...)
		case "ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding":
			rbac = append(rbac, o)
		case "MutatingWebhookConfiguration":
			mwc = o
		}
	}
	if len(rbac) != 6 || mwc == nil {
		t.Fatalf("manifests/injector.yaml: %d of the 6 RBAC objects, webhook configuration %v", len(rbac), mwc != nil)
	}
	kubectl(n.ctx, "", "delete", "mutatingwebhookconfiguration", mwcName, "--ignore-not-found")
	kubectl(n.ctx, "", "-n", injNS, "delete", "secret", "podkeeper-injector-tls", "--ignore-not-found")
	applyJSON(t, n, "", rbac...)
	t.Cleanup(func() {
		js, _ := json.Marshal(map[string]any{"apiVersion": "v1", "kind": "List", "items": rbac})
		if _, err := kubectl(n.ctx, string(js), "delete", "--ignore-not-found", "--wait=true", "--timeout=90s", "-f", "-"); err != nil {
			t.Logf("cleanup: %v", err)
		}
	})

	p := &injectorProc{health: loopbackPort(t), log: &peers.LockedBuffer{}}
	port := loopbackPort(t)
	for _, h := range mwc["webhooks"].([]any) {
		h := h.(map[string]any)
		cc := h["clientConfig"].(map[string]any)
		h["clientConfig"] = map[string]any{"url": fmt.Sprintf("https://127.0.0.1:%d%s", port, cc["service"].(map[string]any)["path"])}
		sel := h["namespaceSelector"].(map[string]any)
		sel["matchExpressions"] = append(sel["matchExpressions"].([]any),
			map[string]any{"key": "kubernetes.io/metadata.name", "operator": "In", "values": []any{n.name}})
	}
	applyJSON(t, n, "", mwc)
	t.Cleanup(func() {
		if _, err := kubectl(n.ctx, "", "delete", "mutatingwebhookconfiguration", mwcName, "--ignore-not-found"); err != nil {
			t.Logf("cleanup: %v", err)
		}
	})

	// A kubeconfig with the ServiceAccount's token and the cluster of $KUBECONFIG.
	token, err := kubectl(n.ctx, "", "-n", injNS, "create", "token", "podkeeper-injector", "--duration=2h")
	if err != nil {
		t.Fatal(err)
	}
	raw, err := kubectl(n.ctx, "", "config", "view", "--raw", "--minify", "--flatten", "-o", "json")
	if err != nil {
		t.Fatal(err)
	}
	var kc struct {
		Clusters []struct {
			Cluster struct {
				Server string `json:"server"`
				CA     string `json:"certificate-authority-data"`
			} `json:"cluster"`
		} `json:"clusters"`
	}
	if err := json.Unmarshal([]byte(raw), &kc); err != nil || len(kc.Clusters) != 1 {
		t.Fatalf("kubectl config view: %v %s", err, raw)
	}
	kcFile := filepath.Join(dir, "kubeconfig")
	os.WriteFile(kcFile, []byte(fmt.Sprintf(`apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: %q, certificate-authority-data: %q}}]
users: [{name: u, user: {token: %q}}]
contexts: [{name: c, context: {cluster: c, user: u}}]
current-context: c
`, kc.Clusters[0].Cluster.Server, kc.Clusters[0].Cluster.CA, strings.TrimSpace(token))), 0o600)
	// The injector's ConfigMap: the agents' image as the rig has it.
	defaults := filepath.Join(dir, "defaults")
	os.Mkdir(defaults, 0o755)
	for _, a := range []string{"restore", "syncer", "logshipper"} {
		os.WriteFile(filepath.Join(defaults, a+"-image"), []byte("docker.io/podkeeper/agents:e2e"), 0o644)
	}

	start = time.Now()
	cmd := exec.Command(bin, "-namespace", injNS, "-listen", fmt.Sprintf("127.0.0.1:%d", port),
		"-health-addr", fmt.Sprintf("127.0.0.1:%d", p.health), "-extra-sans", "127.0.0.1",
		"-kubeconfig", kcFile, "-defaults-dir", defaults, "-shutdown-delay", "0s")
	cmd.Stdout, cmd.Stderr = p.log, p.log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(15 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
		if t.Failed() {
			t.Logf("--- injector log ---\n%s", p.log)
		}
	})
	n.waitFor(60*time.Second, "injector /readyz", func() error {
		select {
		case <-exited:
			t.Fatalf("the injector exited:\n%s", p.log)
		default:
		}
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/readyz", p.health))
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			return fmt.Errorf("/readyz %d", resp.StatusCode)
		}
		return nil
	})
	// The caBundle the injector set is its Secret's CA.
	secretCA, err := kubectl(n.ctx, "", "-n", injNS, "get", "secret", "podkeeper-injector-tls", "-o", `jsonpath={.data.ca\.crt}`)
	if err != nil || secretCA == "" {
		t.Fatalf("the injector's Secret: %v %q", err, secretCA)
	}
	bundles, err := kubectl(n.ctx, "", "get", "mutatingwebhookconfiguration", mwcName, "-o", "jsonpath={.webhooks[*].clientConfig.caBundle}")
	if err != nil {
		t.Fatal(err)
	}
	if b := strings.Fields(bundles); len(b) != 2 || b[0] != secretCA || b[1] != secretCA {
		t.Fatalf("caBundles %q are not the Secret's ca.crt", bundles)
	}
	phase(t, "injector: start -> Secret created, caBundle set, ready", start)

	// The API server calls it (and not an earlier configuration without the caBundle).
	start = time.Now()
	// (The team's ServiceAccount does not exist yet: the probe runs as "default".)
	spec := filesDeployment("probe/")["spec"].(map[string]any)["template"].(map[string]any)["spec"].(map[string]any)
	delete(spec, "serviceAccountName")
	probe, _ := json.Marshal(map[string]any{"apiVersion": "v1", "kind": "Pod",
		"metadata": map[string]any{"name": "injector-probe", "annotations": map[string]any{
			"podkeeper.io/inject": "true", "podkeeper.io/store-url": "s3://" + overlayBucket + "/probe"}},
		"spec": spec})
	n.waitFor(60*time.Second, "the API server's dry-run of an annotated Pod to come back with the agents", func() error {
		out, err := kubectl(n.ctx, string(probe), "-n", n.name, "create", "--dry-run=server", "-o", "jsonpath={.spec.initContainers[*].name}", "-f", "-")
		if err != nil {
			return err
		}
		if out != "restore syncer logshipper" {
			return fmt.Errorf("init containers %q", out)
		}
		return nil
	})
	phase(t, "injector: API server's dry-run Pod injected", start)
	return p
}

// applyJSON applies objects (a List, in this order) in namespace ("": the objects name their own,
// or are cluster-scoped).
func applyJSON(t *testing.T, n *ns, namespace string, objs ...any) {
	t.Helper()
	js, _ := json.Marshal(map[string]any{"apiVersion": "v1", "kind": "List", "items": objs})
	args := []string{"apply", "-f", "-"}
	if namespace != "" {
		args = append([]string{"-n", namespace}, args...)
	}
	if _, err := kubectl(n.ctx, string(js), args...); err != nil {
		t.Fatalf("%v\n--- objects ---\n%s", err, js)
	}
}

func repoRoot(t *testing.T) string {
	t.Helper()
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Join(wd, "..", "..")
}

func readRepoFile(t *testing.T, rel string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(repoRoot(t), rel))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func loopbackPort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}
