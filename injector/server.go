package injector

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/podkeeper/podkeeper/agents/config"
	"github.com/podkeeper/podkeeper/agents/events"
	"github.com/podkeeper/podkeeper/agents/health"
	"github.com/podkeeper/podkeeper/agents/kube"
	"github.com/podkeeper/podkeeper/agents/lifecycle"
)

// Options configure Serve (cmd/injector's flags).
type Options struct {
	Listen, HealthAddr                    string
	Namespace, Secret, Webhook, Service   string
	ExtraSANs                             string
	CertDir                               string
	DefaultsDir                           string
	FailurePolicy                         string
	Kubeconfig                            string
	CheckEvery, CertValidity, RenewBefore time.Duration
	CAValidity, ShutdownDelay             time.Duration
}

// server is one running injector: what Serve builds, step by step.
type server struct {
	o      Options
	log    *slog.Logger
	hs     *health.Server
	wh     *Webhook
	api    *API // nil with -cert-dir and fixed sidecars
	apiCfg *rest.Config
}

// Serve runs the webhook until ctx ends: health server, API client, Events
// recorder, sidecar mode, TLS (self-managed or from -cert-dir), then the TLS
// server itself; on ctx's end it turns unready, waits ShutdownDelay for the
// endpoints to catch up, and stops.
func Serve(ctx context.Context, o Options, log *slog.Logger) error {
	defaults, err := LoadDefaults(o.DefaultsDir)
	if err != nil {
		return fmt.Errorf("defaults (%s): %w", o.DefaultsDir, err)
	}
	s := &server{o: o, log: log, hs: health.New("injector")}
	if err := s.hs.Start(o.HealthAddr, log); err != nil {
		return err
	}
	defer s.hs.Close()
	s.hs.SetStarted()
	s.wh = NewWebhook(defaults, s.hs.Registry, log)
	s.wh.Reject = o.FailurePolicy == "Fail"
	if o.CertDir == "" || defaults["sidecars"] == "auto" {
		if err := s.connect(); err != nil {
			return err
		}
	}
	closeEvents := s.events(ctx)
	defer closeEvents()
	if err := s.sidecarMode(ctx, defaults["sidecars"]); err != nil {
		return err
	}
	getCert, ready, err := s.certificates(ctx)
	if err != nil || getCert == nil {
		return err // nil, nil: ctx ended while TLS was being set up
	}
	go every(ctx, o.CheckEvery, s.reloadDefaults)
	return s.run(ctx, getCert, ready)
}

func (s *server) connect() error {
	var cfg *rest.Config
	var err error
	if s.o.Kubeconfig != "" {
		cfg, err = clientcmd.BuildConfigFromFlags("", s.o.Kubeconfig)
	} else {
		cfg, err = rest.InClusterConfig()
	}
	if err != nil {
		return fmt.Errorf("kubernetes client: %w", err)
	}
	cfg.Timeout = 10 * time.Second
	s.apiCfg = cfg
	s.api, err = NewAPI(cfg)
	return err
}

// events puts Events on the injector's own Pod (POD_NAME, POD_UID from the
// downward API), or only in the log; it returns the flush at exit.
func (s *server) events(ctx context.Context) func() {
	base := &config.Base{PodName: os.Getenv("POD_NAME"), PodNamespace: s.o.Namespace, PodUID: os.Getenv("POD_UID"), KubeEvents: "auto"}
	var rec *kube.Kube
	var err error
	switch {
	case base.PodName == "" || base.PodUID == "" || s.o.Namespace == "":
		s.log.Info("POD_NAME, POD_UID or the namespace unset: Events only in the log")
	case s.o.Kubeconfig != "" && s.apiCfg != nil:
		rec, err = kube.NewForConfig(ctx, s.apiCfg, base, s.log, kube.Options{Component: "injector"})
	default:
		rec, err = kube.New(ctx, base, s.log, kube.Options{Component: "injector"})
	}
	if err != nil || rec == nil {
		if err != nil {
			s.log.Warn("Kubernetes Events not usable; they stay in the log", "err", err)
		}
		s.wh.Events = events.Log{L: s.log}
		return func() {}
	}
	s.wh.Events = rec
	return func() { rec.CloseWithin(5 * time.Second) }
}

// sidecarMode: native sidecars from Kubernetes 1.29 on ("auto" asks the API
// server once, at start), classic containers otherwise.
func (s *server) sidecarMode(ctx context.Context, mode string) error {
	switch mode {
	case "native":
		s.wh.Native = true
	case "auto":
		native, v, err := s.api.NativeSidecars(ctx)
		if err != nil {
			return fmt.Errorf("API server version: %w", err)
		}
		s.wh.Native = native
		s.log.Info("API server version", "version", v, "native_sidecars", native)
	}
	return nil
}

