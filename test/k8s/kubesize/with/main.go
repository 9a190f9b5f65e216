// Command with is the size probe of agents/kube: the kit every agent links
// (config, lifecycle, store, health) plus agents/kube. test/k8s/sizes.sh
// compares it with ../without to report what client-go adds to an agent.
package main

import (
	"context"
	"log/slog"
	"os"

	"github.com/podkeeper/podkeeper/agents/config"
	"github.com/podkeeper/podkeeper/agents/health"
	"github.com/podkeeper/podkeeper/agents/kube"
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
	k, err := kube.New(context.Background(), &cfg.Base, log, kube.Options{Component: "probe"})
	if err == nil {
		_ = k.Labels()
		_ = k.Close(context.Background())
	}
}
