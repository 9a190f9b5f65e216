package k8s

// Attaching to a workload the user does not own (issue 14): the components add the agents and
// nothing else, take their settings from the user's kustomization, and work through a remote
// reference the way a user writes it (kustomize fetching a git repository pinned to a tag).

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
)

// githubURL is how docs and examples reference podkeeper; the tests point it at a local clone.
const githubURL = "https://github.com/podkeeper/podkeeper"

var (
	remoteOnce sync.Once
	remoteDir  string
	remoteURL  string
	remoteErr  error
)

// TestMain removes the clone remoteRepo made (it outlives single tests: one clone per run).
func TestMain(m *testing.M) {
	code := m.Run()
	if remoteDir != "" {
		os.RemoveAll(remoteDir)
	}
	os.Exit(code)
}

// remoteRepo makes a git repository holding this tree's kustomize/ (working copy, so uncommitted
// changes are tested too), tagged with the ref the files-api example pins, and returns its
// file:// URL: kustomize clones it exactly as it clones github.com (git clone, checkout of the tag).
func remoteRepo(t testing.TB) string {
	t.Helper()
	remoteOnce.Do(func() {
		dir, err := os.MkdirTemp("", "podkeeper-remote-")
		if err != nil {
			remoteErr = err
			return
		}
		remoteDir = dir
		if err := os.CopyFS(filepath.Join(dir, "kustomize"), os.DirFS(filepath.Join(root(), "kustomize"))); err != nil {
			remoteErr = err
			return
		}
		git := func(args ...string) {
			if remoteErr != nil {
				return
			}
			cmd := exec.Command("git", append([]string{"-c", "user.email=test@podkeeper", "-c", "user.name=test", "-c", "commit.gpgsign=false"}, args...)...)
			cmd.Dir = dir
			cmd.Env = append(os.Environ(), "GIT_CONFIG_NOSYSTEM=1")
			if out, err := cmd.CombinedOutput(); err != nil {
				remoteErr = fmt.Errorf("git %v: %v\n%s", args, err, out)
			}
		}
		git("init", "-q", "-b", "main")
		git("add", "-A")
		git("commit", "-q", "-m", "podkeeper kustomize tree under test")
		git("tag", exampleRef(t))
		remoteURL = "file://" + dir
	})
	if remoteErr != nil {
		t.Fatal(remoteErr)
	}
	return remoteURL
}

var refRE = regexp.MustCompile(`\?ref=(v[0-9.]+)`)

