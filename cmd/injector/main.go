// Command injector is podkeeper's mutating admission webhook (package
// injector): it attaches restore, syncer and logshipper to Pods annotated
// podkeeper.io/inject: "true" (or in namespaces labelled
// podkeeper.io/inject=enabled). docs/injector.md.
package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/podkeeper/podkeeper/agents/config"
	"github.com/podkeeper/podkeeper/agents/events"
	"github.com/podkeeper/podkeeper/agents/health"
	"github.com/podkeeper/podkeeper/agents/kube"
	"github.com/podkeeper/podkeeper/agents/lifecycle"
	"github.com/podkeeper/podkeeper/injector"
)

func main() { os.Exit(run(os.Args[1:], os.Stderr)) }

type options struct {
	listen, healthAddr                    string
	namespace, secret, webhook, service   string
	sans                                  string
	certDir                               string
	defaultsDir                           string
	failurePolicy                         string
	kubeconfig                            string
	checkEvery, certValidity, renewBefore time.Duration
	caValidity, shutdownDelay             time.Duration
	logLevel                              string
	version                               bool
}

func env(k, def string) string {
	if v, ok := os.LookupEnv(k); ok {
		return v
	}
	return def
}

func parse(args []string, stderr io.Writer) (*options, error) {
	o := &options{}
	fs := flag.NewFlagSet("injector", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.listen, "listen", ":8443", "webhook address (TLS)")
	fs.StringVar(&o.healthAddr, "health-addr", ":8080", "address of /healthz, /readyz, /metrics (plain HTTP)")
	fs.StringVar(&o.namespace, "namespace", env("POD_NAMESPACE", ""), "the injector's namespace (its Secret's)")
	fs.StringVar(&o.secret, "secret", "podkeeper-injector-tls", "Secret holding the CA and serving certificate (self-managed TLS)")
	fs.StringVar(&o.webhook, "webhook-config", "podkeeper-injector", "MutatingWebhookConfiguration whose caBundle the injector sets (\"\": none)")
	fs.StringVar(&o.service, "service", "podkeeper-injector", "Service name: the certificate is for <service>.<namespace>.svc")
	fs.StringVar(&o.sans, "extra-sans", "", "more names or IPs for the certificate, comma-separated (e.g. 127.0.0.1 for a webhook called by URL)")
	fs.StringVar(&o.certDir, "cert-dir", "", "serve tls.crt/tls.key from this directory (cert-manager) instead of managing a Secret")
	fs.StringVar(&o.defaultsDir, "defaults-dir", "/etc/podkeeper-injector", "ConfigMap podkeeper-injector mounted here: one file per key (missing: built-in defaults)")
	fs.StringVar(&o.failurePolicy, "failure-policy", "Ignore", "as in the webhook configuration: Ignore admits a Pod with bad podkeeper.io annotations unchanged with a warning, Fail refuses it")
	fs.StringVar(&o.kubeconfig, "kubeconfig", env("KUBECONFIG", ""), "kubeconfig (outside a cluster)")
	fs.DurationVar(&o.checkEvery, "check-every", 10*time.Minute, "how often the Secret, the caBundle and the defaults are checked")
	fs.DurationVar(&o.certValidity, "cert-validity", 90*24*time.Hour, "serving certificate lifetime")
	fs.DurationVar(&o.renewBefore, "renew-before", 30*24*time.Hour, "renew the serving certificate this long before it expires")
	fs.DurationVar(&o.caValidity, "ca-validity", 5*365*24*time.Hour, "CA lifetime (renewed two serving-certificate lifetimes before it expires)")
	fs.DurationVar(&o.shutdownDelay, "shutdown-delay", 5*time.Second, "on SIGTERM, unready this long before the server stops (endpoints catch up)")
	fs.StringVar(&o.logLevel, "log-level", env("LOG_LEVEL", "info"), "debug, info, warn, error")
	fs.BoolVar(&o.version, "version", false, "print the version and exit")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if o.version {
		return o, nil
	}
	if o.failurePolicy != "Ignore" && o.failurePolicy != "Fail" {
		return nil, fmt.Errorf("-failure-policy: %q is neither Ignore nor Fail", o.failurePolicy)
	}
	if o.certDir == "" && o.namespace == "" {
		return nil, errors.New("-namespace (or POD_NAMESPACE) is required to manage the TLS Secret")
	}
	return o, nil
}

// loadDefaults reads the ConfigMap's files (keys; ..data and dotfiles skipped).
func loadDefaults(dir string) (injector.Defaults, error) {
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
	return injector.ParseDefaults(data)
}

func run(args []string, stderr io.Writer) int {
	o, err := parse(args, stderr)
	if err != nil {
		fmt.Fprintln(stderr, "injector:", err)
		return 2
	}
	if o.version {
		fmt.Fprintln(os.Stdout, "injector", lifecycle.Version)
		return 0
	}
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(o.logLevel)); err != nil {
		fmt.Fprintln(stderr, "injector: -log-level:", err)
		return 2
	}
	log := slog.New(slog.NewJSONHandler(stderr, &slog.HandlerOptions{Level: lvl})).With("agent", "injector")
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := serve(ctx, o, log); err != nil {
		log.Error("injector stopped", "err", err)
		return 1
	}
	return 0
}

