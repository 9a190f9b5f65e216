package injector

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	jsonpatch "gopkg.in/evanphx/json-patch.v4"
	"sigs.k8s.io/yaml"
)

var update = flag.Bool("update", false, "rewrite testdata/golden/*.json from the current output")

// pod is a Pod as the ReplicaSet controller creates it from a plain, restricted
// Deployment template: an app container, an uploads and a logs volume.
func pod(ann map[string]string, edit ...func(obj)) obj {
	p := obj{
		"apiVersion": "v1", "kind": "Pod",
		"metadata": obj{
			"generateName": "files-api-5d8f7c9b4-",
			"namespace":    "files",
			"labels":       obj{"app": "files-api", "pod-template-hash": "5d8f7c9b4"},
			"ownerReferences": []any{obj{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "files-api-5d8f7c9b4",
				"uid": "1b4f0c4e-0000-4000-8000-000000000001", "controller": true, "blockOwnerDeletion": true}},
		},
		"spec": obj{
			"serviceAccountName":            "files-api",
			"terminationGracePeriodSeconds": 300,
			"securityContext": obj{"runAsNonRoot": true, "runAsUser": 1000, "fsGroup": 1000,
				"seccompProfile": obj{"type": "RuntimeDefault"}},
			"containers": []any{obj{"name": "app", "image": "example/files-api:1",
				"volumeMounts":    []any{obj{"name": "uploads", "mountPath": "/srv/uploads"}, obj{"name": "logs", "mountPath": "/logs"}},
				"securityContext": obj{"allowPrivilegeEscalation": false, "capabilities": obj{"drop": []any{"ALL"}}}}},
			"volumes": []any{obj{"name": "uploads", "emptyDir": obj{}}, obj{"name": "logs", "emptyDir": obj{}}},
		},
	}
	if ann != nil {
		m := obj{}
		for k, v := range ann {
			m[k] = v
		}
		p["metadata"].(obj)["annotations"] = m
	}
	for _, e := range edit {
		e(p)
	}
	return p
}

func owner(kind, name string) func(obj) {
	return func(p obj) {
		m := p["metadata"].(obj)
		m["ownerReferences"] = []any{obj{"apiVersion": "apps/v1", "kind": kind, "name": name, "uid": "u", "controller": true}}
		delete(m["labels"].(obj), "pod-template-hash")
		m["generateName"] = name + "-"
	}
}

func initContainers(cs ...obj) func(obj) {
	return func(p obj) {
		l := []any{}
		for _, c := range cs {
			l = append(l, c)
		}
		p["spec"].(obj)["initContainers"] = l
	}
}

func dropVolume(name string) func(obj) {
	return func(p obj) {
		var keep []any
		for _, v := range p["spec"].(obj)["volumes"].([]any) {
			if v.(obj)["name"] != name {
				keep = append(keep, v)
			}
		}
		p["spec"].(obj)["volumes"] = keep
	}
}

var on = map[string]string{AnnInject: "true", AnnStoreURL: "s3://acme-files/files-api"}

func with(kv ...string) map[string]string {
	m := map[string]string{}
	for k, v := range on {
		m[k] = v
	}
	for i := 0; i < len(kv); i += 2 {
		if kv[i+1] == "-" {
			delete(m, kv[i])
		} else {
			m[kv[i]] = kv[i+1]
		}
	}
	return m
}

type tcase struct {
	name     string
	pod      obj
	defaults map[string]string
	nsOptIn  bool
	classic  bool
}

