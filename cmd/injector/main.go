// Command injector is podkeeper's mutating admission webhook (package
// injector): it attaches restore, syncer and logshipper to Pods annotated
// podkeeper.io/inject: "true" (or in namespaces labelled
// podkeeper.io/inject=enabled). docs/injector.md.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/podkeeper/podkeeper/agents/lifecycle"
	"github.com/podkeeper/podkeeper/injector"
)

func main() { os.Exit(run(os.Args[1:], os.Stderr)) }

type options struct {
	injector.Options
	logLevel string
	version  bool
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
	fs.StringVar(&o.Listen, "listen", ":8443", "webhook address (TLS)")
	fs.StringVar(&o.HealthAddr, "health-addr", ":8080", "address of /healthz, /readyz, /metrics (plain HTTP)")
	fs.StringVar(&o.Namespace, "namespace", env("POD_NAMESPACE", ""), "the injector's namespace (its Secret's)")
	fs.StringVar(&o.Secret, "secret", "podkeeper-injector-tls", "Secret holding the CA and serving certificate (self-managed TLS)")
	fs.StringVar(&o.Webhook, "webhook-config", "podkeeper-injector", "MutatingWebhookConfiguration whose caBundle the injector sets (\"\": none)")
	fs.StringVar(&o.Service, "service", "podkeeper-injector", "Service name: the certificate is for <service>.<namespace>.svc")
	fs.StringVar(&o.ExtraSANs, "extra-sans", "", "more names or IPs for the certificate, comma-separated (e.g. 127.0.0.1 for a webhook called by URL)")
	fs.StringVar(&o.CertDir, "cert-dir", "", "serve tls.crt/tls.key from this directory (cert-manager) instead of managing a Secret")
	fs.StringVar(&o.DefaultsDir, "defaults-dir", "/etc/podkeeper-injector", "ConfigMap podkeeper-injector mounted here: one file per key (missing: built-in defaults)")
	fs.StringVar(&o.FailurePolicy, "failure-policy", "Ignore", "as in the webhook configuration: Ignore admits a Pod with bad podkeeper.io annotations unchanged with a warning, Fail refuses it")
	fs.StringVar(&o.Kubeconfig, "kubeconfig", env("KUBECONFIG", ""), "kubeconfig (outside a cluster)")
	fs.DurationVar(&o.CheckEvery, "check-every", 10*time.Minute, "how often the Secret, the caBundle and the defaults are checked")
	fs.DurationVar(&o.CertValidity, "cert-validity", 90*24*time.Hour, "serving certificate lifetime")
	fs.DurationVar(&o.RenewBefore, "renew-before", 30*24*time.Hour, "renew the serving certificate this long before it expires")
	fs.DurationVar(&o.CAValidity, "ca-validity", 5*365*24*time.Hour, "CA lifetime (renewed two serving-certificate lifetimes before it expires)")
	fs.DurationVar(&o.ShutdownDelay, "shutdown-delay", 5*time.Second, "on SIGTERM, unready this long before the server stops (endpoints catch up)")
	fs.StringVar(&o.logLevel, "log-level", env("LOG_LEVEL", "info"), "debug, info, warn, error")
	fs.BoolVar(&o.version, "version", false, "print the version and exit")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if o.version {
		return o, nil
	}
	if o.FailurePolicy != "Ignore" && o.FailurePolicy != "Fail" {
		return nil, fmt.Errorf("-failure-policy: %q is neither Ignore nor Fail", o.FailurePolicy)
	}
	if o.CertDir == "" && o.Namespace == "" {
		return nil, errors.New("-namespace (or POD_NAMESPACE) is required to manage the TLS Secret")
	}
	return o, nil
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
	if err := injector.Serve(ctx, o.Options, log); err != nil {
		log.Error("injector stopped", "err", err)
		return 1
	}
	return 0
}
