// Package k8s checks podkeeper's Kubernetes packaging: manifests/ and every
// kustomize overlay keep the Pod Security "restricted" settings and the agents'
// wiring (TestRestricted*, run by make test), and, when test/k8s/check.sh has
// started a real kube-apiserver, that the API accepts them, that the RBAC is
// exactly what the agents call, and that agents/kube posts Events and reads
// labels on it (apiserver_test.go).
package k8s

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"

	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"

	"github.com/podkeeper/podkeeper/test/peers"
)

type obj = map[string]any

// source is one thing a user applies: a manifests/ file or a rendered overlay.
type source struct {
	name string
	docs []obj
}

func root() string { return peers.Root() }

func parseDocs(t testing.TB, name string, b []byte) []obj {
	t.Helper()
	var out []obj
	for _, part := range bytes.Split(b, []byte("\n---")) {
		var o obj
		if err := yaml.Unmarshal(part, &o); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if len(o) > 0 {
			out = append(out, o)
		}
	}
	return out
}

// render runs kustomize (the library kubectl embeds) on dir.
func render(t testing.TB, dir string) []byte {
	t.Helper()
	b, err := renderErr(dir)
	if err != nil {
		t.Fatalf("kustomize %s: %v", dir, err)
	}
	return b
}

func renderErr(dir string) ([]byte, error) {
	m, err := krusty.MakeKustomizer(krusty.MakeDefaultOptions()).Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		return nil, err
	}
	return m.AsYaml()
}

func overlays(t testing.TB) []string {
	t.Helper()
	dirs, err := filepath.Glob(filepath.Join(root(), "kustomize", "overlays", "*"))
	if err != nil || len(dirs) < 3 {
		t.Fatalf("overlays: %v %v", dirs, err)
	}
	return dirs
}

func sources(t testing.TB) []source {
	t.Helper()
	var out []source
	files, _ := filepath.Glob(filepath.Join(root(), "manifests", "*.yaml"))
	if len(files) < 5 {
		t.Fatalf("manifests: %v", files)
	}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, source{"manifests/" + filepath.Base(f), parseDocs(t, f, b)})
	}
	for _, d := range overlays(t) {
		out = append(out, source{"kustomize/overlays/" + filepath.Base(d), parseDocs(t, d, render(t, d))})
	}
	out = append(out, source{"kustomize/examples/files-api (remote)", renderFilesAPI(t, nil)})
	return out
}

func get(o any, path ...string) any {
	for _, p := range path {
		m, ok := o.(obj)
		if !ok {
			return nil
		}
		o = m[p]
	}
	return o
}

func list(o any, path ...string) []any {
	l, _ := get(o, path...).([]any)
	return l
}

func str(o any, path ...string) string { s, _ := get(o, path...).(string); return s }

// podSpec returns the Pod spec of a workload (nil for other kinds).
func podSpec(o obj) obj {
	switch o["kind"] {
	case "Pod":
		s, _ := o["spec"].(obj)
		return s
	case "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job":
		s, _ := get(o, "spec", "template", "spec").(obj)
		return s
	}
	return nil
}

// kustomize/base generates the agents' ConfigMap with a hash suffix (podkeeper-<hash>), manifests/
// names it podkeeper.
var hashed = regexp.MustCompile(`^podkeeper-[a-z0-9]{10}$`)

func agentsConfigMap(name string) bool { return name == "podkeeper" || hashed.MatchString(name) }

// unhashed returns the containers with the agents' ConfigMap references named podkeeper, as the
// components write them before kustomize appends the hash.
func unhashed(cs []any) []any {
	out := deepCopy(cs).([]any)
	for _, c := range out {
		for _, e := range list(c, "envFrom") {
			if r, ok := get(e, "configMapRef").(obj); ok && agentsConfigMap(str(r, "name")) {
				r["name"] = "podkeeper"
			}
		}
	}
	return out
}

var varRef = regexp.MustCompile(`\$\(([A-Za-z_][A-Za-z0-9_]*)\)`)