// exampleRef is the tag kustomize/examples/files-api pins.
func exampleRef(t testing.TB) string {
	b, err := os.ReadFile(filepath.Join(root(), "kustomize", "examples", "files-api", "kustomization.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	m := refRE.FindSubmatch(b)
	if m == nil {
		t.Fatal("files-api example pins no ?ref=vX.Y.Z")
	}
	return string(m[1])
}

// renderFilesAPI renders kustomize/examples/files-api as a user would with podkeeper fetched from
// git, the GitHub address swapped for the local clone. edit changes the kustomization text first.
func renderFilesAPI(t testing.TB, edit func(string) string) []obj {
	t.Helper()
	src := filepath.Join(root(), "kustomize", "examples", "files-api")
	k, err := os.ReadFile(filepath.Join(src, "kustomization.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(k), githubURL+"//kustomize/") {
		t.Fatalf("the files-api example does not reference %s", githubURL)
	}
	text := string(k)
	if edit != nil {
		text = edit(text)
	}
	text = strings.ReplaceAll(text, githubURL, remoteRepo(t))
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "kustomization.yaml"), []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	app, err := os.ReadFile(filepath.Join(src, "files-api.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "files-api.yaml"), app, 0o644); err != nil {
		t.Fatal(err)
	}
	return parseDocs(t, "files-api (remote)", render(t, dir))
}

func find(docs []obj, kind, name string) obj {
	for _, o := range docs {
		if o["kind"] == kind && str(o, "metadata", "name") == name {
			return o
		}
	}
	return nil
}

func names(l []any) []string {
	var out []string
	for _, c := range l {
		out = append(out, str(c, "name"))
	}
	return out
}

func container(spec obj, name string) obj {
	for _, c := range append(list(spec, "initContainers"), list(spec, "containers")...) {
		if str(c, "name") == name {
			return c.(obj)
		}
	}
	return nil
}

// addedByPodkeeper: what the components may add to a Pod. Anything else must be as the user wrote it.
var addedContainers = []string{"restore", "syncer", "logshipper"}

func addedVolume(name string) bool { return strings.HasPrefix(name, "podkeeper-") }

// hostDiff compares the Pod template the user wrote with the rendered one, minus what podkeeper
// adds (its containers, its podkeeper-* volumes) and the documented podkeeper.io/store-url
// annotation. Empty = the host Pod is untouched.
func hostDiff(orig, rendered obj) []string {
	var d []string
	strip := func(tmpl obj) obj {
		c := deepCopy(tmpl).(obj)
		spec, _ := c["spec"].(obj)
		for _, k := range []string{"initContainers", "containers"} {
			l := slices.DeleteFunc(list(spec, k), func(x any) bool { return slices.Contains(addedContainers, str(x, "name")) })
			if len(l) == 0 {
				delete(spec, k)
			} else {
				spec[k] = l
			}
		}
		spec["volumes"] = slices.DeleteFunc(list(spec, "volumes"), func(x any) bool { return addedVolume(str(x, "name")) })
		if a, ok := get(c, "metadata", "annotations").(obj); ok {
			delete(a, "podkeeper.io/store-url")
			if len(a) == 0 {
				delete(c["metadata"].(obj), "annotations")
			}
		}
		return c
	}
	o, r := strip(get(orig, "spec", "template").(obj)), strip(get(rendered, "spec", "template").(obj))
	for _, k := range keys(o["spec"].(obj), r["spec"].(obj)) {
		if a, b := get(o, "spec", k), get(r, "spec", k); !reflect.DeepEqual(a, b) {
			d = append(d, fmt.Sprintf("pod spec %s: was %v, rendered %v", k, a, b))
		}
	}
	if a, b := o["metadata"], r["metadata"]; !reflect.DeepEqual(a, b) {
		d = append(d, fmt.Sprintf("pod metadata: was %v, rendered %v", a, b))
	}
	return d
}

func keys(ms ...obj) []string {
	var out []string
	for _, m := range ms {
		for k := range m {
			if !slices.Contains(out, k) {
				out = append(out, k)
			}
		}
	}
	slices.Sort(out)
	return out
}

func deepCopy(v any) any {
	switch x := v.(type) {
	case obj:
		c := obj{}
		for k, e := range x {
			c[k] = deepCopy(e)
		}
		return c
	case []any:
		c := make([]any, len(x))
		for i, e := range x {
			c[i] = deepCopy(e)
		}
		return c
	}
	return v
}

func readDocs(t testing.TB, rel string) []obj {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(root(), rel))
	if err != nil {
		t.Fatal(err)
	}
	return parseDocs(t, rel, b)
}

// The files-api, attached with the example's kustomization through a remote reference:
// its Pod keeps its ServiceAccount, user, fsGroup, grace period and init container (first), the
// agents get the user's settings, and nothing of podkeeper's settings object is applied.
func TestRemoteFilesAPI(t *testing.T) {
	orig := find(readDocs(t, "kustomize/examples/files-api/files-api.yaml"), "Deployment", "files-api")
	docs := renderFilesAPI(t, nil)
	dep := find(docs, "Deployment", "files-api")
	if dep == nil {
		t.Fatal("no Deployment files-api rendered")
	}
	for _, d := range hostDiff(orig, dep) {
		t.Errorf("host Pod rewritten: %s", d)
	}
	for _, v := range violations(dep) {
		t.Errorf("files-api: %s", v)
	}
	spec := podSpec(dep)
	if got, want := names(list(spec, "initContainers")), []string{"migrate", "restore", "syncer"}; !slices.Equal(got, want) {
		t.Errorf("init containers %v, want %v (the user's own first)", got, want)
	}
	for _, a := range []string{"restore", "syncer"} {
		c := container(spec, a)
		if m := list(c, "volumeMounts")[0]; str(m, "name") != "data" || str(m, "mountPath") != "/data" {
			t.Errorf("%s mounts %v, want volume data (uploads-volume=data) at /data", a, m)
		}
		if img := str(c, "image"); !strings.HasPrefix(img, "registry.example.com/mirror/podkeeper-"+a+":") {
			t.Errorf("%s image %s: the user's images: override not applied", a, img)
		}
	}
	if got := str(container(spec, "syncer"), "resources", "limits", "memory"); got != "512Mi" {
		t.Errorf("syncer memory limit %q, want the user's 512Mi", got)
	}
	if got := str(container(spec, "restore"), "resources", "limits", "memory"); got != "256Mi" {
		t.Errorf("restore memory limit %q, want the default 256Mi", got)
	}
	if got := str(dep, "spec", "template", "metadata", "annotations", "podkeeper.io/store-url"); got != "s3://acme-files/files-api" {
		t.Errorf("store-url annotation %q", got)
	}
	if rb := find(docs, "RoleBinding", "podkeeper-agents-files-api"); rb == nil || str(list(rb, "subjects")[0], "name") != "files-api" || str(rb, "roleRef", "name") != "podkeeper-agents" {
		t.Errorf("no RoleBinding podkeeper-agents-files-api of the Role to files-api's ServiceAccount: %v", rb)
	}
	// The agents' ConfigMap is this kustomization's own (hash-suffixed), the agents name it, and the
	// user's patch reached it.
	for _, a := range []string{"restore", "syncer"} {
		for _, e := range list(container(spec, a), "envFrom") {
			if n := str(e, "configMapRef", "name"); n != "" {
				cm := find(docs, "ConfigMap", n)
				if !hashed.MatchString(n) || cm == nil {
					t.Errorf("%s reads ConfigMap %q: not a generated podkeeper-<hash> of this render", a, n)
				} else if str(cm, "data", "S3_REGION") != "eu-west-1" {
					t.Errorf("ConfigMap %s: the user's S3_REGION patch is missing: %v", n, cm["data"])
				}
			}
		}
	}
	if find(docs, "ConfigMap", "podkeeper-attach") != nil {
		t.Error("podkeeper-attach (local-config) is in the output")
	}
	if find(docs, "ServiceAccount", "podkeeper") != nil {
		t.Error("a podkeeper ServiceAccount is rendered: the agents run as the Pod's own")
	}

	// The order switch: restore before the user's init containers, the sidecars still after them.
	docs = renderFilesAPI(t, func(k string) string {
		return strings.Replace(k, "# - "+githubURL, "- "+githubURL, 1)
	})
	dep = find(docs, "Deployment", "files-api")
	if got, want := names(list(podSpec(dep), "initContainers")), []string{"restore", "migrate", "syncer"}; !slices.Equal(got, want) {
		t.Errorf("restore-first: init containers %v, want %v", got, want)
	}
	for _, d := range hostDiff(orig, dep) {
		t.Errorf("restore-first: host Pod rewritten: %s", d)
	}
}

// Each component alone, and the combinations the docs name, on files-api (logs on stdout, no
// "logs" volume): valid Pods (every volumeMount has its volume), the host untouched, the agents
// after the user's init container, and only the agents asked for.
func TestComponentsAlone(t *testing.T) {
	orig := find(readDocs(t, "kustomize/examples/files-api/files-api.yaml"), "Deployment", "files-api")
	// kustomize takes no absolute paths: relative ones from the test's directory.
	rel := func(dir string, p ...string) string {
		r, err := filepath.Rel(dir, filepath.Join(append([]string{root(), "kustomize"}, p...)...))
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	cases := []struct {
		name       string
		components []string
		settings   []string
		want       []string // init containers after rendering
		dangling   bool     // the render must be flagged: a volumeMount without its volume
	}{
		{"restore", []string{"restore"}, nil, []string{"migrate", "restore"}, false},
		{"syncer", []string{"syncer"}, nil, []string{"migrate", "syncer"}, false},
		{"restore+syncer", []string{"restore", "syncer"}, nil, []string{"migrate", "restore", "syncer"}, false},
		{"restore-first", []string{"restore", "syncer", "restore-first"}, nil, []string{"restore", "migrate", "syncer"}, false},
		{"logshipper", []string{"logshipper"}, []string{"logs-volume=data", "logs-mount-path=/var/lib/files-api"}, []string{"migrate", "logshipper"}, false},
		{"agents", []string{"agents"}, []string{"logs-volume=data"}, []string{"migrate", "restore", "syncer", "logshipper"}, false},
		{"classic-sidecars", []string{"classic-sidecars"}, []string{"logs-volume=data"}, []string{"migrate", "restore"}, false},
		{"workload-identity", []string{"restore", "syncer", "workload-identity"}, nil, []string{"migrate", "restore", "syncer"}, false},
		// The point 3: all agents on an app without a logs volume. kustomize cannot
		// refuse it; the checker (and the API) must.
		{"agents without logs volume", []string{"agents"}, nil, []string{"migrate", "restore", "syncer", "logshipper"}, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			app, err := os.ReadFile(filepath.Join(root(), "kustomize", "examples", "files-api", "files-api.yaml"))
			if err != nil {
				t.Fatal(err)
			}
			os.WriteFile(filepath.Join(dir, "files-api.yaml"), app, 0o644)
			var b strings.Builder
			fmt.Fprintf(&b, "resources:\n- files-api.yaml\n- %s\ncomponents:\n", rel(dir, "base"))
			for _, c := range tc.components {
				fmt.Fprintf(&b, "- %s\n", rel(dir, "components", c))
			}
			fmt.Fprintf(&b, "configMapGenerator:\n- name: podkeeper-attach\n  behavior: merge\n  literals:\n  - uploads-volume=data\n")
			for _, s := range tc.settings {
				fmt.Fprintf(&b, "  - %s\n", s)
			}
			os.WriteFile(filepath.Join(dir, "kustomization.yaml"), []byte(b.String()), 0o644)
			dep := find(parseDocs(t, tc.name, render(t, dir)), "Deployment", "files-api")
			spec := podSpec(dep)
			if got := names(list(spec, "initContainers")); !slices.Equal(got, tc.want) {
				t.Errorf("init containers %v, want %v", got, tc.want)
			}
			if got := names(list(spec, "containers")); tc.name == "classic-sidecars" && !slices.Equal(got, []string{"api", "syncer", "logshipper"}) {
				t.Errorf("containers %v, want the app first, then syncer, logshipper", got)
			}
			for _, d := range hostDiff(orig, dep) {
				t.Errorf("host Pod rewritten: %s", d)
			}
			v := violations(dep)
			dangling := slices.ContainsFunc(v, func(s string) bool { return strings.Contains(s, "names no volume") })
			if dangling != tc.dangling {
				t.Errorf("dangling volumeMount reported %v, want %v: %v", dangling, tc.dangling, v)
			}
			if !tc.dangling {
				for _, x := range v {
					t.Error(x)
				}
			}
			for _, a := range []string{"restore", "syncer"} {
				if c := container(spec, a); c != nil {
					refs := slices.ContainsFunc(list(c, "envFrom"), func(e any) bool { return get(e, "secretRef") != nil })
					if want := !slices.Contains(tc.components, "workload-identity"); refs != want {
						t.Errorf("%s: S3 secretRef present %v, want %v", a, refs, want)
					}
				}
			}
			for _, vol := range list(spec, "volumes") {
				n := str(vol, "name")
				if n == "podkeeper-state" && !slices.Contains(tc.components, "logshipper") && !slices.Contains(tc.components, "agents") && !slices.Contains(tc.components, "classic-sidecars") {
					t.Errorf("volume %s added without the logshipper", n)
				}
			}
		})
	}
}

// envValue is the value of the env variable name of container c ("" if absent).
func envValue(c obj, name string) (string, bool) {
	for _, e := range list(c, "env") {
		if str(e, "name") == name {
			return str(e, "value"), true
		}
	}
	return "", false
}

// The per-Pod prefix is one line (a component) and sets exactly the agents' suffix in StatefulSets:
// restore's and syncer's STORE_URL become <store-url>/<Pod name>; a STORE_URL of the user's own
// containers, the Deployment of the same kustomization and the rest of the Pod stay as they are;
// with classic sidecars (the syncer out of reach) the render fails instead of splitting prefixes.
func TestPerPodPrefix(t *testing.T) {
	// overlays/statefulset: the real overlay.
	for _, o := range parseDocs(t, "statefulset", render(t, filepath.Join(root(), "kustomize", "overlays", "statefulset"))) {
		if o["kind"] != "StatefulSet" {
			continue
		}
		for _, a := range []string{"restore", "syncer"} {
			c := container(podSpec(o), a)
			if v, _ := envValue(c, "PODKEEPER_STORE_SUFFIX"); v != "/$(POD_NAME)" {
				t.Errorf("overlays/statefulset %s: PODKEEPER_STORE_SUFFIX %q, want /$(POD_NAME)", a, v)
			}
			if v, _ := envValue(c, "STORE_URL"); v != "$(PODKEEPER_STORE_URL)$(PODKEEPER_STORE_SUFFIX)" {
				t.Errorf("overlays/statefulset %s: STORE_URL %q", a, v)
			}
		}
	}
	b, err := os.ReadFile(filepath.Join(root(), "kustomize", "overlays", "statefulset", "kustomization.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(b), "initContainers/") {
		t.Error("overlays/statefulset patches init containers by position")
	}

	// files-api as a StatefulSet, its migrate container with a STORE_URL of its own, next to a
	// Deployment in the same kustomization.
	app, err := os.ReadFile(filepath.Join(root(), "kustomize", "examples", "files-api", "files-api.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	sts := strings.Replace(string(app), "kind: Deployment", "kind: StatefulSet", 1)
	sts = strings.Replace(sts, "  strategy:\n    type: Recreate\n", "  serviceName: files-api\n", 1)
	sts = strings.Replace(sts, "        args: [migrate, --data-dir=/var/lib/files-api]\n",
		"        args: [migrate, --data-dir=/var/lib/files-api]\n        env:\n        - {name: STORE_URL, value: postgres://db/files}\n", 1)
	if !strings.Contains(sts, "kind: StatefulSet") || !strings.Contains(sts, "postgres://db/files") || strings.Contains(sts, "strategy:") {
		t.Fatal("could not turn files-api into a StatefulSet")
	}
	dep := strings.ReplaceAll(string(app), "files-api", "other-api")
	run := func(t *testing.T, components ...string) ([]obj, error) {
		dir := t.TempDir()
		os.WriteFile(filepath.Join(dir, "sts.yaml"), []byte(sts), 0o644)
		os.WriteFile(filepath.Join(dir, "dep.yaml"), []byte(dep), 0o644)
		rel, err := filepath.Rel(dir, filepath.Join(root(), "kustomize"))
		if err != nil {
			t.Fatal(err)
		}
		k := "resources:\n- sts.yaml\n- dep.yaml\n- " + rel + "/base\ncomponents:\n"
		for _, c := range components {
			k += "- " + rel + "/components/" + c + "\n"
		}
		k += "configMapGenerator:\n- {name: podkeeper-attach, behavior: merge, literals: [uploads-volume=data, logs-volume=data]}\n"
		os.WriteFile(filepath.Join(dir, "kustomization.yaml"), []byte(k), 0o644)
		out, err := renderErr(dir)
		if err != nil {
			return nil, err
		}
		return parseDocs(t, "per-pod", out), nil
	}
	orig := find(parseDocs(t, "sts", []byte(sts)), "StatefulSet", "files-api")
	for _, tc := range []struct {
		components []string
		agents     []string
	}{
		{[]string{"agents", "per-pod-prefix"}, []string{"restore", "syncer"}},
		{[]string{"syncer", "per-pod-prefix"}, []string{"syncer"}},
		{[]string{"restore", "syncer", "restore-first", "per-pod-prefix"}, []string{"restore", "syncer"}},
	} {
		t.Run(strings.Join(tc.components, "+"), func(t *testing.T) {
			docs, err := run(t, tc.components...)
			if err != nil {
				t.Fatal(err)
			}
			s := find(docs, "StatefulSet", "files-api")
			for _, a := range tc.agents {
				if v, _ := envValue(container(podSpec(s), a), "PODKEEPER_STORE_SUFFIX"); v != "/$(POD_NAME)" {
					t.Errorf("%s: suffix %q, want /$(POD_NAME)", a, v)
				}
			}
			for _, d := range hostDiff(orig, s) {
				t.Errorf("host Pod rewritten: %s", d)
			}
			for _, v := range violations(s) {
				t.Error(v)
			}
			d := find(docs, "Deployment", "other-api")
			for _, a := range tc.agents {
				if v, _ := envValue(container(podSpec(d), a), "PODKEEPER_STORE_SUFFIX"); v != "" {
					t.Errorf("Deployment %s: suffix %q, want none (Pod names are random)", a, v)
				}
			}
		})
	}
	if _, err := run(t, "classic-sidecars", "per-pod-prefix"); err == nil || !strings.Contains(err.Error(), "[name=syncer]") {
		t.Errorf("classic-sidecars + per-pod-prefix must fail to render (restore and syncer would split prefixes), got %v", err)
	}
}
