package injector

import (
	"fmt"
	"strings"
)

// Op is one JSON Patch (RFC 6902) operation.
type Op struct {
	Op    string `json:"op"`
	Path  string `json:"path"`
	Value any    `json:"value,omitempty"`
}

// Result of Mutate: the patch (nil: nothing to change) and what was added.
type Result struct {
	Patch  []Op
	Added  []string // agents added (already present ones are not)
	Reason string   // why nothing was injected, when Patch is nil
}

// Request is what Mutate needs to know of one admission.
type Request struct {
	Pod       obj    // the Pod as sent by the API server
	Namespace string // the request's namespace (a Pod being created may not carry it yet)
	NSOptIn   bool   // the namespace opted in (webhook path /mutate/namespace)
	Native    bool   // native sidecars (API server >= 1.29) or classic containers
}

// Mutate returns the JSON patch that attaches the agents the Pod asks for, the
// way the components attach them: restore, then syncer and logshipper as
// native sidecars, after the Pod's own init containers; with classic sidecars
// syncer and logshipper after the Pod's own containers. Only containers, the
// agents' volumes (podkeeper-*) and two annotations (store-url when it came
// from the default, injected) are added; nothing of the host Pod changes. An
// agent whose container name is already taken is left out (reinvocation, a Pod
// that already has the agents), so Mutate is idempotent.
// A *Error names the annotation at fault.
func Mutate(d Defaults, r Request) (Result, error) {
	meta, _ := r.Pod["metadata"].(obj)
	ann := annotations(meta)
	want, err := wanted(ann, r.NSOptIn)
	if err != nil {
		return Result{}, err
	}
	if !want {
		return Result{Reason: "not requested"}, nil
	}
	s, err := resolve(d, ann, r.Namespace, Workload(r.Pod))
	if err != nil {
		return Result{}, err
	}
	if s.perPodPrefix && controllerKind(r.Pod) != "StatefulSet" {
		return Result{}, badAnn(AnnPerPodPrefix, "only for the Pods of a StatefulSet (stable names); this Pod's controller is %q", controllerKind(r.Pod))
	}
	spec, _ := r.Pod["spec"].(obj)
	if spec == nil {
		return Result{}, fmt.Errorf("the Pod has no spec")
	}
	add, err := agentsToAdd(s, d, r.Native, spec)
	if err != nil {
		return Result{}, err
	}
	if len(add.names) == 0 {
		return Result{Reason: "already injected"}, nil
	}
	res := Result{Added: add.names}
	res.Patch = add.ops(spec)
	res.Patch = append(res.Patch, annotationOps(meta, ann, s, add.names, r.Native)...)
	return res, nil
}

func annotations(meta obj) map[string]string {
	ann := map[string]string{}
	if m, ok := dig(meta, "annotations").(obj); ok {
		for k, v := range m {
			s, _ := v.(string)
			ann[k] = s
		}
	}
	return ann
}

// additions are the containers and volumes the Pod lacks, by where they go.
type additions struct {
	names              []string
	inits, conts, vols []any
	first              any // restore, before the Pod's own init containers (podkeeper.io/restore-first)
}

// agentsToAdd builds the requested agents the Pod does not have yet (by
// container name: reinvocation and already injected Pods get no second copy)
// and the podkeeper-* volumes they mount.
func agentsToAdd(s *settings, d Defaults, native bool, spec obj) (additions, error) {
	taken := names(spec, "initContainers", "containers", "ephemeralContainers")
	vols := names(spec, "volumes")
	var a additions
	for _, agent := range s.agents {
		if taken[agent] {
			continue
		}
		c := container(agent, s, d, native)
		if err := needVolumes(agent, s, vols); err != nil {
			return additions{}, err
		}
		for _, m := range c["volumeMounts"].([]any) {
			n := m.(obj)["name"].(string)
			if strings.HasPrefix(n, "podkeeper-") && !vols[n] {
				vols[n] = true
				a.vols = append(a.vols, deepCopy(builtin.volumes[n]))
			}
		}
		switch {
		case agent == "restore" && s.restoreFirst:
			a.first = c
		case agent == "restore" || native:
			a.inits = append(a.inits, c)
		default:
			a.conts = append(a.conts, c)
		}
		a.names = append(a.names, agent)
	}
	return a, nil
}

// names collects the names of the entries of spec's lists fields.
func names(spec obj, fields ...string) map[string]bool {
	out := map[string]bool{}
	for _, f := range fields {
		l, _ := spec[f].([]any)
		for _, e := range l {
			if n, ok := dig(e, "name").(string); ok {
				out[n] = true
			}
		}
	}
	return out
}

// ops are the JSON patch operations that add a's volumes and containers.
func (a additions) ops(spec obj) []Op {
	ops := appendOps(nil, spec, "/spec", "volumes", a.vols)
	inits := a.inits
	if a.first != nil {
		if l, ok := spec["initContainers"].([]any); ok && len(l) > 0 {
			ops = append(ops, Op{Op: "add", Path: "/spec/initContainers/0", Value: a.first})
		} else {
			inits = append([]any{a.first}, inits...)
		}
	}
	ops = appendOps(ops, spec, "/spec", "initContainers", inits)
	return appendOps(ops, spec, "/spec", "containers", a.conts)
}

