//go:build tools

// Package tools pins etcd for the k8s checks (see ../build.sh).
package tools

import (
	_ "go.etcd.io/etcd/server/v3"
)