func cases() []tcase {
	tmpl := map[string]string{"store-url": "s3://platform-uploads/{namespace}/{workload}"}
	migrate := obj{"name": "migrate", "image": "example/migrate:1"}
	proxy := obj{"name": "proxy", "image": "example/proxy:1", "restartPolicy": "Always"}
	return []tcase{
		// workloads
		{name: "deployment-pod", pod: pod(on)},
		{name: "statefulset-pod-template-url", pod: pod(with(AnnStoreURL, "-"), owner("StatefulSet", "files-db")), defaults: tmpl},
		{name: "job-pod", pod: pod(with(AnnAgents, "restore,syncer"), owner("Job", "import-2026"), dropVolume("logs"))},
		{name: "deployment-pod-template-url", pod: pod(with(AnnStoreURL, "-")), defaults: tmpl},
		// the host's own init containers and sidecars stay first
		{name: "existing-init-containers", pod: pod(on, initContainers(migrate))},
		{name: "existing-native-sidecar", pod: pod(on, initContainers(migrate, proxy))},
		// classic sidecars (API server < 1.29)
		{name: "classic", pod: pod(on), classic: true},
		{name: "classic-existing-init", pod: pod(on, initContainers(migrate)), classic: true},
		// opt-in
		{name: "not-requested", pod: pod(nil)},
		{name: "inject-false", pod: pod(with(AnnInject, "false"))},
		{name: "namespace-opt-in", pod: pod(map[string]string{}), nsOptIn: true, defaults: tmpl},
		{name: "namespace-opt-in-no-annotations", pod: pod(nil), nsOptIn: true, defaults: tmpl},
		{name: "namespace-opt-in-pod-says-false", pod: pod(map[string]string{AnnInject: "false"}), nsOptIn: true, defaults: tmpl},
		// idempotence: a Pod that has some or all agents already
		{name: "partly-injected", pod: pod(with(AnnInjected, "restore (native)"), initContainers(mustContainer("restore")))},
		{name: "already-injected", pod: pod(on, initContainers(mustContainer("restore"), mustContainer("syncer"), mustContainer("logshipper")))},
		// each annotation
		{name: "ann-agents-logshipper-only", pod: pod(with(AnnAgents, "logshipper", AnnStoreURL, "-"))},
		{name: "ann-agents-order-and-spaces", pod: pod(with(AnnAgents, "syncer, restore"))},
		{name: "ann-uploads-volume-and-path", pod: pod(with(AnnUploadsVolume, "data", AnnUploadsPath, "/srv/files"), func(p obj) {
			p["spec"].(obj)["volumes"].([]any)[0].(obj)["name"] = "data"
		})},
		{name: "ann-logs-volume-and-path", pod: pod(with(AnnLogsVolume, "applogs", AnnLogsPath, "/logs"), func(p obj) {
			p["spec"].(obj)["volumes"].([]any)[1].(obj)["name"] = "applogs"
		})},
		{name: "ann-store-url-file", pod: pod(with(AnnStoreURL, "file:///mnt/store/files-api"))},
		{name: "ann-store-url-beats-template", pod: pod(on), defaults: tmpl},
		{name: "ann-per-pod-prefix-statefulset", pod: pod(with(AnnPerPodPrefix, "true"), owner("StatefulSet", "files-db"))},
		{name: "ann-per-pod-prefix-classic", pod: pod(with(AnnPerPodPrefix, "true"), owner("StatefulSet", "files-db")), classic: true},
		{name: "ann-restore-first", pod: pod(with(AnnRestoreFirst, "true"), initContainers(migrate, proxy))},
		{name: "ann-restore-first-no-init-containers", pod: pod(with(AnnRestoreFirst, "true"))},
		{name: "ann-restore-first-false", pod: pod(with(AnnRestoreFirst, "false"), initContainers(migrate))},
		// platform defaults
		{name: "defaults-images-resources-agents", pod: pod(on), defaults: map[string]string{
			"agents": "restore,syncer", "syncer-image": "registry.example/podkeeper/syncer:v0.1.0",
			"syncer-memory-limit": "512Mi", "uploads-mount-path": "/uploads"}},
		{name: "defaults-workload-identity", pod: pod(on), defaults: map[string]string{"s3-secret": "none", "configmap": "podkeeper-agents"}},
		{name: "defaults-s3-secret-named", pod: pod(on), defaults: map[string]string{"s3-secret": "files-s3"}},
		// bad values: refused, naming the annotation
		{name: "bad-inject", pod: pod(with(AnnInject, "yes"))},
		{name: "bad-agents-unknown", pod: pod(with(AnnAgents, "restore,backup"))},
		{name: "bad-agents-twice", pod: pod(with(AnnAgents, "syncer,syncer"))},
		{name: "bad-agents-empty", pod: pod(with(AnnAgents, ""))},
		{name: "bad-uploads-volume-name", pod: pod(with(AnnUploadsVolume, "Uploads"))},
		{name: "bad-uploads-volume-own", pod: pod(with(AnnUploadsVolume, "podkeeper-state"))},
		{name: "bad-uploads-volume-missing", pod: pod(with(AnnUploadsVolume, "files"))},
		{name: "bad-uploads-path-relative", pod: pod(with(AnnUploadsPath, "data"))},
		{name: "bad-uploads-path-unclean", pod: pod(with(AnnUploadsPath, "/data/../etc"))},
		{name: "bad-uploads-path-token", pod: pod(with(AnnUploadsPath, "/var/run/secrets"))},
		{name: "bad-logs-volume-missing", pod: pod(on, dropVolume("logs"))},
		{name: "bad-logs-path-root", pod: pod(with(AnnLogsPath, "/"))},
		{name: "bad-store-url-scheme", pod: pod(with(AnnStoreURL, "https://acme-files/x"))},
		{name: "bad-store-url-no-bucket", pod: pod(with(AnnStoreURL, "s3:///x"))},
		{name: "bad-store-url-missing", pod: pod(with(AnnStoreURL, "-"))},
		{name: "bad-per-pod-prefix-deployment", pod: pod(with(AnnPerPodPrefix, "true"))},
		{name: "bad-per-pod-prefix-value", pod: pod(with(AnnPerPodPrefix, "yes"), owner("StatefulSet", "files-db"))},
		{name: "bad-restore-first-value", pod: pod(with(AnnRestoreFirst, "1"))},
		{name: "bad-unknown-annotation", pod: pod(with(Prefix+"store-prefix", "s3://x/y"))},
	}
}

