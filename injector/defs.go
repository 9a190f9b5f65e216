// Package injector is podkeeper's mutating admission webhook: it attaches the
// agents (restore, syncer, logshipper) to any Pod that asks for them by
// annotation. The containers and volumes it adds are read from the kustomize
// components themselves (package kustomize embeds their YAML), so a Pod gets
// from the injector exactly what the components render; only the attach
// settings (volumes, paths, resources, images) are filled in the same places
// the components' replacements fill them. Pods are plain JSON maps: no
// k8s.io/api types, no clientset.
package injector

import (
	"encoding/json"
	"fmt"

	"sigs.k8s.io/yaml"

	"github.com/podkeeper/podkeeper/kustomize"
)

type obj = map[string]any

// Agents in their order in the Pod.
var Agents = []string{"restore", "syncer", "logshipper"}

// defs holds, per agent, its container as the native-sidecar components add it
// and as components/classic-sidecars adds it (restore is an init container in
// both), and the agents' own volumes by name.
type defs struct {
	native  map[string]obj
	classic map[string]obj
	volumes map[string]obj
	// volumesOf lists the agent volumes each container mounts, in the order
	// the components declare them.
	attach map[string]string // podkeeper-attach defaults
}

var builtin = mustDefs()

func mustDefs() *defs {
	d, err := loadDefs()
	if err != nil {
		panic("injector: the embedded components do not parse: " + err.Error())
	}
	return d
}

func loadDefs() (*defs, error) {
	d := &defs{native: map[string]obj{}, classic: map[string]obj{}, volumes: map[string]obj{}, attach: map[string]string{}}
	for _, src := range []struct {
		name string
		b    []byte
		into map[string]obj
	}{
		{"restore", kustomize.Restore, d.native},
		{"syncer", kustomize.Syncer, d.native},
		{"logshipper", kustomize.Logshipper, d.native},
		{"classic-sidecars", kustomize.ClassicSidecars, d.classic},
	} {
		var o obj
		if err := yaml.Unmarshal(src.b, &o); err != nil {
			return nil, fmt.Errorf("%s: %w", src.name, err)
		}
		spec, _ := dig(o, "spec", "template", "spec").(obj)
		if spec == nil {
			return nil, fmt.Errorf("%s: no spec.template.spec", src.name)
		}
		for _, field := range []string{"initContainers", "containers"} {
			l, _ := spec[field].([]any)
			for _, c := range l {
				c := c.(obj)
				src.into[c["name"].(string)] = c
			}
		}
		vl, _ := spec["volumes"].([]any)
		for _, v := range vl {
			v := v.(obj)
			name := v["name"].(string)
			if prev, ok := d.volumes[name]; ok && !jsonEqual(prev, v) {
				return nil, fmt.Errorf("volume %s differs between components", name)
			}
			d.volumes[name] = v
		}
	}
	// restore is an init container with either kind of sidecar.
	d.classic["restore"] = d.native["restore"]
	for _, a := range Agents {
		if d.native[a] == nil || d.classic[a] == nil {
			return nil, fmt.Errorf("no container %s in the components", a)
		}
	}
	var cm struct{ Data map[string]string }
	if err := yaml.Unmarshal(kustomize.Attach, &cm); err != nil {
		return nil, fmt.Errorf("attach.yaml: %w", err)
	}
	d.attach = cm.Data
	return d, nil
}

func dig(o any, path ...string) any {
	for _, p := range path {
		m, ok := o.(obj)
		if !ok {
			return nil
		}
		o = m[p]
	}
	return o
}

func jsonEqual(a, b any) bool {
	ja, _ := json.Marshal(a)
	jb, _ := json.Marshal(b)
	return string(ja) == string(jb)
}

// deepCopy copies a JSON tree.
func deepCopy(v any) any {
	switch t := v.(type) {
	case obj:
		m := make(obj, len(t))
		for k, x := range t {
			m[k] = deepCopy(x)
		}
		return m
	case []any:
		l := make([]any, len(t))
		for i, x := range t {
			l[i] = deepCopy(x)
		}
		return l
	}
	return v
}