func serve(ctx context.Context, o *options, log *slog.Logger) error {
	defaults, err := loadDefaults(o.defaultsDir)
	if err != nil {
		return fmt.Errorf("defaults (%s): %w", o.defaultsDir, err)
	}
	hs := health.New("injector")
	if err := hs.Start(o.healthAddr, log); err != nil {
		return err
	}
	defer hs.Close()
	hs.SetStarted()
	wh := injector.NewWebhook(defaults, hs.Registry, log)
	wh.Reject = o.failurePolicy == "Fail"

	var getCert func(*tls.ClientHelloInfo) (*tls.Certificate, error)
	var ready func() bool
	var api *injector.API
	var apiCfg *rest.Config
	needAPI := o.certDir == "" || defaults["sidecars"] == "auto"
	if needAPI {
		var cfg *rest.Config
		if o.kubeconfig != "" {
			cfg, err = clientcmd.BuildConfigFromFlags("", o.kubeconfig)
		} else {
			cfg, err = rest.InClusterConfig()
		}
		if err != nil {
			return fmt.Errorf("kubernetes client: %w", err)
		}
		cfg.Timeout = 10 * time.Second
		apiCfg = cfg
		if api, err = injector.NewAPI(cfg); err != nil {
			return err
		}
	}
	// Events on the injector's own Pod (POD_NAME, POD_UID from the downward API).
	base := &config.Base{PodName: os.Getenv("POD_NAME"), PodNamespace: o.namespace, PodUID: os.Getenv("POD_UID"), KubeEvents: "auto"}
	var rec *kube.Kube
	switch {
	case base.PodName == "" || base.PodUID == "" || o.namespace == "":
		log.Info("POD_NAME, POD_UID or the namespace unset: Events only in the log")
	case o.kubeconfig != "" && apiCfg != nil:
		rec, err = kube.NewForConfig(ctx, apiCfg, base, log, kube.Options{Component: "injector"})
	default:
		rec, err = kube.New(ctx, base, log, kube.Options{Component: "injector"})
	}
	if err != nil {
		log.Warn("Kubernetes Events not usable; they stay in the log", "err", err)
		rec = nil
	}
	if rec != nil {
		wh.Events = rec
		defer rec.CloseWithin(5 * time.Second)
	} else {
		wh.Events = events.Log{L: log}
	}
	switch defaults["sidecars"] {
	case "native":
		wh.Native = true
	case "auto":
		native, v, err := api.NativeSidecars(ctx)
		if err != nil {
			return fmt.Errorf("API server version: %w", err)
		}
		wh.Native = native
		log.Info("API server version", "version", v, "native_sidecars", native)
	}

	if o.certDir != "" {
		fc := &injector.FileCerts{CertFile: filepath.Join(o.certDir, "tls.crt"), KeyFile: filepath.Join(o.certDir, "tls.key")}
		if err := fc.Load(); err != nil {
			return fmt.Errorf("-cert-dir: %w", err)
		}
		getCert, ready = fc.GetCertificate, func() bool { return true }
		go every(ctx, o.checkEvery, func() {
			if err := fc.Load(); err != nil {
				log.Error("reload of the certificate failed; the current one keeps serving", "err", err)
			}
		})
	} else {
		cm := &injector.CertManager{API: api, Namespace: o.namespace, SecretName: o.secret, Webhook: o.webhook,
			CAValidity: o.caValidity, CertValidity: o.certValidity, RenewBefore: o.renewBefore, Log: log}
		svc := o.service + "." + o.namespace
		cm.DNSNames = []string{svc + ".svc", svc + ".svc.cluster.local", svc, o.service}
		for _, s := range strings.Split(o.sans, ",") {
			if s = strings.TrimSpace(s); s == "" {
				continue
			}
			if ip := net.ParseIP(s); ip != nil {
				cm.IPs = append(cm.IPs, ip)
			} else {
				cm.DNSNames = append(cm.DNSNames, s)
			}
		}
		// Until the first sync works (RBAC, API down) the injector is not
		// ready; it keeps trying.
		for {
			if err = cm.Sync(ctx); err == nil {
				break
			}
			hs.SetReady(err)
			log.Error("TLS setup failed; retrying in 5s", "err", err)
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(5 * time.Second):
			}
		}
		go cm.Run(ctx, o.checkEvery)
		getCert, ready = cm.GetCertificate, cm.Ready
	}
	go every(ctx, o.checkEvery, func() {
		d, err := loadDefaults(o.defaultsDir)
		if err != nil {
			log.Error("defaults changed to something invalid; keeping the previous ones", "err", err)
			return
		}
		wh.SetDefaults(d)
	})

	mux := http.NewServeMux()
	mux.Handle(injector.PathPod, wh)
	mux.Handle(injector.PathNamespace, wh)
	ln, err := net.Listen("tcp", o.listen)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second,
		TLSConfig: &tls.Config{MinVersion: tls.VersionTLS12, GetCertificate: getCert}}
	errc := make(chan error, 1)
	go func() { errc <- srv.ServeTLS(ln, "", "") }()
	log.Info("injector serving", "addr", ln.Addr().String(), "native_sidecars", wh.Native, "failure_policy", o.failurePolicy, "version", lifecycle.Version)
	// Readiness follows the certificate state (a lost caBundle shows).
	go every(ctx, time.Second, func() {
		if ready() {
			hs.SetReady(nil)
		} else {
			hs.SetReady(errors.New("no certificate or caBundle not set"))
		}
	})
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	hs.SetReady(errors.New("shutting down"))
	log.Info("stopping", "delay", o.shutdownDelay)
	time.Sleep(o.shutdownDelay)
	sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return srv.Shutdown(sctx)
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
