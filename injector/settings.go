package injector

import (
	"fmt"
	"net/url"
	"path"
	"regexp"
	"sort"
	"strings"

	"k8s.io/apimachinery/pkg/api/resource"
)

// Annotation prefix and the annotations a Pod may carry.
const (
	Prefix = "podkeeper.io/"

	AnnInject        = Prefix + "inject"         // "true" | "false"
	AnnAgents        = Prefix + "agents"         // "restore,syncer,logshipper" (any subset)
	AnnUploadsVolume = Prefix + "uploads-volume" // the Pod's volume with the uploads
	AnnUploadsPath   = Prefix + "uploads-path"   // where restore and syncer mount it
	AnnLogsVolume    = Prefix + "logs-volume"    // the Pod's volume with the log files
	AnnLogsPath      = Prefix + "logs-path"      // where the logshipper mounts it
	AnnStoreURL      = Prefix + "store-url"      // read by the agents (downward API)
	AnnInjected      = Prefix + "injected"       // set by the injector: what it added
	AnnPerPodPrefix  = Prefix + "per-pod-prefix" // "true": store prefix <store-url>/<Pod name> (StatefulSets)
	AnnRestoreFirst  = Prefix + "restore-first"  // "true": restore before the Pod's own init containers
)

var knownAnnotations = map[string]bool{
	AnnInject: true, AnnAgents: true, AnnUploadsVolume: true, AnnUploadsPath: true,
	AnnLogsVolume: true, AnnLogsPath: true, AnnStoreURL: true, AnnInjected: true,
	AnnPerPodPrefix: true, AnnRestoreFirst: true,
}

// Defaults are the platform team's settings (ConfigMap podkeeper-injector): the
// keys of kustomize/base/attach.yaml (uploads-volume, uploads-mount-path,
// logs-volume, logs-mount-path, AGENT-{cpu,memory}-{request,limit}) plus:
//   - agents: the agents a Pod gets when it names none (default all three);
//   - store-url: the store prefix of a Pod without podkeeper.io/store-url, a
//     template with {namespace} and {workload} (default none: such a Pod is
//     refused, as restore and syncer would stop without STORE_URL);
//   - AGENT-image: the agent's image (default the components' image);
//   - sidecars: auto (native when the API server is >= 1.29), native or classic;
//   - configmap: the agents' ConfigMap in the Pod's namespace (default podkeeper);
//   - s3-secret: their S3 Secret there (default podkeeper-s3; "none": no Secret, the
//     Pod's ServiceAccount is the credential, as components/workload-identity).
type Defaults map[string]string

var extraKeys = []string{"agents", "store-url", "sidecars", "restore-image", "syncer-image", "logshipper-image", "configmap", "s3-secret"}

