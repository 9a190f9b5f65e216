// Package kustomize carries the agents' container definitions to Go: the
// injector (injector/) injects exactly what the components add, read from these
// files at build time, so the components stay the one source of truth.
package kustomize

import _ "embed"

// The strategic-merge patches of the components, each holding its agent's
// container and the volumes it adds.
var (
	//go:embed components/restore/restore.yaml
	Restore []byte
	//go:embed components/syncer/syncer.yaml
	Syncer []byte
	//go:embed components/logshipper/logshipper.yaml
	Logshipper []byte
	//go:embed components/classic-sidecars/sidecars.yaml
	ClassicSidecars []byte
	// Attach holds the attach settings' defaults (ConfigMap podkeeper-attach).
	//go:embed base/attach.yaml
	Attach []byte
)
