package store

import (
	"context"
	"log/slog"

	"github.com/podkeeper/podkeeper/agents/config"
)

// Open returns the backend STORE_URL names. c must have passed config.Load.
func Open(ctx context.Context, c *config.Store, log *slog.Logger) (Store, error) {
	switch c.Scheme {
	case "file":
		return NewFile(c.Path)
	default:
		return NewS3(ctx, c, S3Options{Log: log})
	}
}