// annotationOps record what was injected (and the store URL a template
// produced) on the Pod.
func annotationOps(meta obj, ann map[string]string, s *settings, added []string, native bool) []Op {
	add := map[string]string{}
	if s.storeFromTemplate && s.storeURL != "" {
		add[AnnStoreURL] = s.storeURL
	}
	mode := "native"
	if !native {
		mode = "classic"
	}
	done := added
	if prev := ann[AnnInjected]; prev != "" {
		done = append([]string{strings.SplitN(prev, " ", 2)[0]}, done...)
	}
	add[AnnInjected] = strings.Join(done, ",") + " (" + mode + ")"
	if _, ok := dig(meta, "annotations").(obj); !ok {
		m := obj{}
		for k, v := range add {
			m[k] = v
		}
		return []Op{{Op: "add", Path: "/metadata/annotations", Value: m}}
	}
	var ops []Op
	for _, k := range []string{AnnStoreURL, AnnInjected} {
		if v, ok := add[k]; ok {
			ops = append(ops, Op{Op: "add", Path: "/metadata/annotations/" + escape(k), Value: v})
		}
	}
	return ops
}

// needVolumes refuses a mount of a volume the Pod does not have: the API would
// refuse the Pod anyway, this names the annotation to change.
func needVolumes(agent string, s *settings, vols map[string]bool) error {
	if agent == "logshipper" {
		if !vols[s.logsVolume] {
			return badAnn(AnnLogsVolume, "the Pod has no volume %q for the logshipper (set %s, or leave the logshipper out with %s)", s.logsVolume, AnnLogsVolume, AnnAgents)
		}
		return nil
	}
	if !vols[s.uploadsVolume] {
		return badAnn(AnnUploadsVolume, "the Pod has no volume %q for %s (set %s)", s.uploadsVolume, agent, AnnUploadsVolume)
	}
	return nil
}

// container is the agent's container from the components, with the attach
// settings where the components' replacements put them.
func container(agent string, s *settings, d Defaults, native bool) obj {
	src := builtin.native[agent]
	if !native {
		src = builtin.classic[agent]
	}
	c := deepCopy(src).(obj)
	m0 := c["volumeMounts"].([]any)[0].(obj)
	dirEnv := ""
	switch agent {
	case "restore", "syncer":
		m0["name"], m0["mountPath"] = s.uploadsVolume, s.uploadsDir
		dirEnv = map[string]string{"restore": "RESTORE_DIR", "syncer": "SYNC_DIR"}[agent]
	case "logshipper":
		m0["name"], m0["mountPath"] = s.logsVolume, s.logsDir
	}
	for _, e := range c["env"].([]any) {
		e := e.(obj)
		switch {
		case dirEnv != "" && e["name"] == dirEnv:
			e["value"] = s.uploadsDir
		// components/per-pod-prefix: STORE_URL is $(PODKEEPER_STORE_URL)$(PODKEEPER_STORE_SUFFIX).
		case s.perPodPrefix && e["name"] == "PODKEEPER_STORE_SUFFIX":
			e["value"] = perPodSuffix
		}
	}
	res := c["resources"].(obj)
	for _, kind := range []string{"requests", "limits"} {
		one := map[string]string{"requests": "request", "limits": "limit"}[kind]
		res[kind].(obj)["cpu"] = d[agent+"-cpu-"+one]
		res[kind].(obj)["memory"] = d[agent+"-memory-"+one]
	}
	// The namespace's ConfigMap and Secret, named as the platform team says.
	if l, ok := c["envFrom"].([]any); ok {
		var keep []any
		for _, e := range l {
			e := e.(obj)
			if r, ok := e["configMapRef"].(obj); ok && r["name"] == "podkeeper" {
				r["name"] = d["configmap"]
			}
			if r, ok := e["secretRef"].(obj); ok && r["name"] == "podkeeper-s3" {
				if d["s3-secret"] == "none" {
					continue
				}
				r["name"] = d["s3-secret"]
			}
			keep = append(keep, e)
		}
		c["envFrom"] = keep
	}
	if img := d[agent+"-image"]; img != "" {
		c["image"] = img
	}
	return c
}

// perPodSuffix is components/per-pod-prefix's suffix (kustomize/components/per-pod-prefix/prefix.yaml).
const perPodSuffix = "/$(POD_NAME)"

func controllerKind(pod obj) string {
	refs, _ := dig(pod, "metadata", "ownerReferences").([]any)
	for _, r := range refs {
		if c, _ := dig(r, "controller").(bool); c {
			k, _ := dig(r, "kind").(string)
			return k
		}
	}
	return ""
}

func appendOps(ops []Op, parent obj, at, field string, items []any) []Op {
	if len(items) == 0 {
		return ops
	}
	if l, ok := parent[field].([]any); !ok || l == nil {
		return append(ops, Op{Op: "add", Path: at + "/" + field, Value: items})
	}
	for _, it := range items {
		ops = append(ops, Op{Op: "add", Path: at + "/" + field + "/-", Value: it})
	}
	return ops
}

func escape(k string) string { return strings.NewReplacer("~", "~0", "/", "~1").Replace(k) }

// Workload names the Pod's workload for the {workload} of a store-url
// template: a Deployment's (its ReplicaSet's name less the pod-template-hash),
// a StatefulSet's, a Job's, else the Pod's name or generateName.
func Workload(pod obj) string {
	meta, _ := pod["metadata"].(obj)
	refs, _ := meta["ownerReferences"].([]any)
	for _, r := range refs {
		r, _ := r.(obj)
		if c, _ := r["controller"].(bool); !c {
			continue
		}
		name, _ := r["name"].(string)
		if r["kind"] == "ReplicaSet" {
			if h, ok := dig(meta, "labels", "pod-template-hash").(string); ok && h != "" {
				return strings.TrimSuffix(name, "-"+h)
			}
		}
		return name
	}
	if n, _ := meta["name"].(string); n != "" {
		return n
	}
	g, _ := meta["generateName"].(string)
	return strings.TrimSuffix(g, "-")
}
