// Command without is the size probe of agents/kube: the kit every agent links
// (config, lifecycle, store, health) without agents/kube. test/k8s/sizes.sh
// compares ../with with it to report what client-go adds to an agent.
package main

import (
	"context"
	"log/slog"
	"os"

	"github.com/podkeeper/podkeeper/agents/config"
	"github.com/podkeeper/podkeeper/agents/health"
	"github.com/podkeeper/podkeeper/agents/lifecycle"
	"github.com/podkeeper/podkeeper/agents/store"
	_ "github.com/podkeeper/podkeeper/agents/store/backends"
)

func main() {
	cfg := &struct {
		Base  config.Base
		Store config.Store
	}{}
	_ = config.Load(cfg, lifecycle.EnvMap(os.Environ()))
	log := slog.Default()
	_, _ = store.Open(context.Background(), &cfg.Store, log)
	_ = health.New("probe")
}