var agentNames = []string{"restore", "syncer", "logshipper"}

// violations lists every restricted setting (and podkeeper wiring rule) the
// workload o breaks. Empty = good.
func violations(o obj) []string {
	spec := podSpec(o)
	if spec == nil {
		return nil
	}
	var v []string
	bad := func(format string, args ...any) { v = append(v, fmt.Sprintf(format, args...)) }
	for _, k := range []string{"hostNetwork", "hostPID", "hostIPC"} {
		if get(spec, k) == true {
			bad("%s: true", k)
		}
	}
	for _, vol := range list(spec, "volumes") {
		if get(vol, "hostPath") != nil {
			bad("volume %s: hostPath", str(vol, "name"))
		}
	}
	podNonRoot := get(spec, "securityContext", "runAsNonRoot") == true
	podSeccomp := str(spec, "securityContext", "seccompProfile", "type")
	if u, ok := get(spec, "securityContext", "runAsUser").(float64); ok && u == 0 {
		bad("pod runAsUser: 0")
	}
	var all []any
	all = append(all, list(spec, "initContainers")...)
	all = append(all, list(spec, "containers")...)
	if len(all) == 0 {
		bad("no containers")
	}
	seen := map[string]int{}
	for i, c := range all {
		name := str(c, "name")
		seen[name] = i
		sc, _ := get(c, "securityContext").(obj)
		if sc == nil {
			bad("%s: no securityContext", name)
			continue
		}
		if sc["allowPrivilegeEscalation"] != false {
			bad("%s: allowPrivilegeEscalation must be false", name)
		}
		if sc["privileged"] == true {
			bad("%s: privileged", name)
		}
		if !slices.Contains(list(sc, "capabilities", "drop"), any("ALL")) {
			bad("%s: capabilities.drop must contain ALL", name)
		}
		if add := list(sc, "capabilities", "add"); len(add) > 0 {
			bad("%s: capabilities.add %v", name, add)
		}
		if sc["readOnlyRootFilesystem"] != true {
			bad("%s: readOnlyRootFilesystem must be true", name)
		}
		if !podNonRoot && sc["runAsNonRoot"] != true {
			bad("%s: runAsNonRoot must be true (pod or container)", name)
		}
		if u, ok := sc["runAsUser"].(float64); ok && u == 0 {
			bad("%s: runAsUser 0", name)
		}
		if podSeccomp != "RuntimeDefault" && podSeccomp != "Localhost" {
			if t := str(sc, "seccompProfile", "type"); t != "RuntimeDefault" && t != "Localhost" {
				bad("%s: seccompProfile must be RuntimeDefault (pod or container)", name)
			}
		}
		// $(VAR) expands only when VAR is declared earlier in env (or comes from envFrom).
		declared := map[string]bool{}
		for _, e := range list(c, "env") {
			val := str(e, "value")
			for _, m := range varRef.FindAllStringSubmatch(val, -1) {
				if !declared[m[1]] {
					bad("%s: env %s uses $(%s) before it is declared", name, str(e, "name"), m[1])
				}
			}
			declared[str(e, "name")] = true
		}
		if slices.Contains(agentNames, name) {
			if u, _ := sc["runAsUser"].(float64); u != 65532 {
				bad("%s: runAsUser must be 65532", name)
			}
			if str(c, "resources", "limits", "memory") == "" || str(c, "resources", "requests", "memory") == "" || str(c, "resources", "requests", "cpu") == "" {
				bad("%s: requests (cpu, memory) and a memory limit are required", name)
			}
		}
	}
	// Every volumeMount names a volume of the Pod: kustomize renders a dangling one without a
	// complaint (an app without a "logs" volume given the logshipper), the API refuses it.
	vols := map[string]bool{}
	for _, vol := range list(spec, "volumes") {
		vols[str(vol, "name")] = true
	}
	for _, c := range all {
		for _, m := range list(c, "volumeMounts") {
			if !vols[str(m, "name")] {
				bad("%s: volumeMount %s names no volume of the Pod", str(c, "name"), str(m, "name"))
			}
		}
	}
	// podkeeper wiring: each agent that is there is complete, restricted on its own (whatever
	// the Pod says) and in order.
	_, hasRestore := seen["restore"]
	agents := 0
	for _, a := range agentNames {
		i, ok := seen[a]
		if !ok {
			continue
		}
		agents++
		c := all[i]
		sc, _ := get(c, "securityContext").(obj)
		for k, want := range map[string]any{"runAsNonRoot": true, "runAsUser": 65532.0, "runAsGroup": 65532.0} {
			if sc[k] != want {
				bad("%s: container securityContext %s must be %v, whatever the Pod sets", a, k, want)
			}
		}
		if str(sc, "seccompProfile", "type") != "RuntimeDefault" {
			bad("%s: container seccompProfile must be RuntimeDefault, whatever the Pod sets", a)
		}
		if !slices.ContainsFunc(list(c, "volumeMounts"), func(m any) bool {
			return str(m, "name") == "podkeeper-kube-api" && get(m, "readOnly") == true
		}) {
			bad("%s: must mount its own API token (podkeeper-kube-api, read-only)", a)
		}
		env := map[string]bool{}
		for _, e := range list(c, "env") {
			env[str(e, "name")] = true
		}
		for _, k := range []string{"POD_NAME", "POD_NAMESPACE", "POD_UID", "NODE_NAME"} {
			if !env[k] {
				bad("%s: env %s (downward API) missing", a, k)
			}
		}
	}
	if agents == 0 && str(o, "metadata", "labels", "podkeeper.io/agents") == "enabled" {
		bad("labelled podkeeper.io/agents=enabled but no agent attached")
	}
	if agents > 0 {
		inits := list(spec, "initContainers")
		if _, ok := seen["restore"]; ok && !slices.ContainsFunc(inits, func(c any) bool { return str(c, "name") == "restore" }) {
			bad("restore must be an init container")
		}
		for i, c := range inits {
			n := str(c, "name")
			if n == "syncer" || n == "logshipper" {
				if hasRestore && i < seen["restore"] {
					bad("%s declared before restore: it would start before the restore finished", n)
				}
				if str(c, "restartPolicy") != "Always" {
					bad("%s: an init container without restartPolicy: Always blocks the Pod", n)
				}
			}
		}
		if s, ok := seen["syncer"]; ok {
			if l, ok := seen["logshipper"]; ok && l < s {
				bad("logshipper declared before syncer")
			}
		}
		for _, n := range []string{"syncer", "logshipper"} {
			if i, ok := seen[n]; ok && (get(all[i], "startupProbe") == nil || get(all[i], "livenessProbe") == nil) {
				bad("%s: startupProbe and livenessProbe required", n)
			}
		}
		if _, ok := spec["terminationGracePeriodSeconds"]; ok {
			// Our examples set it (the components never do): it must leave the sidecars their time.
			grace, _ := get(spec, "terminationGracePeriodSeconds").(float64)
			if grace < 25+20+5 {
				bad("terminationGracePeriodSeconds %v must exceed SYNC_SHUTDOWN_TIMEOUT (25s) + LOGSHIP_SHUTDOWN_TIMEOUT (20s) + the app's own", grace)
			}
		} else {
			bad("terminationGracePeriodSeconds unset (30 s): too short for the app + LOGSHIP_SHUTDOWN_TIMEOUT (20s) + SYNC_SHUTDOWN_TIMEOUT (25s)")
		}
	}
	return v
}

