package k8s

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	jsonpatch "gopkg.in/evanphx/json-patch.v4"

	"github.com/podkeeper/podkeeper/injector"
	"github.com/podkeeper/podkeeper/test/peers"
)

// manifests/injector.yaml is kustomize/injector rendered, nothing else.
func TestInjectorManifestIsRendered(t *testing.T) {
	want := parseDocs(t, "kustomize/injector", render(t, filepath.Join(root(), "kustomize", "injector")))
	got := readDocs(t, "manifests/injector.yaml")
	// The same objects (kubectl's kustomize and the library's may order them differently).
	byID := func(l []obj) {
		sort.Slice(l, func(i, j int) bool {
			return fmt.Sprint(l[i]["kind"], str(l[i], "metadata", "name")) < fmt.Sprint(l[j]["kind"], str(l[j], "metadata", "name"))
		})
	}
	byID(got)
	byID(want)
	if !reflect.DeepEqual(got, want) {
		t.Fatal("manifests/injector.yaml differs from `kubectl kustomize kustomize/injector`: render it again (docs/injector.md)")
	}
	kinds := map[string]bool{}
	for _, o := range got {
		kinds[o["kind"].(string)] = true
	}
	for _, k := range []string{"Namespace", "ServiceAccount", "Role", "ClusterRole", "Deployment", "PodDisruptionBudget", "Service", "MutatingWebhookConfiguration", "ConfigMap"} {
		if !kinds[k] {
			t.Errorf("no %s in manifests/injector.yaml", k)
		}
	}
	// RBAC: its own Secret and its own webhook configuration, by name; create (which cannot
	// name a resource) only for Secrets and Events of its namespace, patch for Events.
	for _, o := range got {
		if o["kind"] != "Role" && o["kind"] != "ClusterRole" {
			continue
		}
		for _, r := range list(o, "rules") {
			named := len(list(r, "resourceNames")) > 0
			verbs := fmt.Sprint(list(r, "verbs"))
			res := fmt.Sprint(list(r, "resources"))
			if !named && !(o["kind"] == "Role" && (verbs == "[create]" && res == "[secrets]" || verbs == "[create patch]" && res == "[events]")) {
				t.Errorf("%s %s: rule %v is not limited by resourceNames", o["kind"], str(o, "metadata", "name"), r)
			}
		}
	}
}

type injectorProc struct {
	cmd            *exec.Cmd
	port, health   int
	log            *syncBuffer
	webhook, hpath string
}

type syncBuffer struct {
	mu sync.Mutex
	b  []byte
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.b = append(s.b, p...)
	return len(p), nil
}

func (s *syncBuffer) String() string { s.mu.Lock(); defer s.mu.Unlock(); return string(s.b) }

