package k8s

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/podkeeper/podkeeper/agents/config"
	"github.com/podkeeper/podkeeper/agents/events"
	"github.com/podkeeper/podkeeper/agents/kube"
	"github.com/podkeeper/podkeeper/test/peers"
)

// api is a kube-apiserver started by test/k8s/check.sh. These tests need it
// and are the one kind of test allowed to skip: `make test` has no apiserver,
// `make k8s-check` always sets PODKEEPER_K8S_API=1.
type api struct {
	host   string
	caFile string
	admin  *http.Client
}

func needAPI(t *testing.T) *api {
	t.Helper()
	if os.Getenv("PODKEEPER_K8S_API") != "1" {
		t.Skip("needs the kube-apiserver of test/k8s/check.sh (make k8s-check)")
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", os.Getenv("PODKEEPER_K8S_KUBECONFIG"))
	if err != nil {
		t.Fatal(err)
	}
	hc, err := rest.HTTPClientFor(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return &api{host: cfg.Host, caFile: cfg.CAFile, admin: hc}
}

type reply struct {
	code     int
	body     []byte
	warnings []string
}

func (a *api) do(t *testing.T, c *http.Client, token, method, path string, body any) reply {
	t.Helper()
	var rd io.Reader
	ctype := "application/json"
	switch b := body.(type) {
	case nil:
	case string: // a merge patch
		rd, ctype = strings.NewReader(b), "application/merge-patch+json"
	default:
		j, err := json.Marshal(b)
		if err != nil {
			t.Fatal(err)
		}
		rd = bytes.NewReader(j)
	}
	req, err := http.NewRequestWithContext(t.Context(), method, a.host+path, rd)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", ctype)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return reply{resp.StatusCode, b, resp.Header.Values("Warning")}
}

// tokenClient is an HTTP client that trusts the apiserver's CA and sends no
// client certificate: a token is its only identity.
func (a *api) tokenClient(t *testing.T) *http.Client {
	ca, err := os.ReadFile(a.caFile)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ca)
	return &http.Client{Timeout: 20 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
}

// saToken asks the TokenRequest API for a real token of ns/sa, as the kubelet
// does for a projected service-account token.
func (a *api) saToken(t *testing.T, ns, sa string) string {
	t.Helper()
	r := a.do(t, a.admin, "", "POST", fmt.Sprintf("/api/v1/namespaces/%s/serviceaccounts/%s/token", ns, sa),
		obj{"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": obj{"expirationSeconds": 600}})
	if r.code != 201 {
		t.Fatalf("token for %s/%s: %d %s", ns, sa, r.code, r.body)
	}
	var out struct{ Status struct{ Token string } }
	json.Unmarshal(r.body, &out)
	return out.Status.Token
}

// barePod turns a workload's pod template into a Pod.
func barePod(o obj, name string) obj {
	labels, _ := get(o, "spec", "template", "metadata", "labels").(obj)
	if o["kind"] == "Pod" {
		labels, _ = get(o, "metadata", "labels").(obj)
	}
	return obj{"apiVersion": "v1", "kind": "Pod",
		"metadata": obj{"name": name, "namespace": str(o, "metadata", "namespace"), "labels": labels},
		"spec":     podSpec(o)}
}

// PSA only warns about Deployments and StatefulSets; on a Pod it rejects. So
// every pod template is also sent as a bare Pod (dry-run): accepted, without
// a warning. And a Pod that drops one restricted setting is rejected, which
// proves the namespaces really enforce.
func TestAPIBarePods(t *testing.T) {
	a := needAPI(t)
	files, _ := filepath.Glob(filepath.Join(os.Getenv("PODKEEPER_K8S_RENDERED"), "*.yaml"))
	if len(files) < 4 {
		t.Fatalf("rendered files: %v", files)
	}
	pods := 0
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, o := range parseDocs(t, f, b) {
			if podSpec(o) == nil {
				continue
			}
			ns := str(o, "metadata", "namespace")
			pod := barePod(o, "bare-"+str(o, "metadata", "name"))
			r := a.do(t, a.admin, "", "POST", "/api/v1/namespaces/"+ns+"/pods?dryRun=All", pod)
			if r.code != 201 || len(r.warnings) > 0 {
				t.Errorf("%s %s/%s as a bare Pod: %d %v %s", filepath.Base(f), ns, str(o, "metadata", "name"), r.code, r.warnings, r.body)
			}
			pods++
			// The same Pod without seccomp must be refused by PSA.
			spec := podSpec(o)
			delete(get(spec, "securityContext").(obj), "seccompProfile")
			for _, c := range append(list(spec, "initContainers"), list(spec, "containers")...) {
				delete(get(c, "securityContext").(obj), "seccompProfile")
			}
			r = a.do(t, a.admin, "", "POST", "/api/v1/namespaces/"+ns+"/pods?dryRun=All", pod)
			if r.code != 403 || !strings.Contains(string(r.body), "PodSecurity") {
				t.Errorf("%s/%s without seccomp: want 403 from PodSecurity, got %d %s", ns, str(o, "metadata", "name"), r.code, r.body)
			}
		}
	}
	if pods < 8 {
		t.Fatalf("only %d pod templates checked", pods)
	}
	t.Logf("%d pod templates accepted as bare Pods under PSA restricted, and rejected without seccomp", pods)
}

// What kustomize cannot refuse, the API does: the logshipper on an app without a "logs" volume
// (files-api logs to stdout) render a logshipper mount of a volume that does not exist. The
// per-agent components are the way out (TestComponentsAlone); this is why they exist.
func TestAPIDanglingMountRefused(t *testing.T) {
	a := needAPI(t)
	docs := renderFilesAPI(t, func(k string) string {
		return strings.Replace(k, "//kustomize/components/syncer?", "//kustomize/components/logshipper?", 1)
	})
	dep := find(docs, "Deployment", "files-api")
	if c := container(podSpec(dep), "logshipper"); c == nil {
		t.Fatal("no logshipper rendered: the edit of the example failed")
	}
	pod := barePod(dep, "dangling-logs")
	r := a.do(t, a.admin, "", "POST", "/api/v1/namespaces/files/pods?dryRun=All", pod)
	if r.code != 422 || !strings.Contains(string(r.body), "volumeMounts") {
		t.Fatalf("a logshipper mounting a missing volume: want 422 about volumeMounts, got %d %s", r.code, r.body)
	}
	// And the example as written (restore + syncer) is accepted.
	pod = barePod(find(renderFilesAPI(t, nil), "Deployment", "files-api"), "files-api-ok")
	if r := a.do(t, a.admin, "", "POST", "/api/v1/namespaces/files/pods?dryRun=All", pod); r.code != 201 || len(r.warnings) > 0 {
		t.Fatalf("files-api example as a bare Pod: %d %v %s", r.code, r.warnings, r.body)
	}
}

// The agents attached to files-api run as files-api's own ServiceAccount: the example's RoleBinding
// gives exactly that account the agents' rights in its namespace (check.sh applied the example), and
// another account of the namespace gets none.
func TestAPIUserServiceAccount(t *testing.T) {
	a := needAPI(t)
	c := a.tokenClient(t)
	event := obj{"apiVersion": "v1", "kind": "Event", "metadata": obj{"generateName": "files-api."},
		"involvedObject": obj{"apiVersion": "v1", "kind": "Pod", "name": "files-api-0", "namespace": "files"},
		"reason":         "RBACTest", "message": "m", "type": "Normal", "count": 1}
	if r := a.do(t, c, a.saToken(t, "files", "files-api"), "POST", "/api/v1/namespaces/files/events", event); r.code != 201 {
		t.Fatalf("create event as files-api's ServiceAccount: %d %s", r.code, r.body)
	}
	if r := a.do(t, c, a.saToken(t, "files", "default"), "POST", "/api/v1/namespaces/files/events", event); r.code != 403 {
		t.Fatalf("create event as the namespace's default ServiceAccount: want 403, got %d", r.code)
	}
	if r := a.do(t, c, a.saToken(t, "files", "files-api"), "GET", "/api/v1/namespaces/files/pods", nil); r.code != 403 {
		t.Fatalf("list pods as files-api's ServiceAccount: want 403, got %d", r.code)
	}
}

const ns = "uploads" // manifests/ namespace, applied for real by check.sh

// upPod creates (for real) a Pod from manifests/deployment.yaml's template. No
// kubelet runs: it stays Pending, which is all the API calls need.
func (a *api) upPod(t *testing.T, name string) obj {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(root(), "manifests", "deployment.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	pod := barePod(parseDocs(t, "deployment.yaml", b)[0], name)
	a.do(t, a.admin, "", "DELETE", "/api/v1/namespaces/"+ns+"/pods/"+name+"?gracePeriodSeconds=0", nil)
	r := a.do(t, a.admin, "", "POST", "/api/v1/namespaces/"+ns+"/pods", pod)
	if r.code != 201 {
		t.Fatalf("create pod %s: %d %s", name, r.code, r.body)
	}
	var out obj
	json.Unmarshal(r.body, &out)
	return out
}

// The agents' ServiceAccount can do exactly what agents/kube does, and the
// neighbouring calls are refused.
func TestAPIRBAC(t *testing.T) {
	a := needAPI(t)
	a.upPod(t, "rbac-self")
	a.upPod(t, "rbac-neighbour")
	tok := a.saToken(t, ns, "podkeeper")
	c := a.tokenClient(t)
	event := obj{"apiVersion": "v1", "kind": "Event", "metadata": obj{"generateName": "rbac-self."},
		"involvedObject": obj{"apiVersion": "v1", "kind": "Pod", "name": "rbac-self", "namespace": ns},
		"reason":         "RBACTest", "message": "m", "type": "Normal", "count": 1}
	r := a.do(t, c, tok, "POST", "/api/v1/namespaces/"+ns+"/events", event)
	if r.code != 201 {
		t.Fatalf("create event as the agents: %d %s", r.code, r.body)
	}
	var created struct{ Metadata struct{ Name string } }
	json.Unmarshal(r.body, &created)
	allowed := []struct{ method, path string }{
		{"PATCH", "/api/v1/namespaces/" + ns + "/events/" + created.Metadata.Name},
	}
	for _, call := range allowed {
		var body any
		if call.method == "PATCH" {
			body = `{"count":2}`
		}
		if r := a.do(t, c, tok, call.method, call.path, body); r.code != 200 {
			t.Errorf("agents' call %s %s refused: %d %s", call.method, call.path, r.code, r.body)
		}
	}
	denied := []struct {
		method, path string
		body         any
	}{
		{"GET", "/api/v1/namespaces/" + ns + "/secrets", nil},
		{"GET", "/api/v1/namespaces/" + ns + "/secrets/podkeeper-s3", nil},
		{"PATCH", "/api/v1/namespaces/" + ns + "/pods/rbac-neighbour", `{"metadata":{"labels":{"x":"y"}}}`},
		{"PATCH", "/api/v1/namespaces/" + ns + "/pods/rbac-self", `{"metadata":{"labels":{"x":"y"}}}`},
		{"GET", "/api/v1/namespaces/" + ns + "/pods", nil},
		// The own Pod too: identity and labels come from the downward API, and a
		// get on pods cannot be limited to one's own Pod name ahead of time.
		{"GET", "/api/v1/namespaces/" + ns + "/pods/rbac-self", nil},
		{"GET", "/api/v1/namespaces/" + ns + "/pods/rbac-neighbour", nil},
		{"DELETE", "/api/v1/namespaces/" + ns + "/pods/rbac-neighbour", nil},
		{"GET", "/api/v1/namespaces/" + ns + "/events", nil},
		{"DELETE", "/api/v1/namespaces/" + ns + "/events/" + created.Metadata.Name, nil},
		{"GET", "/api/v1/namespaces/" + ns + "/configmaps/podkeeper", nil},
		{"GET", "/api/v1/namespaces/podkeeper-dev/pods/rbac-self", nil},
		{"POST", "/api/v1/namespaces/podkeeper-dev/events", event},
		{"GET", "/api/v1/nodes", nil},
	}
	for _, call := range denied {
		if r := a.do(t, c, tok, call.method, call.path, call.body); r.code != 403 {
			t.Errorf("%s %s as the agents: want 403, got %d", call.method, call.path, r.code)
		}
	}
}

func saDir(t *testing.T, a *api, token string) string {
	d := t.TempDir()
	ca, err := os.ReadFile(a.caFile)
	if err != nil {
		t.Fatal(err)
	}
	for name, b := range map[string][]byte{"token": []byte(token), "ca.crt": ca, "namespace": []byte(ns)} {
		if err := os.WriteFile(filepath.Join(d, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return d
}

// agents/kube as it runs in a Pod (in-cluster discovery from a service-account
// directory, KUBE_EVENTS=true), against the real API and RBAC.
func TestAPIKubeEventsAndLabels(t *testing.T) {
	a := needAPI(t)
	pod := a.upPod(t, "kube-self")
	uid := str(pod, "metadata", "uid")
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	base := &config.Base{PodName: "kube-self", PodUID: uid, NodeName: "node-a", KubeEvents: "true"}
	dir := saDir(t, a, a.saToken(t, ns, "podkeeper"))
	// What the kubelet's downward API volume holds (no kubelet here; e2e has one).
	writeLabels := func(l string) {
		if err := os.WriteFile(filepath.Join(dir, "labels.tmp"), []byte(l), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(filepath.Join(dir, "labels.tmp"), filepath.Join(dir, "labels")); err != nil {
			t.Fatal(err)
		}
	}
	writeLabels("app.kubernetes.io/name=\"upload-app\"\n")
	k, err := kube.New(t.Context(), base, log, kube.Options{
		Component: "syncer", Host: a.host, SADir: dir,
		Interval: 200 * time.Millisecond, LabelsRefresh: 100 * time.Millisecond,
	})
	if err != nil {
		t.Fatalf("KUBE_EVENTS=true with the agents' RBAC: %v", err)
	}
	if base.PodNamespace != ns {
		t.Errorf("namespace from the service-account dir: %q", base.PodNamespace)
	}
	if got := k.Labels()["app.kubernetes.io/name"]; got != "upload-app" {
		t.Errorf("labels: %v", k.Labels())
	}
	const n = 300
	for i := range n {
		k.Event(t.Context(), events.Warning, "UploadsFailing", fmt.Sprintf("upload %d failed: connection refused", i))
	}
	k.Event(t.Context(), events.Normal, "SnapshotWritten", "snapshot 20261126T000000.000000000Z: 12 files")
	// Labels change while running (the kubelet rewrites the file): the reader follows.
	writeLabels("app.kubernetes.io/name=\"upload-app\"\nteam=\"media\"\n")
	if err := peers.WaitFor(t.Context(), 20*time.Second, func() error {
		if k.Labels()["team"] != "media" {
			return fmt.Errorf("labels %v", k.Labels())
		}
		return nil
	}); err != nil {
		t.Error(err)
	}
	if err := k.Close(t.Context()); err != nil {
		t.Fatal(err)
	}
	creates, patches, failures := k.Stats()
	r := a.do(t, a.admin, "", "GET", "/api/v1/namespaces/"+ns+"/events?fieldSelector=involvedObject.name%3Dkube-self", nil)
	var evs struct {
		Items []struct {
			Reason, Type, Message string
			Count                 int
			InvolvedObject        struct{ UID, Kind string }
			Source                struct{ Component, Host string }
		}
	}
	json.Unmarshal(r.body, &evs)
	counts := map[string]int{}
	for _, e := range evs.Items {
		counts[e.Reason] += e.Count
		if e.InvolvedObject.UID != uid || e.InvolvedObject.Kind != "Pod" || e.Source.Component != "podkeeper-syncer" || e.Source.Host != "node-a" {
			t.Errorf("event %+v not on the Pod (uid %s)", e, uid)
		}
	}
	if counts["UploadsFailing"] != n || counts["SnapshotWritten"] != 1 {
		t.Fatalf("event counts %v (creates %d patches %d failures %d), want UploadsFailing=%d SnapshotWritten=1", counts, creates, patches, failures, n)
	}
	if creates+patches > 20 || failures != 0 {
		t.Fatalf("%d occurrences cost %d creates + %d patches (%d failures): not aggregated", n+1, creates, patches, failures)
	}
	t.Logf("%d occurrences -> %d Events created, %d patches", n+1, creates, patches)
}

// A ServiceAccount without the agents' Role: KUBE_EVENTS=true refuses to
// start, auto carries on with events in the log.
func TestAPIKubeForbidden(t *testing.T) {
	a := needAPI(t)
	a.upPod(t, "kube-norbac")
	r := a.do(t, a.admin, "", "POST", "/api/v1/namespaces/"+ns+"/serviceaccounts", obj{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": obj{"name": "no-rbac"}})
	if r.code != 201 && r.code != 409 {
		t.Fatalf("create sa: %d %s", r.code, r.body)
	}
	dir := saDir(t, a, a.saToken(t, ns, "no-rbac"))
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	_, err := kube.New(t.Context(), &config.Base{PodName: "kube-norbac", PodNamespace: ns, PodUID: "u", KubeEvents: "true"}, log, kube.Options{Host: a.host, SADir: dir})
	if err == nil || !strings.Contains(err.Error(), "forbidden") && !strings.Contains(err.Error(), "not allowed") {
		t.Fatalf("KUBE_EVENTS=true without RBAC: want a forbidden error at start, got %v", err)
	}
	k, err := kube.New(t.Context(), &config.Base{PodName: "kube-norbac", PodNamespace: ns, PodUID: "u", KubeEvents: "auto"}, log, kube.Options{Host: a.host, SADir: dir})
	if err != nil || k.Enabled() {
		t.Fatalf("auto without RBAC: err %v enabled %v", err, k != nil && k.Enabled())
	}
	k.Close(t.Context())
	// Unreachable API (a port nobody listens on) with true: an error, not a hang.
	_, err = kube.New(t.Context(), &config.Base{PodName: "kube-norbac", PodNamespace: ns, PodUID: "u", KubeEvents: "true"}, log,
		kube.Options{Host: fmt.Sprintf("https://127.0.0.1:%d", peers.FreePort(t)), SADir: dir, RequestTimeout: 3 * time.Second})
	if err == nil {
		t.Fatal("KUBE_EVENTS=true with an unreachable API must fail at start")
	}
}