// certificates returns the serving certificate's source and its readiness:
// files from -cert-dir (cert-manager), or the self-managed CA and certificate
// in the Secret, synced (and the caBundle set) before anything is served.
func (s *server) certificates(ctx context.Context) (func(*tls.ClientHelloInfo) (*tls.Certificate, error), func() bool, error) {
	if s.o.CertDir != "" {
		fc := &FileCerts{CertFile: filepath.Join(s.o.CertDir, "tls.crt"), KeyFile: filepath.Join(s.o.CertDir, "tls.key")}
		if err := fc.Load(); err != nil {
			return nil, nil, fmt.Errorf("-cert-dir: %w", err)
		}
		go every(ctx, s.o.CheckEvery, func() {
			if err := fc.Load(); err != nil {
				s.log.Error("reload of the certificate failed; the current one keeps serving", "err", err)
			}
		})
		return fc.GetCertificate, func() bool { return true }, nil
	}
	cm := s.certManager()
	// Until the first sync works (RBAC, API down) the injector is not ready;
	// it keeps trying.
	for {
		err := cm.Sync(ctx)
		if err == nil {
			break
		}
		s.hs.SetReady(err)
		s.log.Error("TLS setup failed; retrying in 5s", "err", err)
		select {
		case <-ctx.Done():
			return nil, nil, nil
		case <-time.After(5 * time.Second):
		}
	}
	go cm.Run(ctx, s.o.CheckEvery)
	return cm.GetCertificate, cm.Ready, nil
}

func (s *server) certManager() *CertManager {
	o := s.o
	cm := &CertManager{API: s.api, Namespace: o.Namespace, SecretName: o.Secret, Webhook: o.Webhook,
		CAValidity: o.CAValidity, CertValidity: o.CertValidity, RenewBefore: o.RenewBefore, Log: s.log}
	svc := o.Service + "." + o.Namespace
	cm.DNSNames = []string{svc + ".svc", svc + ".svc.cluster.local", svc, o.Service}
	for _, san := range strings.Split(o.ExtraSANs, ",") {
		if san = strings.TrimSpace(san); san == "" {
			continue
		}
		if ip := net.ParseIP(san); ip != nil {
			cm.IPs = append(cm.IPs, ip)
		} else {
			cm.DNSNames = append(cm.DNSNames, san)
		}
	}
	return cm
}

func (s *server) reloadDefaults() {
	d, err := LoadDefaults(s.o.DefaultsDir)
	if err != nil {
		s.log.Error("defaults changed to something invalid; keeping the previous ones", "err", err)
		return
	}
	s.wh.SetDefaults(d)
}

// run serves the webhook over TLS until ctx ends.
func (s *server) run(ctx context.Context, getCert func(*tls.ClientHelloInfo) (*tls.Certificate, error), ready func() bool) error {
	mux := http.NewServeMux()
	mux.Handle(PathPod, s.wh)
	mux.Handle(PathNamespace, s.wh)
	ln, err := net.Listen("tcp", s.o.Listen)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second,
		TLSConfig: &tls.Config{MinVersion: tls.VersionTLS12, GetCertificate: getCert}}
	errc := make(chan error, 1)
	go func() { errc <- srv.ServeTLS(ln, "", "") }()
	s.log.Info("injector serving", "addr", ln.Addr().String(), "native_sidecars", s.wh.Native, "failure_policy", s.o.FailurePolicy, "version", lifecycle.Version)
	// Readiness follows the certificate state (a lost caBundle shows).
	go every(ctx, time.Second, func() {
		if ready() {
			s.hs.SetReady(nil)
		} else {
			s.hs.SetReady(errors.New("no certificate or caBundle not set"))
		}
	})
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	s.hs.SetReady(errors.New("shutting down"))
	s.log.Info("stopping", "delay", s.o.ShutdownDelay)
	time.Sleep(s.o.ShutdownDelay)
	sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return srv.Shutdown(sctx)
}

// LoadDefaults reads the platform's ConfigMap as mounted: one file per key
// (the kubelet's ..data links and dotfiles skipped); a missing directory is
// the built-in defaults.
func LoadDefaults(dir string) (Defaults, error) {
	data := map[string]string{}
	ents, err := os.ReadDir(dir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), ".") || e.IsDir() {
			continue
		}
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			return nil, err
		}
		data[e.Name()] = string(b)
	}
	return ParseDefaults(data)
}

func every(ctx context.Context, d time.Duration, f func()) {
	t := time.NewTicker(d)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			f()
		}
	}
}