func freePort(t *testing.T) int {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

func percentile(ds []time.Duration, p float64) time.Duration {
	s := slices.Clone(ds)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	i := int(float64(len(s))*p+0.5) - 1
	if i < 0 {
		i = 0
	}
	return s[min(i, len(s)-1)]
}

// TestAPIInjector: the real kube-apiserver calls the injector over TLS. Two injector processes
// run on loopback as the injector's ServiceAccount (the RBAC of manifests/injector.yaml, applied
// by check.sh), share one Secret and set the caBundle of the webhook configuration of
// manifests/injector.yaml (its clientConfig pointed at them by URL). Then Pods of a plain
// Deployment template come back with the agents, under Pod Security "restricted", 0 warnings.
func TestAPIInjector(t *testing.T) {
	a := needAPI(t)
	const ns = "podkeeper-injector"
	const mwcName = "podkeeper-injector"
	dir := t.TempDir()
	bin := filepath.Join(dir, "injector")
	build := exec.Command("go", "build", "-o", bin, "./cmd/injector")
	build.Dir = root()
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	// Its ServiceAccount's token, as the kubelet would mount it.
	token := a.saToken(t, ns, "podkeeper-injector")
	kc := filepath.Join(dir, "kubeconfig")
	os.WriteFile(kc, []byte(fmt.Sprintf(`apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: %q, certificate-authority: %q}}]
users: [{name: u, user: {token: %q}}]
contexts: [{name: c, context: {cluster: c, user: u}}]
current-context: c
`, a.host, a.caFile, token)), 0o600)
	defaults := filepath.Join(dir, "defaults")
	os.Mkdir(defaults, 0o755)
	os.WriteFile(filepath.Join(defaults, "store-url"), []byte("s3://platform-uploads/{namespace}/{workload}"), 0o644)

	// The webhook configuration of the manifest, called by URL, and only for this test's
	// namespaces (the other tests create Pods too).
	var mwc obj
	for _, o := range readDocs(t, "manifests/injector.yaml") {
		if o["kind"] == "MutatingWebhookConfiguration" {
			mwc = o
		}
	}
	procs := []*injectorProc{{}, {}}
	hooks := list(mwc, "webhooks")
	if len(hooks) != 2 {
		t.Fatalf("webhooks: %d", len(hooks))
	}
	for i, h := range hooks {
		p := procs[i]
		p.port, p.health, p.log = freePort(t), freePort(t), &syncBuffer{}
		p.webhook, p.hpath = str(h, "name"), str(h, "clientConfig", "service", "path")
		h.(obj)["clientConfig"] = obj{"url": fmt.Sprintf("https://127.0.0.1:%d%s", p.port, p.hpath)}
		sel := get(h, "namespaceSelector").(obj)
		sel["matchExpressions"] = append(list(sel, "matchExpressions"), obj{"key": "podkeeper.io/test", "operator": "In", "values": []any{"injector"}})
	}
	a.do(t, a.admin, "", "DELETE", "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/"+mwcName, nil)
	if r := a.do(t, a.admin, "", "POST", "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations", mwc); r.code != 201 {
		t.Fatalf("create webhook configuration: %d %s", r.code, r.body)
	}
	t.Cleanup(func() { // t.Context() is over by now
		req, _ := http.NewRequest("DELETE", a.host+"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/"+mwcName, nil)
		if resp, err := a.admin.Do(req); err != nil || resp.StatusCode != 200 {
			t.Errorf("delete the webhook configuration: %v %v", err, resp)
		} else {
			resp.Body.Close()
		}
	})
	a.do(t, a.admin, "", "DELETE", "/api/v1/namespaces/"+ns+"/secrets/podkeeper-injector-tls", nil)

	// The first replica posts its Events on a Pod of the manifest's template (created for real;
	// nothing runs it), through the RBAC of the manifest.
	var self obj
	for _, o := range readDocs(t, "manifests/injector.yaml") {
		if o["kind"] == "Deployment" {
			self = barePod(o, "podkeeper-injector-test")
		}
	}
	self["metadata"].(obj)["namespace"] = ns
	a.do(t, a.admin, "", "DELETE", "/api/v1/namespaces/"+ns+"/pods/podkeeper-injector-test?gracePeriodSeconds=0", nil)
	r := a.do(t, a.admin, "", "POST", "/api/v1/namespaces/"+ns+"/pods", self)
	if r.code != 201 || len(r.warnings) > 0 {
		t.Fatalf("the injector's Pod: %d %v %s", r.code, r.warnings, r.body)
	}
	var selfOut obj
	json.Unmarshal(r.body, &selfOut)
	// Both replicas start at once: one creates the Secret, the other uses it.
	for i, p := range procs {
		p.cmd = exec.Command(bin, "-namespace", ns, "-listen", fmt.Sprintf("127.0.0.1:%d", p.port),
			"-health-addr", fmt.Sprintf("127.0.0.1:%d", p.health), "-extra-sans", "127.0.0.1",
			"-kubeconfig", kc, "-defaults-dir", defaults, "-failure-policy", "Fail", "-shutdown-delay", "0s",
			"-check-every", "2s")
		p.cmd.Stdout, p.cmd.Stderr = p.log, p.log
		p.cmd.Env = os.Environ()
		if i == 0 {
			p.cmd.Env = append(p.cmd.Env, "POD_NAME=podkeeper-injector-test", "POD_UID="+str(selfOut, "metadata", "uid"))
		}
		if err := p.cmd.Start(); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() {
		for _, p := range procs {
			p.cmd.Process.Signal(syscall.SIGTERM)
			p.cmd.Wait()
		}
		if t.Failed() {
			for i, p := range procs {
				t.Logf("injector %d log:\n%s", i, p.log)
			}
		}
	})
	for _, p := range procs {
		err := peers.WaitFor(context.Background(), 60*time.Second, func() error {
			resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/readyz", p.health))
			if err != nil {
				return err
			}
			resp.Body.Close()
			if resp.StatusCode != 200 {
				return fmt.Errorf("readyz %d", resp.StatusCode)
			}
			return nil
		})
		if err != nil {
			t.Fatalf("injector on :%d not ready: %v", p.port, err)
		}
	}
	created := 0
	for _, p := range procs {
		created += strings.Count(p.log.String(), "created CA and serving certificate")
	}
	if created != 1 {
		t.Errorf("%d replicas created the Secret, want 1", created)
	}
	// The caBundle is the Secret's CA, set by the injector itself.
	r = a.do(t, a.admin, "", "GET", "/api/v1/namespaces/"+ns+"/secrets/podkeeper-injector-tls", nil)
	var sec struct{ Data map[string][]byte }
	json.Unmarshal(r.body, &sec)
	r = a.do(t, a.admin, "", "GET", "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/"+mwcName, nil)
	var got obj
	json.Unmarshal(r.body, &got)
	for _, h := range list(got, "webhooks") {
		if b := str(h, "clientConfig", "caBundle"); b != base64.StdEncoding.EncodeToString(sec.Data["ca.crt"]) || b == "" {
			t.Fatalf("webhook %s: caBundle is not the Secret's ca.crt", str(h, "name"))
		}
	}

	// Namespaces: one labelled for injection, one where Pods opt in.
	mkNS := func(name string, labels obj) {
		labels["podkeeper.io/test"] = "injector"
		labels["pod-security.kubernetes.io/enforce"] = "restricted"
		labels["pod-security.kubernetes.io/warn"] = "restricted"
		a.do(t, a.admin, "", "POST", "/api/v1/namespaces", obj{"apiVersion": "v1", "kind": "Namespace", "metadata": obj{"name": name, "labels": labels}})
		a.do(t, a.admin, "", "POST", "/api/v1/namespaces/"+name+"/serviceaccounts", obj{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": obj{"name": "default"}})
	}
	mkNS("inject-all", obj{"podkeeper.io/inject": "enabled"})
	mkNS("inject-optin", obj{})

	// A plain Deployment's Pod, as its ReplicaSet creates it.
	pod := func(namespace string, ann obj, initContainers ...any) obj {
		p := obj{"apiVersion": "v1", "kind": "Pod", "metadata": obj{
			"generateName": "files-api-6b7c9d-", "namespace": namespace,
			"labels":      obj{"app": "files-api", "pod-template-hash": "6b7c9d"},
			"annotations": ann,
			"ownerReferences": []any{obj{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "files-api-6b7c9d",
				"uid": "5e0f4c3a-0000-4000-8000-000000000001", "controller": true}},
		}, "spec": obj{
			"securityContext":               obj{"runAsNonRoot": true, "runAsUser": 1000, "fsGroup": 1000, "seccompProfile": obj{"type": "RuntimeDefault"}},
			"terminationGracePeriodSeconds": 120,
			"containers": []any{obj{"name": "app", "image": "example/files-api:1",
				"volumeMounts":    []any{obj{"name": "uploads", "mountPath": "/srv/uploads"}, obj{"name": "logs", "mountPath": "/var/log/files-api"}},
				"securityContext": obj{"allowPrivilegeEscalation": false, "capabilities": obj{"drop": []any{"ALL"}}}}},
			"volumes": []any{obj{"name": "uploads", "emptyDir": obj{}}, obj{"name": "logs", "emptyDir": obj{}}},
		}}
		if len(initContainers) > 0 {
			p["spec"].(obj)["initContainers"] = initContainers
		}
		return p
	}
	create := func(p obj, dry bool) (reply, obj) {
		q := ""
		if dry {
			q = "?dryRun=All"
		}
		r := a.do(t, a.admin, "", "POST", "/api/v1/namespaces/"+str(p, "metadata", "namespace")+"/pods"+q, p)
		var out obj
		json.Unmarshal(r.body, &out)
		return r, out
	}
	initNames := func(p obj) []string { return names(list(p, "spec", "initContainers")) }
	expect := func(what string, r reply, out obj, want []string) {
		t.Helper()
		if r.code != 201 || len(r.warnings) > 0 {
			t.Fatalf("%s: %d %v %s", what, r.code, r.warnings, r.body)
		}
		if got := initNames(out); !slices.Equal(got, want) {
			t.Fatalf("%s: init containers %v, want %v", what, got, want)
		}
	}

	// 1. A labelled namespace: every Pod, store prefix from the platform default.
	r, out := create(pod("inject-all", obj{}), true)
	expect("labelled namespace", r, out, []string{"restore", "syncer", "logshipper"})
	if u := str(out, "metadata", "annotations", "podkeeper.io/store-url"); u != "s3://platform-uploads/inject-all/files-api" {
		t.Errorf("store-url %q", u)
	}
	for _, c := range list(out, "spec", "initContainers")[1:] {
		if str(c, "restartPolicy") != "Always" {
			t.Errorf("%s is no native sidecar", str(c, "name"))
		}
	}
	if g := get(out, "spec", "terminationGracePeriodSeconds"); g != float64(120) {
		t.Errorf("grace period changed: %v", g)
	}
	// 2. For real, then read back.
	r, out = create(pod("inject-all", obj{}), false)
	expect("labelled namespace, created", r, out, []string{"restore", "syncer", "logshipper"})
	// 3. Another namespace: nothing unless the Pod asks.
	r, out = create(pod("inject-optin", obj{}), true)
	expect("not asked", r, out, nil)
	r, out = create(pod("inject-optin", obj{"podkeeper.io/inject": "true", "podkeeper.io/agents": "restore,syncer",
		"podkeeper.io/store-url": "s3://team-bucket/files"}), true)
	expect("annotated Pod", r, out, []string{"restore", "syncer"})
	// 4. The Pod's own init containers (one a native sidecar) stay first.
	r, out = create(pod("inject-all", obj{}, obj{"name": "migrate", "image": "example/migrate:1",
		"securityContext": obj{"allowPrivilegeEscalation": false, "capabilities": obj{"drop": []any{"ALL"}}}},
		obj{"name": "proxy", "image": "example/proxy:1", "restartPolicy": "Always",
			"securityContext": obj{"allowPrivilegeEscalation": false, "capabilities": obj{"drop": []any{"ALL"}}}}), true)
	expect("own init containers", r, out, []string{"migrate", "proxy", "restore", "syncer", "logshipper"})
	// 5. A bad annotation is refused (the injector runs with -failure-policy Fail) naming it.
	// (Not a dry run: a dry run leaves no Event, the webhook declares sideEffects: None.)
	r, _ = create(pod("inject-all", obj{"podkeeper.io/agents": "restore,backup"}), false)
	if r.code/100 != 4 || !strings.Contains(string(r.body), "podkeeper.io/agents") {
		t.Fatalf("bad podkeeper.io/agents: %d %s", r.code, r.body)
	}
	r, _ = create(pod("inject-all", obj{"podkeeper.io/store-prefix": "x"}), true)
	if r.code/100 != 4 || !strings.Contains(string(r.body), "podkeeper.io/store-prefix") {
		t.Fatalf("unknown annotation: %d %s", r.code, r.body)
	}
	// Each refused Pod: a Warning Event PodNotMutated on the injector's Pod.
	var ev obj
	err := peers.WaitFor(context.Background(), 15*time.Second, func() error {
		r := a.do(t, a.admin, "", "GET", "/api/v1/namespaces/"+ns+"/events?fieldSelector=reason%3DPodNotMutated", nil)
		var evs struct{ Items []obj }
		json.Unmarshal(r.body, &evs)
		if len(evs.Items) == 0 {
			return fmt.Errorf("no PodNotMutated Event: %d %s", r.code, r.body)
		}
		ev = evs.Items[0]
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if str(ev, "involvedObject", "name") != "podkeeper-injector-test" || str(ev, "type") != "Warning" ||
		!strings.Contains(str(ev, "message"), "inject-all/files-api-6b7c9d-") {
		t.Fatalf("Event: %v", ev)
	}
	t.Logf("Event %s x%v: %s", str(ev, "reason"), get(ev, "count"), str(ev, "message"))
	// 6. The Pod opts out of its namespace's injection.
	r, out = create(pod("inject-all", obj{"podkeeper.io/inject": "false"}), true)
	expect("opted out", r, out, nil)

	// Latency: Pod creations through the apiserver (dry-run), and admission reviews sent to
	// the injector directly over TLS as the apiserver sends them.
	var api []time.Duration
	for i := 0; i < 200; i++ {
		t0 := time.Now()
		r, _ := create(pod("inject-all", obj{}), true)
		api = append(api, time.Since(t0))
		if r.code != 201 {
			t.Fatalf("create %d: %d", i, r.code)
		}
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(sec.Data["ca.crt"])
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	podJSON, _ := json.Marshal(pod("inject-all", obj{}))
	review, _ := json.Marshal(obj{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": obj{
		"uid": "00000000-0000-4000-8000-000000000001", "kind": obj{"group": "", "version": "v1", "kind": "Pod"},
		"namespace": "inject-all", "operation": "CREATE", "object": json.RawMessage(podJSON)}})
	var direct []time.Duration
	url := fmt.Sprintf("https://127.0.0.1:%d%s", procs[0].port, procs[0].hpath)
	for i := 0; i < 1000; i++ {
		t0 := time.Now()
		resp, err := hc.Post(url, "application/json", strings.NewReader(string(review)))
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		direct = append(direct, time.Since(t0))
		if resp.StatusCode != 200 || !strings.Contains(string(b), `"patch"`) {
			t.Fatalf("direct review: %d %s", resp.StatusCode, b)
		}
	}
	p99 := percentile(direct, 0.99)
	t.Logf("webhook latency per admission (TLS, loopback, %d reviews): p50 %v p99 %v (target <= 10ms)",
		len(direct), percentile(direct, 0.5).Round(time.Microsecond), p99.Round(time.Microsecond))
	t.Logf("Pod create through the apiserver with the webhook (dry-run, %d): p50 %v p99 %v",
		len(api), percentile(api, 0.5).Round(time.Microsecond), percentile(api, 0.99).Round(time.Microsecond))
	if p99 > 10*time.Millisecond {
		t.Errorf("webhook p99 %v over the 10 ms target", p99)
	}
	// Rotation through the real API: the Secret's certificate replaced by a broken one (as if
	// expired); within -check-every one replica renews it with a resourceVersion-conditional
	// update, both serve the new one, and the apiserver keeps calling them.
	r = a.do(t, a.admin, "", "GET", "/api/v1/namespaces/"+ns+"/secrets/podkeeper-injector-tls", nil)
	var full obj
	json.Unmarshal(r.body, &full)
	full["data"].(obj)["tls.crt"] = base64.StdEncoding.EncodeToString([]byte("not a certificate"))
	if r = a.do(t, a.admin, "", "PUT", "/api/v1/namespaces/"+ns+"/secrets/podkeeper-injector-tls", full); r.code != 200 {
		t.Fatalf("break the Secret: %d %s", r.code, r.body)
	}
	served := func(port int) []byte {
		conn, err := tls.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port), &tls.Config{RootCAs: pool})
		if err != nil {
			return nil
		}
		defer conn.Close()
		return conn.ConnectionState().PeerCertificates[0].Raw
	}
	err = peers.WaitFor(context.Background(), 20*time.Second, func() error {
		r = a.do(t, a.admin, "", "GET", "/api/v1/namespaces/"+ns+"/secrets/podkeeper-injector-tls", nil)
		var cur struct{ Data map[string][]byte }
		json.Unmarshal(r.body, &cur)
		certs, _ := x509.ParseCertificates(pemBlock(cur.Data["tls.crt"]))
		if len(certs) == 1 && slices.Equal(served(procs[0].port), certs[0].Raw) && slices.Equal(served(procs[1].port), certs[0].Raw) {
			return nil
		}
		return errors.New("the Secret's certificate is not the one both replicas serve yet")
	})
	if err != nil {
		t.Fatalf("no replica renewed the broken certificate (or they serve different ones): %v", err)
	}
	renewed := 0
	for _, p := range procs {
		renewed += strings.Count(p.log.String(), "rotated the serving certificate")
	}
	if renewed != 1 {
		t.Errorf("%d replicas renewed the certificate, want 1", renewed)
	}
	r, out = create(pod("inject-all", obj{}), true)
	expect("after the renewal", r, out, []string{"restore", "syncer", "logshipper"})

	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/metrics", procs[1].health))
	if err != nil {
		t.Fatal(err)
	}
	m, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(m), `podkeeper_injector_admissions_total{result="injected"}`) ||
		!strings.Contains(string(m), "podkeeper_injector_admission_duration_seconds_bucket") {
		t.Errorf("metrics of replica 2 lack the admission counters:\n%s", m)
	}
}

// One source of truth: the injector, given the settings a kustomization gives the components
// (podkeeper-attach), turns files-api's Pod into exactly the Pod spec the components render, native
// (components/agents) and classic (components/classic-sidecars). A change of a component's
// container or of the place its replacements write to fails here.
func TestInjectorMatchesComponents(t *testing.T) {
	settings := map[string]string{"uploads-volume": "data", "uploads-mount-path": "/srv/data", "logs-volume": "data",
		"logs-mount-path": "/var/lib/files-api", "syncer-memory-limit": "512Mi", "restore-cpu-request": "200m",
		"logshipper-cpu-limit": "250m"}
	rel := func(dir string, p ...string) string {
		r, err := filepath.Rel(dir, filepath.Join(append([]string{root(), "kustomize"}, p...)...))
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	for _, tc := range []struct {
		component string
		native    bool
		extra     []string // more components, in this order
		ann       obj      // the annotations that ask the injector for the same
	}{
		{"agents", true, nil, nil},
		{"classic-sidecars", false, nil, nil},
		{"agents", true, []string{"restore-first"}, obj{"podkeeper.io/restore-first": "true"}},
	} {
		t.Run(strings.Join(append([]string{tc.component}, tc.extra...), "+"), func(t *testing.T) {
			dir := t.TempDir()
			app, err := os.ReadFile(filepath.Join(root(), "kustomize", "examples", "files-api", "files-api.yaml"))
			if err != nil {
				t.Fatal(err)
			}
			os.WriteFile(filepath.Join(dir, "files-api.yaml"), app, 0o644)
			var b strings.Builder
			fmt.Fprintf(&b, "resources:\n- files-api.yaml\n- %s\ncomponents:\n- %s\n", rel(dir, "base"), rel(dir, "components", tc.component))
			for _, c := range tc.extra {
				fmt.Fprintf(&b, "- %s\n", rel(dir, "components", c))
			}
			fmt.Fprintf(&b, "configMapGenerator:\n- name: podkeeper-attach\n  behavior: merge\n  literals:\n")
			for k, v := range settings {
				fmt.Fprintf(&b, "  - %s=%s\n", k, v)
			}
			os.WriteFile(filepath.Join(dir, "kustomization.yaml"), []byte(b.String()), 0o644)
			rendered := podSpec(find(parseDocs(t, tc.component, render(t, dir)), "Deployment", "files-api"))
			// kustomize/base generates ConfigMap podkeeper with a hash suffix; the injector
			// names the namespace's ConfigMap podkeeper (manifests/config.yaml).
			for _, c := range append(list(rendered, "initContainers"), list(rendered, "containers")...) {
				for _, e := range list(c, "envFrom") {
					if r, ok := get(e, "configMapRef").(obj); ok && agentsConfigMap(str(r, "name")) {
						r["name"] = "podkeeper"
					}
				}
			}

			orig := find(readDocs(t, "kustomize/examples/files-api/files-api.yaml"), "Deployment", "files-api")
			pod := barePod(orig, "files-api-x")
			ann := obj{"podkeeper.io/inject": "true", "podkeeper.io/store-url": "s3://b/files-api"}
			for k, v := range tc.ann {
				ann[k] = v
			}
			pod["metadata"].(obj)["annotations"] = ann
			d, err := injector.ParseDefaults(settings)
			if err != nil {
				t.Fatal(err)
			}
			res, err := injector.Mutate(d, injector.Request{Pod: pod, Namespace: "files", Native: tc.native})
			if err != nil {
				t.Fatal(err)
			}
			pb, _ := json.Marshal(res.Patch)
			patch, err := jsonpatch.DecodePatch(pb)
			if err != nil {
				t.Fatal(err)
			}
			podb, _ := json.Marshal(pod)
			outb, err := patch.Apply(podb)
			if err != nil {
				t.Fatal(err)
			}
			var out obj
			json.Unmarshal(outb, &out)
			injected := out["spec"].(obj)
			for _, f := range []string{"initContainers", "containers"} {
				if !reflect.DeepEqual(list(injected, f), list(rendered, f)) {
					gj, _ := json.MarshalIndent(list(injected, f), "", " ")
					wj, _ := json.MarshalIndent(list(rendered, f), "", " ")
					t.Errorf("%s: injector and components differ:\ninjector: %s\ncomponents: %s", f, gj, wj)
				}
			}
			vols := func(l []any) map[string]any {
				m := map[string]any{}
				for _, v := range l {
					m[str(v, "name")] = v
				}
				return m
			}
			if !reflect.DeepEqual(vols(list(injected, "volumes")), vols(list(rendered, "volumes"))) {
				t.Errorf("volumes differ:\ninjector: %v\ncomponents: %v", list(injected, "volumes"), list(rendered, "volumes"))
			}
		})
	}
}

// kustomize/injector/cert-manager: the injector serves cert-manager's certificate, cert-manager
// sets the caBundle, and the injector keeps no API rights.
func TestInjectorCertManagerOverlay(t *testing.T) {
	docs := parseDocs(t, "cert-manager", render(t, filepath.Join(root(), "kustomize", "injector", "cert-manager")))
	dep := find(docs, "Deployment", "podkeeper-injector")
	c := list(podSpec(dep), "containers")[0]
	if !slices.Contains(list(c, "args"), any("-cert-dir=/etc/podkeeper-injector-tls")) {
		t.Errorf("no -cert-dir: %v", list(c, "args"))
	}
	mounted := false
	for _, v := range list(podSpec(dep), "volumes") {
		mounted = mounted || str(v, "secret", "secretName") == "podkeeper-injector-cert"
	}
	cert := find(docs, "Certificate", "podkeeper-injector")
	if !mounted || cert == nil || str(cert, "spec", "secretName") != "podkeeper-injector-cert" {
		t.Error("the Certificate's Secret is not mounted")
	}
	if mwc := find(docs, "MutatingWebhookConfiguration", "podkeeper-injector"); str(mwc, "metadata", "annotations", "cert-manager.io/inject-ca-from") != "podkeeper-injector/podkeeper-injector" {
		t.Error("no cert-manager.io/inject-ca-from on the webhook configuration")
	}
	for _, o := range docs {
		switch o["kind"] {
		case "ClusterRole", "ClusterRoleBinding":
			t.Errorf("%s %s kept: the injector needs no cluster rights with cert-manager", o["kind"], str(o, "metadata", "name"))
		case "Role":
			if fmt.Sprint(list(o, "rules")) != "[map[apiGroups:[] resources:[events] verbs:[create patch]]]" {
				t.Errorf("Role with cert-manager: %v, want only events", list(o, "rules"))
			}
		}
		if o["kind"] == "Deployment" {
			for _, v := range violations(o) {
				t.Error(v)
			}
		}
	}
}

func pemBlock(b []byte) []byte {
	blk, _ := pem.Decode(b)
	if blk == nil {
		return nil
	}
	return blk.Bytes
}