func mustContainer(name string) obj { return deepCopy(builtin.native[name]).(obj) }

type golden struct {
	Added []string `json:"added,omitempty"`
	Patch []Op     `json:"patch,omitempty"`
	None  string   `json:"unchanged,omitempty"`
	Error string   `json:"error,omitempty"`
	Ann   string   `json:"annotation,omitempty"`
}

// TestMutateGolden: the JSON patch of each case, against testdata/golden/<case>.json
// (go test ./injector -run Golden -update rewrites them; review the diff).
func TestMutateGolden(t *testing.T) {
	seen := map[string]bool{}
	for _, c := range cases() {
		t.Run(c.name, func(t *testing.T) {
			if seen[c.name] {
				t.Fatal("duplicate case")
			}
			seen[c.name] = true
			d, err := ParseDefaults(c.defaults)
			if err != nil {
				t.Fatal(err)
			}
			orig := deepCopy(c.pod).(obj)
			res, err := Mutate(d, Request{Pod: c.pod, Namespace: "files", NSOptIn: c.nsOptIn, Native: !c.classic})
			if !jsonEqual(orig, c.pod) {
				t.Fatal("Mutate changed its input")
			}
			var g golden
			if err != nil {
				g.Error = err.Error()
				var bad *Error
				if !errors.As(err, &bad) {
					t.Fatalf("not an *Error: %v", err)
				}
				g.Ann = bad.Annotation
				if !strings.Contains(g.Error, bad.Annotation) {
					t.Errorf("message does not name the annotation: %s", g.Error)
				}
			} else {
				g.Added, g.Patch, g.None = res.Added, res.Patch, res.Reason
			}
			if strings.HasPrefix(c.name, "bad-") != (err != nil) {
				t.Fatalf("bad-* cases must fail, the others pass: %v", err)
			}
			got, _ := json.MarshalIndent(g, "", "  ")
			got = append(got, '\n')
			file := filepath.Join("testdata", "golden", c.name+".json")
			if *update {
				os.MkdirAll(filepath.Dir(file), 0o755)
				if err := os.WriteFile(file, got, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(file)
			if err != nil {
				t.Fatalf("%v (run with -update to create it)", err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("patch differs from %s:\n got: %s\nwant: %s", file, got, want)
			}
			if res.Patch == nil {
				return
			}
			checkApplied(t, c, orig, res)
		})
	}
}

// checkApplied applies the patch as the API server does, then checks the
// result: the host Pod unchanged but for the added containers, volumes and
// annotations; the agents in order after the host's own; and a second pass
// (reinvocation) changes nothing.
func checkApplied(t *testing.T, c tcase, orig obj, res Result) {
	t.Helper()
	pb, _ := json.Marshal(res.Patch)
	p, err := jsonpatch.DecodePatch(pb)
	if err != nil {
		t.Fatal(err)
	}
	ob, _ := json.Marshal(orig)
	out, err := p.Apply(ob)
	if err != nil {
		t.Fatalf("the patch does not apply: %v", err)
	}
	var mutated obj
	json.Unmarshal(out, &mutated)
	// Host fields: everything but initContainers, containers, volumes, annotations.
	for k, v := range orig["spec"].(obj) {
		switch k {
		case "initContainers", "containers", "volumes":
			// the host's items stay, unchanged and in their order; first unless restore-first
			l := v.([]any)
			ml := mutated["spec"].(obj)[k].([]any)
			var host []any
			for _, x := range ml {
				if n, _ := x.(obj)["name"].(string); !slices.Contains(res.Added, n) && !strings.HasPrefix(n, "podkeeper-") {
					host = append(host, x)
				}
			}
			if !jsonEqual(l, host) {
				t.Errorf("spec.%s: the host's items changed", k)
			}
			if rf, _ := dig(orig, "metadata", "annotations", AnnRestoreFirst).(string); rf != "true" && !jsonEqual(l, ml[:len(l)]) {
				t.Errorf("spec.%s: the host's items are not first", k)
			}
		default:
			if !jsonEqual(v, mutated["spec"].(obj)[k]) {
				t.Errorf("spec.%s changed", k)
			}
		}
	}
	for k := range mutated["spec"].(obj) {
		if _, ok := orig["spec"].(obj)[k]; !ok && k != "initContainers" {
			t.Errorf("spec.%s added", k)
		}
	}
	for k, v := range orig["metadata"].(obj) {
		if k != "annotations" && !jsonEqual(v, mutated["metadata"].(obj)[k]) {
			t.Errorf("metadata.%s changed", k)
		}
	}
	// Reinvocation: nothing more to do.
	d, _ := ParseDefaults(c.defaults)
	again, err := Mutate(d, Request{Pod: mutated, Namespace: "files", NSOptIn: c.nsOptIn, Native: !c.classic})
	if err != nil || again.Patch != nil {
		t.Errorf("second pass: %v %+v", err, again.Patch)
	}
	// Each added agent once, in initContainers (native, restore) or containers (classic).
	for _, a := range res.Added {
		where := "initContainers"
		if c.classic && a != "restore" {
			where = "containers"
		}
		n := 0
		for _, x := range mutated["spec"].(obj)[where].([]any) {
			if x.(obj)["name"] == a {
				n++
			}
		}
		if n != 1 {
			t.Errorf("%s: %d containers in %s", a, n, where)
		}
	}
}

// The containers are the components' own: the restore container of a Pod
// injected with the components' defaults is byte-for-byte restore.yaml's.
func TestContainersAreTheComponents(t *testing.T) {
	d, _ := ParseDefaults(nil)
	res, err := Mutate(d, Request{Pod: pod(on), Native: true})
	if err != nil {
		t.Fatal(err)
	}
	var inits []any
	for _, op := range res.Patch {
		if op.Path == "/spec/initContainers" {
			inits = op.Value.([]any)
		}
	}
	if len(inits) != 3 {
		t.Fatalf("init containers: %v", inits)
	}
	for i, a := range Agents {
		if !jsonEqual(inits[i], builtin.native[a]) {
			t.Errorf("%s differs from its component:\n%v\n%v", a, inits[i], builtin.native[a])
		}
	}
	// classic: syncer and logshipper are components/classic-sidecars' containers.
	res, _ = Mutate(d, Request{Pod: pod(on), Native: false})
	n := 0
	for _, op := range res.Patch {
		if op.Path == "/spec/containers/-" {
			if !jsonEqual(op.Value, builtin.classic[op.Value.(obj)["name"].(string)]) {
				t.Errorf("classic %v differs from components/classic-sidecars", op.Value.(obj)["name"])
			}
			n++
		}
	}
	if n != 2 {
		t.Fatalf("classic containers: %d", n)
	}
}

func TestParseDefaultsRefuses(t *testing.T) {
	for _, data := range []map[string]string{
		{"uploads-volum": "x"},
		{"agents": "restore,sync"},
		{"store-url": "s3://b/{namespace}/{pod}"},
		{"store-url": "http://b/{namespace}"},
		{"sidecars": "yes"},
		{"syncer-cpu-limit": "lots"},
		{"logs-mount-path": "logs"},
		{"s3-secret": "Files_S3"},
		{"configmap": "none"},
	} {
		if _, err := ParseDefaults(data); err == nil {
			t.Errorf("%v accepted", data)
		}
	}
}

func TestWorkload(t *testing.T) {
	for want, p := range map[string]obj{
		"files-api": pod(nil),
		"files-db":  pod(nil, owner("StatefulSet", "files-db")),
		"import":    pod(nil, owner("Job", "import")),
		"bare":      {"metadata": obj{"name": "bare"}},
		"gen":       {"metadata": obj{"generateName": "gen-"}},
	} {
		if got := Workload(p); got != want {
			t.Errorf("Workload = %q, want %q", got, want)
		}
	}
}

// podkeeper.io/per-pod-prefix writes components/per-pod-prefix's suffix.
func TestPerPodSuffixIsTheComponents(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("..", "kustomize", "components", "per-pod-prefix", "prefix.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var cm struct{ Data map[string]string }
	if err := yaml.Unmarshal(b, &cm); err != nil {
		t.Fatal(err)
	}
	if cm.Data["suffix"] != perPodSuffix {
		t.Fatalf("components/per-pod-prefix uses %q, the injector %q", cm.Data["suffix"], perPodSuffix)
	}
}