// ParseDefaults checks a ConfigMap's data and returns it over the built-in defaults.
func ParseDefaults(data map[string]string) (Defaults, error) {
	d := Defaults{"agents": strings.Join(Agents, ","), "sidecars": "auto", "configmap": "podkeeper", "s3-secret": "podkeeper-s3"}
	for k, v := range builtin.attach {
		d[k] = v
	}
	known := map[string]bool{}
	for k := range d {
		known[k] = true
	}
	for _, k := range extraKeys {
		known[k] = true
	}
	keys := make([]string, 0, len(data))
	for k := range data {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		if !known[k] {
			return nil, fmt.Errorf("defaults: unknown key %q", k)
		}
		d[k] = strings.TrimSpace(data[k])
	}
	// Each value must be one a Pod annotation could carry.
	if _, err := parseAgents(d["agents"]); err != nil {
		return nil, fmt.Errorf("defaults: agents: %w", err)
	}
	for _, k := range []string{"uploads-volume", "logs-volume"} {
		if err := checkVolume(d[k]); err != nil {
			return nil, fmt.Errorf("defaults: %s: %w", k, err)
		}
	}
	for _, k := range []string{"uploads-mount-path", "logs-mount-path"} {
		if err := checkPath(d[k]); err != nil {
			return nil, fmt.Errorf("defaults: %s: %w", k, err)
		}
	}
	for _, a := range Agents {
		for _, r := range []string{"cpu-request", "memory-request", "cpu-limit", "memory-limit"} {
			if _, err := resource.ParseQuantity(d[a+"-"+r]); err != nil {
				return nil, fmt.Errorf("defaults: %s-%s: %w", a, r, err)
			}
		}
	}
	if t := d["store-url"]; t != "" {
		if err := checkStoreURL(expand(t, "ns", "workload")); err != nil {
			return nil, fmt.Errorf("defaults: store-url: %w", err)
		}
		if rest := placeholder.ReplaceAllString(t, ""); strings.ContainsAny(rest, "{}") {
			return nil, fmt.Errorf("defaults: store-url: only {namespace} and {workload} may be used, in %q", t)
		}
	}
	for _, k := range []string{"configmap", "s3-secret"} {
		if v := d[k]; !dnsSubdomain.MatchString(v) || len(v) > 253 || (k == "configmap" && v == "none") {
			return nil, fmt.Errorf("defaults: %s: %q is not a ConfigMap or Secret name", k, v)
		}
	}
	switch d["sidecars"] {
	case "auto", "native", "classic":
	default:
		return nil, fmt.Errorf("defaults: sidecars: %q is none of auto, native, classic", d["sidecars"])
	}
	return d, nil
}

var placeholder = regexp.MustCompile(`\{(namespace|workload)\}`)

func expand(t, ns, workload string) string {
	return strings.NewReplacer("{namespace}", ns, "{workload}", workload).Replace(t)
}

// settings are what one Pod gets.
type settings struct {
	agents                    []string
	uploadsVolume, uploadsDir string
	logsVolume, logsDir       string
	storeURL                  string
	storeFromTemplate         bool
	perPodPrefix              bool
	restoreFirst              bool
}

// Error is a refusal naming the annotation at fault.
type Error struct {
	Annotation string
	Msg        string
}

func (e *Error) Error() string { return fmt.Sprintf("annotation %s: %s", e.Annotation, e.Msg) }

func badAnn(ann, format string, a ...any) *Error {
	return &Error{Annotation: ann, Msg: fmt.Sprintf(format, a...)}
}

// wanted reports whether a Pod asks for injection: its annotation decides,
// else the namespace (nsOptIn: the namespace carries the opt-in label).
func wanted(ann map[string]string, nsOptIn bool) (bool, error) {
	v, ok := ann[AnnInject]
	if !ok {
		return nsOptIn, nil
	}
	switch v {
	case "true":
		return true, nil
	case "false":
		return false, nil
	}
	return false, badAnn(AnnInject, "%q is neither \"true\" nor \"false\"", v)
}

