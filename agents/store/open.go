package store

import (
	"context"
	"fmt"
	"log/slog"
	"sync"

	"github.com/podkeeper/podkeeper/agents/config"
)

// Opener builds a backend from the shared configuration.
type Opener func(ctx context.Context, c *config.Store, log *slog.Logger) (Store, error)

var (
	openersMu sync.RWMutex
	openers   = map[string]Opener{}
)

// Register makes a backend available to Open for STORE_URLs of scheme. It is
// called from the backend package's init; registering a scheme twice is a
// programming error.
func Register(scheme string, open Opener) {
	openersMu.Lock()
	defer openersMu.Unlock()
	if _, dup := openers[scheme]; dup {
		panic("store: backend registered twice for scheme " + scheme)
	}
	openers[scheme] = open
}

// Open returns the backend STORE_URL names. c must have passed config.Load.
func Open(ctx context.Context, c *config.Store, log *slog.Logger) (Store, error) {
	if log == nil {
		log = slog.Default()
	}
	openersMu.RLock()
	open, ok := openers[c.Scheme]
	openersMu.RUnlock()
	if !ok {
		// Only a binary that forgot to import agents/store/backends gets here:
		// config.Load accepts no other scheme.
		return nil, fmt.Errorf("STORE_URL %s: no %s:// backend is linked into this program", c.URL, c.Scheme)
	}
	return open(ctx, c, log)
}
