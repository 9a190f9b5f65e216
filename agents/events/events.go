// Package events is how agents report notable moments (Restored,
// UploadsFailing, LeaseConflict, ...) without knowing where they go: a
// Kubernetes Event on the agent's own Pod (agents/kube), or only the log.
package events

import (
	"context"
	"log/slog"
)

// Type is the Kubernetes event type.
type Type string

const (
	Normal  Type = "Normal"
	Warning Type = "Warning"
)

// Recorder records an event. Implementations aggregate and rate-limit, so a
// failing loop may call it on every iteration; they never block for long and
// never fail the caller.
type Recorder interface {
	Event(ctx context.Context, t Type, reason, message string)
}

// Log records events only in the agent's log (outside a cluster).
type Log struct{ L *slog.Logger }

func (l Log) Event(ctx context.Context, t Type, reason, message string) {
	level := slog.LevelInfo
	if t == Warning {
		level = slog.LevelWarn
	}
	l.L.Log(ctx, level, "event", "reason", reason, "message", message)
}

// Nop drops events.
type Nop struct{}

func (Nop) Event(context.Context, Type, string, string) {}