func TestRestrictedManifestsAndOverlays(t *testing.T) {
	workloads, agents := 0, 0
	for _, s := range sources(t) {
		for _, o := range s.docs {
			if podSpec(o) == nil {
				continue
			}
			workloads++
			id := fmt.Sprintf("%s: %s/%s", s.name, o["kind"], str(o, "metadata", "name"))
			for _, v := range violations(o) {
				t.Errorf("%s: %s", id, v)
			}
			if slices.ContainsFunc(list(podSpec(o), "initContainers"), func(c any) bool { return str(c, "name") == "restore" }) {
				agents++
			}
		}
	}
	// manifests: deployment + statefulset; overlays: one upload workload each.
	if agents < 2+len(overlays(t)) {
		t.Errorf("only %d workloads carry the agents (of %d workloads): the component did not apply somewhere", agents, workloads)
	}
}

// The checker itself: removing any one restricted setting from a good
// workload must be reported.
func TestRestrictedCheckerCatchesEachSetting(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(root(), "manifests", "deployment.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	good := parseDocs(t, "deployment.yaml", b)[0]
	if v := violations(good); len(v) > 0 {
		t.Fatalf("good deployment reported: %v", v)
	}
	mutations := map[string]func(spec obj){
		"pod runAsNonRoot + container runAsNonRoot": func(s obj) {
			delete(get(s, "securityContext").(obj), "runAsNonRoot")
			delete(get(list(s, "containers")[0], "securityContext").(obj), "runAsNonRoot")
		},
		"allowPrivilegeEscalation": func(s obj) {
			delete(get(list(s, "initContainers")[1], "securityContext").(obj), "allowPrivilegeEscalation")
		},
		"drop ALL": func(s obj) { get(list(s, "initContainers")[2], "securityContext").(obj)["capabilities"] = obj{} },
		"add NET_RAW": func(s obj) {
			get(list(s, "initContainers")[0], "securityContext", "capabilities").(obj)["add"] = []any{"NET_RAW"}
		},
		"readOnlyRootFilesystem": func(s obj) { get(list(s, "containers")[0], "securityContext").(obj)["readOnlyRootFilesystem"] = false },
		"seccomp": func(s obj) {
			delete(get(s, "securityContext").(obj), "seccompProfile")
			delete(get(list(s, "initContainers")[0], "securityContext").(obj), "seccompProfile")
		},
		"privileged":     func(s obj) { get(list(s, "initContainers")[1], "securityContext").(obj)["privileged"] = true },
		"hostNetwork":    func(s obj) { s["hostNetwork"] = true },
		"hostPath":       func(s obj) { s["volumes"] = append(list(s, "volumes"), obj{"name": "h", "hostPath": obj{"path": "/"}}) },
		"root user":      func(s obj) { get(list(s, "initContainers")[0], "securityContext").(obj)["runAsUser"] = 0.0 },
		"memory limit":   func(s obj) { delete(get(list(s, "initContainers")[1], "resources", "limits").(obj), "memory") },
		"sidecar policy": func(s obj) { delete(list(s, "initContainers")[1].(obj), "restartPolicy") },
		"startup probe":  func(s obj) { delete(list(s, "initContainers")[2].(obj), "startupProbe") },
		"grace period":   func(s obj) { s["terminationGracePeriodSeconds"] = 30.0 },
		"dangling mount": func(s obj) {
			s["volumes"] = slices.DeleteFunc(list(s, "volumes"), func(v any) bool { return str(v, "name") == "logs" })
		},
		"agent runAsGroup": func(s obj) { delete(get(list(s, "initContainers")[1], "securityContext").(obj), "runAsGroup") },
		"agent seccomp (the Pod has one)": func(s obj) {
			delete(get(list(s, "initContainers")[2], "securityContext").(obj), "seccompProfile")
		},
		"agent downward env":       func(s obj) { c := list(s, "initContainers")[0].(obj); c["env"] = list(c, "env")[1:] },
		"logshipper before syncer": func(s obj) { l := list(s, "initContainers"); l[1], l[2] = l[2], l[1] },
		"restore not first":        func(s obj) { l := list(s, "initContainers"); l[0], l[1] = l[1], l[0] },
		"grace unset":              func(s obj) { delete(s, "terminationGracePeriodSeconds") },
		"token mount":              func(s obj) { c := list(s, "initContainers")[2].(obj); c["volumeMounts"] = list(c, "volumeMounts")[:2] },
		"env order": func(s obj) {
			c := list(s, "initContainers")[0].(obj)
			c["env"] = append([]any{obj{"name": "STORE_URL", "value": "s3://b/$(POD_NAME)"}}, list(c, "env")...)
		},
	}
	for name, mutate := range mutations {
		bad := parseDocs(t, "deployment.yaml", b)[0]
		mutate(podSpec(bad))
		if v := violations(bad); len(v) == 0 {
			t.Errorf("removing %q went unnoticed", name)
		}
	}
}

// components/{restore,syncer,logshipper} hold the agents' containers, manifests/*.yaml the same
// containers written out, classic-sidecars the sidecars without restartPolicy, and the rendered
// overlays the same again after the settings of kustomize/base/attach.yaml were copied in (so the
// defaults there match the containers'). None of them may drift.
func TestComponentMatchesManifests(t *testing.T) {
	read := func(p string) obj { return readDocs(t, p)[0] }
	patch := func(p string) obj { return get(read(p), "spec", "template", "spec").(obj) }
	var comp []any
	compVols := map[string]any{}
	for _, a := range agentNames {
		s := patch("kustomize/components/" + a + "/" + a + ".yaml")
		if len(list(s, "initContainers")) != 1 || len(s) != 2 {
			t.Errorf("components/%s/%s.yaml sets more than its container and volumes: %v", a, a, keys(s))
		}
		comp = append(comp, list(s, "initContainers")...)
		for _, v := range list(s, "volumes") {
			if w, ok := compVols[str(v, "name")]; ok && !reflect.DeepEqual(w, v) {
				t.Errorf("volume %s differs between components", str(v, "name"))
			}
			compVols[str(v, "name")] = v
		}
	}
	perPod := func(cs []any) []any {
		out := deepCopy(cs).([]any)
		for _, c := range out {
			for _, e := range list(c, "env") {
				if str(e, "name") == "PODKEEPER_STORE_SUFFIX" {
					e.(obj)["value"] = "/$(POD_NAME)"
				}
			}
		}
		return out
	}
	for f, want := range map[string][]any{"manifests/deployment.yaml": comp, "manifests/statefulset.yaml": perPod(comp)} {
		spec := podSpec(read(f))
		if !reflect.DeepEqual(list(spec, "initContainers"), want) {
			t.Errorf("%s: initContainers differ from components/{restore,syncer,logshipper}", f)
		}
		for n, v := range compVols {
			i := slices.IndexFunc(list(spec, "volumes"), func(x any) bool { return str(x, "name") == n })
			if i < 0 || !reflect.DeepEqual(list(spec, "volumes")[i], v) {
				t.Errorf("%s: volume %s differs from the components'", f, n)
			}
		}
	}
	for _, o := range []struct {
		name string
		want []any
	}{{"dev", comp}, {"statefulset", perPod(comp)}} {
		for _, d := range parseDocs(t, o.name, render(t, filepath.Join(root(), "kustomize", "overlays", o.name))) {
			if str(d, "metadata", "labels", "podkeeper.io/agents") == "enabled" {
				if got := unhashed(list(podSpec(d), "initContainers")); !reflect.DeepEqual(got, o.want) {
					t.Errorf("overlays/%s: rendered agents differ from the components' (kustomize/base/attach.yaml defaults drifted?)", o.name)
				}
			}
		}
	}
	classic := patch("kustomize/components/classic-sidecars/sidecars.yaml")
	got := list(classic, "containers")
	if len(got) != 2 {
		t.Fatalf("classic-sidecars has %d sidecars", len(got))
	}
	for i, w := range comp[1:] {
		w := maps(w.(obj))
		delete(w, "restartPolicy")
		if !reflect.DeepEqual(w, got[i]) {
			t.Errorf("classic-sidecars %s differs from components/%s", str(w, "name"), str(w, "name"))
		}
	}
}

func maps(o obj) obj {
	c := obj{}
	for k, v := range o {
		c[k] = v
	}
	return c
}

// The variables the manifests set must be ones the agents read: a typo in a
// ConfigMap key is silently ignored by the agent.
func TestConfigMapKeysAreKnownVariables(t *testing.T) {
	// AWS_EC2_METADATA_DISABLED is the SDK's own: TestS3CredentialsNeverFallBack.
	known := map[string]bool{"STORE_URL": true, "AWS_EC2_METADATA_DISABLED": true}
	for _, f := range []string{"docs/configuration.md", "docs/restore.md", "docs/syncer.md", "docs/logshipper.md"} {
		b, err := os.ReadFile(filepath.Join(root(), f))
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(line, "| `") {
				known[strings.Trim(strings.Fields(line)[1], "`")] = true
			}
		}
	}
	b, err := os.ReadFile(filepath.Join(root(), "manifests", "config.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	for _, o := range parseDocs(t, "config.yaml", b) {
		if o["kind"] != "ConfigMap" {
			continue
		}
		for k := range get(o, "data").(obj) {
			if !known[k] {
				t.Errorf("ConfigMap key %s is no agent variable in the tables of docs/", k)
			}
		}
	}
}

// A missing or misnamed S3 Secret must stop the Pod (the kubelet refuses a
// required secretRef), never let the SDK fall back to the node's instance role:
// the Secret is required wherever the agents use keys, absent where the overlay
// uses workload identity (aws), and IMDS is off in every agents' ConfigMap.
func TestS3CredentialsNeverFallBack(t *testing.T) {
	checked, configMaps := 0, 0
	for _, s := range sources(t) {
		identity := strings.HasSuffix(s.name, "/aws")
		for _, o := range s.docs {
			if o["kind"] == "ConfigMap" && agentsConfigMap(str(o, "metadata", "name")) {
				configMaps++
				if v := str(o, "data", "AWS_EC2_METADATA_DISABLED"); v != "true" {
					t.Errorf("%s: ConfigMap podkeeper has AWS_EC2_METADATA_DISABLED=%q, want \"true\"", s.name, v)
				}
			}
			spec := podSpec(o)
			if spec == nil {
				continue
			}
			if identity {
				// IRSA injects the role's token into every container the webhook
				// is not told to skip: the app's must all be skipped.
				skip := "," + str(o, "spec", "template", "metadata", "annotations", "eks.amazonaws.com/skip-containers") + ","
				for _, c := range append(list(spec, "initContainers"), list(spec, "containers")...) {
					if name := str(c, "name"); !slices.Contains(agentNames, name) && !strings.Contains(skip, ","+name+",") {
						t.Errorf("%s: %s/%s: container %s would get the agents' IAM token (not in eks.amazonaws.com/skip-containers)", s.name, o["kind"], str(o, "metadata", "name"), name)
					}
				}
			}
			for _, c := range append(list(spec, "initContainers"), list(spec, "containers")...) {
				name := str(c, "name")
				if name != "restore" && name != "syncer" {
					continue
				}
				checked++
				var refs []any
				for _, e := range list(c, "envFrom") {
					if r := get(e, "secretRef"); r != nil {
						refs = append(refs, r)
					}
				}
				id := fmt.Sprintf("%s: %s/%s container %s", s.name, o["kind"], str(o, "metadata", "name"), name)
				switch {
				case identity && len(refs) > 0:
					t.Errorf("%s: reads a Secret although the overlay uses workload identity", id)
				case !identity && len(refs) != 1:
					t.Errorf("%s: %d S3 secretRefs, want 1", id, len(refs))
				case !identity && get(refs[0], "optional") == true:
					t.Errorf("%s: the S3 secretRef is optional: a missing Secret would make the SDK try the node's role", id)
				}
			}
		}
	}
	// manifests/config.yaml, every overlay and the files-api example.
	if configMaps < 1+len(overlays(t))+1 {
		t.Errorf("only %d agents' ConfigMaps found", configMaps)
	}
	if checked < 2*(2+len(overlays(t))) {
		t.Fatalf("only %d restore/syncer containers found", checked)
	}
}