// resolve merges a Pod's annotations over the defaults and checks every value.
func resolve(d Defaults, ann map[string]string, namespace, workload string) (*settings, error) {
	keys := make([]string, 0, len(ann))
	for k := range ann {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		if strings.HasPrefix(k, Prefix) && !knownAnnotations[k] {
			return nil, badAnn(k, "unknown podkeeper.io annotation (known: %s)", strings.Join(sortedKnown(), ", "))
		}
	}
	pick := func(a, key string) string {
		if v, ok := ann[a]; ok {
			return v
		}
		return d[key]
	}
	s := &settings{
		uploadsVolume: pick(AnnUploadsVolume, "uploads-volume"),
		uploadsDir:    pick(AnnUploadsPath, "uploads-mount-path"),
		logsVolume:    pick(AnnLogsVolume, "logs-volume"),
		logsDir:       pick(AnnLogsPath, "logs-mount-path"),
	}
	var err error
	if s.agents, err = parseAgents(pick(AnnAgents, "agents")); err != nil {
		return nil, badAnn(AnnAgents, "%v", err)
	}
	for _, c := range []struct{ ann, v string }{{AnnUploadsVolume, s.uploadsVolume}, {AnnLogsVolume, s.logsVolume}} {
		if err := checkVolume(c.v); err != nil {
			return nil, badAnn(c.ann, "%v", err)
		}
	}
	for _, c := range []struct{ ann, v string }{{AnnUploadsPath, s.uploadsDir}, {AnnLogsPath, s.logsDir}} {
		if err := checkPath(c.v); err != nil {
			return nil, badAnn(c.ann, "%v", err)
		}
	}
	if v, ok := ann[AnnStoreURL]; ok {
		if err := checkStoreURL(v); err != nil {
			return nil, badAnn(AnnStoreURL, "%v", err)
		}
		s.storeURL = v
	} else if t := d["store-url"]; t != "" {
		s.storeURL, s.storeFromTemplate = expand(t, namespace, workload), true
		if err := checkStoreURL(s.storeURL); err != nil {
			return nil, badAnn(AnnStoreURL, "from the default %q: %v", t, err)
		}
	}
	for _, b := range []struct {
		ann string
		to  *bool
	}{{AnnPerPodPrefix, &s.perPodPrefix}, {AnnRestoreFirst, &s.restoreFirst}} {
		switch v, ok := ann[b.ann]; {
		case !ok || v == "false":
		case v == "true":
			*b.to = true
		default:
			return nil, badAnn(b.ann, "%q is neither \"true\" nor \"false\"", v)
		}
	}
	if s.storeURL == "" && (s.has("restore") || s.has("syncer")) {
		return nil, badAnn(AnnStoreURL, "missing, and no default store-url is configured: restore and syncer need a store")
	}
	return s, nil
}

func (s *settings) has(agent string) bool {
	for _, a := range s.agents {
		if a == agent {
			return true
		}
	}
	return false
}

func sortedKnown() []string {
	l := make([]string, 0, len(knownAnnotations))
	for k := range knownAnnotations {
		l = append(l, k)
	}
	sort.Strings(l)
	return l
}

func parseAgents(v string) ([]string, error) {
	seen := map[string]bool{}
	for _, a := range strings.Split(v, ",") {
		a = strings.TrimSpace(a)
		ok := false
		for _, k := range Agents {
			ok = ok || a == k
		}
		if !ok {
			return nil, fmt.Errorf("%q is no agent (restore, syncer, logshipper, comma-separated)", a)
		}
		if seen[a] {
			return nil, fmt.Errorf("%q listed twice", a)
		}
		seen[a] = true
	}
	var out []string // always in Pod order
	for _, a := range Agents {
		if seen[a] {
			out = append(out, a)
		}
	}
	return out, nil
}

var dnsSubdomain = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$`)

var dnsLabel = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$`)

func checkVolume(v string) error {
	if !dnsLabel.MatchString(v) {
		return fmt.Errorf("%q is not a volume name (a DNS label)", v)
	}
	if strings.HasPrefix(v, "podkeeper-") {
		return fmt.Errorf("%q: names podkeeper-* are the agents' own volumes", v)
	}
	return nil
}

func checkPath(v string) error {
	if !path.IsAbs(v) || path.Clean(v) != v || v == "/" || strings.ContainsAny(v, ":\x00") {
		return fmt.Errorf("%q is not a clean absolute path other than /", v)
	}
	for _, own := range []string{"/var/run/secrets/kubernetes.io/serviceaccount", "/var/lib/podkeeper"} {
		if v == own || strings.HasPrefix(own, v+"/") || strings.HasPrefix(v, own+"/") {
			return fmt.Errorf("%q overlaps the agents' own mount %s", v, own)
		}
	}
	return nil
}

func checkStoreURL(v string) error {
	u, err := url.Parse(v)
	if err != nil {
		return fmt.Errorf("%q: %v", v, err)
	}
	switch u.Scheme {
	case "s3":
		if u.Host == "" {
			return fmt.Errorf("%q: s3:// needs a bucket", v)
		}
	case "file":
		if u.Path == "" {
			return fmt.Errorf("%q: file:// needs a path", v)
		}
	default:
		return fmt.Errorf("%q: the scheme must be s3 or file", v)
	}
	return nil
}
