// Package kube connects an agent to the Kubernetes API of the cluster it runs in,
// for one thing only: posting Events on the agent's own Pod. It talks to the
// API with client-go's rest client and a scheme holding just the core/v1 types
// it sends; the generated clientset (k8s.io/client-go/kubernetes) would add
// ~35 MB to every agent for one call.
//
// What the agents know about their own Pod comes from the downward API, not
// from the API server: name, namespace, UID and node from the environment
// (POD_NAME, POD_NAMESPACE, POD_UID, NODE_NAME), labels from a file the
// kubelet keeps current (<SADir>/labels). So the RBAC this needs, and nothing
// more, is create + patch on events in the Pod's namespace: no read of any Pod,
// which would show the agents every neighbour's spec, literal env values
// included.
package kube

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/client-go/rest"

	"github.com/podkeeper/podkeeper/agents/config"
	"github.com/podkeeper/podkeeper/agents/events"
)

// ServiceAccountDir is where the kubelet mounts the Pod's service-account token.
const ServiceAccountDir = "/var/run/secrets/kubernetes.io/serviceaccount"

// Options tunes New. The zero value is what the agents use in a cluster.
type Options struct {
	// Component names the agent in Events (source.component
	// "podkeeper-<Component>", reportingController "podkeeper.io/<Component>").
	Component string

	// In-cluster discovery, overridable so tests can play "in a cluster" with a
	// real service-account token against a loopback apiserver. Empty: the
	// standard mount (ServiceAccountDir) and KUBERNETES_SERVICE_HOST/PORT.
	Host  string // e.g. https://127.0.0.1:6443
	SADir string // holds token, ca.crt, namespace

	// Interval is the least time between two API writes for one (type, reason):
	// occurrences in between are folded into one patch of the Event's count, so
	// a loop that fails every millisecond costs one write per Interval. Default 30s.
	Interval time.Duration
	// SeriesWindow: a repeat within this window updates the existing Event
	// (count, message, lastTimestamp); later, a new Event is created. Default 10m.
	SeriesWindow time.Duration
	// LabelsFile is the downward API file with the Pod's labels (one
	// key="value" per line, as the kubelet writes it). Default <SADir>/labels.
	LabelsFile string
	// LabelsRefresh is how often Labels re-reads LabelsFile. Default 1m.
	LabelsRefresh time.Duration
	// RequestTimeout bounds every API call. Default 10s.
	RequestTimeout time.Duration
}

func (o *Options) defaults() {
	if o.Component == "" {
		o.Component = "agent"
	}
	if o.SADir == "" {
		o.SADir = ServiceAccountDir
	}
	if o.LabelsFile == "" {
		o.LabelsFile = filepath.Join(o.SADir, "labels")
	}
	if o.Interval <= 0 {
		o.Interval = 30 * time.Second
	}
	if o.SeriesWindow <= 0 {
		o.SeriesWindow = 10 * time.Minute
	}
	if o.LabelsRefresh <= 0 {
		o.LabelsRefresh = time.Minute
	}
	if o.RequestTimeout <= 0 {
		o.RequestTimeout = 10 * time.Second
	}
}

// maxKeys bounds the aggregation table: reasons are a small fixed set per agent,
// so more distinct (type, reason) pairs than this means a bug, not a reason to grow.
const maxKeys = 64

// maxMessage is the API's limit on an Event's message.
const maxMessage = 1024

// Kube is an events.Recorder and a Pod-labels reader. When the API is not in
// use (KUBE_EVENTS=false, or auto outside a cluster) events go to the log,
// aggregated the same way, and Labels returns nil.
type Kube struct {
	log  *slog.Logger
	opts Options
	base *config.Base

	client *rest.RESTClient // nil when off

	labels     atomic.Pointer[map[string]string]
	labelsOnce sync.Once

	mu      sync.Mutex
	series  map[key]*series
	dropped int // occurrences refused because the table was full
	wake    chan struct{}

	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}
	closed atomic.Bool
	// Counters, for tests and the log.
	creates, patches, failures atomic.Int64
}

type key struct {
	t      events.Type
	reason string
}

type series struct {
	name      string // Event object name once created
	first     time.Time
	lastWrite time.Time
	count     int32 // occurrences already written
	pending   int32 // occurrences not yet written
	message   string
}

var _ events.Recorder = (*Kube)(nil)

// New connects per base.KubeEvents:
//   - "false": never touches the API.
//   - "auto": uses the API when a service-account token and
//     KUBERNETES_SERVICE_HOST are present; otherwise, or when the API refuses
//     (unreachable, forbidden), logs one line and keeps events in the log.
//   - "true": returns an error when not in a cluster (a *config.Error naming
//     KUBE_EVENTS or POD_NAME), or when the own Pod cannot be read or Events
//     may not be created.
//
// Close must be called to flush pending Events before the process exits.
func New(ctx context.Context, base *config.Base, log *slog.Logger, opts Options) (*Kube, error) {
	k := newKube(ctx, base, log, opts)
	mode := base.KubeEvents
	if mode == "" {
		mode = "auto"
	}
	if mode != "false" {
		if err := k.connect(ctx, mode == "true"); err != nil {
			if mode == "true" {
				k.cancel()
				return nil, err
			}
			log.Warn("Kubernetes API not usable; events stay in the log", "err", err)
			k.client = nil
		}
	}
	go k.run()
	return k, nil
}

// errNotInCluster is what auto mode treats as "quietly off".
var errNotInCluster = errors.New("not running in a Kubernetes cluster")

func (k *Kube) connect(ctx context.Context, required bool) error {
	cfg, err := k.inCluster()
	if errors.Is(err, errNotInCluster) && !required {
		k.log.Debug("not in a cluster; Kubernetes Events off", "reason", err)
		return nil
	}
	if err != nil {
		if errors.Is(err, errNotInCluster) {
			errs := &config.Error{}
			errs.Add("KUBE_EVENTS", "true", "requires running in a Kubernetes Pod with a service-account token (%v); use auto or false outside a cluster", err)
			return errs
		}
		return err
	}
	if k.base.PodNamespace == "" {
		if b, err := os.ReadFile(filepath.Join(k.opts.SADir, "namespace")); err == nil {
			k.base.PodNamespace = string(b)
		}
	}
	return k.attach(ctx, cfg)
}

// attach checks the Pod's identity and the Events permission; only then is
// the API used, so a half-configured cluster degrades to log-only in one place.
func (k *Kube) attach(ctx context.Context, cfg *rest.Config) error {
	if err := k.identity(); err != nil {
		return err
	}
	client, err := newRESTClient(cfg)
	if err != nil {
		return fmt.Errorf("kubernetes client: %w", err)
	}
	rctx, cancel := context.WithTimeout(ctx, k.opts.RequestTimeout)
	defer cancel()
	if err := k.canCreateEvents(rctx, client); err != nil {
		return err
	}
	k.client = client
	k.log.Debug("Kubernetes Events on", "pod", k.base.PodName, "namespace", k.base.PodNamespace, "uid", k.base.PodUID)
	return nil
}

// identity: an Event names its Pod by namespace, name and UID (kubectl
// describe matches all three), and all three come from the downward API.
func (k *Kube) identity() error {
	errs := &config.Error{}
	if k.base.PodName == "" || k.base.PodNamespace == "" {
		errs.Add("POD_NAME", k.base.PodName, "must be set (downward API fieldRef metadata.name, with POD_NAMESPACE from metadata.namespace) to post Kubernetes Events on this Pod")
	}
	if k.base.PodUID == "" {
		errs.Add("POD_UID", "", "must be set (downward API fieldRef metadata.uid) to post Kubernetes Events on this Pod")
	}
	return errs.Err()
}

// canCreateEvents asks the API (SelfSubjectAccessReview, allowed to every
// authenticated user) instead of posting a probe Event: a start-up check must
// not leave litter on the Pod.
func (k *Kube) canCreateEvents(ctx context.Context, client *rest.RESTClient) error {
	review := accessReview{APIVersion: "authorization.k8s.io/v1", Kind: "SelfSubjectAccessReview"}
	review.Spec.ResourceAttributes = &resourceAttributes{Namespace: k.base.PodNamespace, Verb: "create", Resource: "events"}
	body, err := json.Marshal(review)
	if err != nil {
		return err
	}
	raw, err := rawBody(client.Post().AbsPath("/apis/authorization.k8s.io/v1/selfsubjectaccessreviews").
		SetHeader("Content-Type", "application/json").Body(body).Do(ctx))
	if err != nil {
		return fmt.Errorf("check permission to create events: %w", err)
	}
	var out accessReview
	if err := json.Unmarshal(raw, &out); err != nil {
		return fmt.Errorf("check permission to create events: %w", err)
	}
	if !out.Status.Allowed {
		return fmt.Errorf("not allowed to create events in namespace %s (%s): grant the agents' Role (events: create, patch)", k.base.PodNamespace, out.Status.Reason)
	}
	return nil
}

func (k *Kube) inCluster() (*rest.Config, error) {
	host := k.opts.Host
	if host == "" {
		h, p := os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT")
		if h == "" || p == "" {
			return nil, fmt.Errorf("%w: KUBERNETES_SERVICE_HOST/PORT unset", errNotInCluster)
		}
		host = "https://" + net.JoinHostPort(h, p)
	}
	token := filepath.Join(k.opts.SADir, "token")
	if _, err := os.Stat(token); err != nil {
		return nil, fmt.Errorf("%w: no service-account token (%v)", errNotInCluster, err)
	}
	return &rest.Config{
		Host: host,
		// BearerTokenFile, not the token's value: client-go re-reads it, and the
		// kubelet rotates projected tokens (1h by default).
		BearerTokenFile: token,
		TLSClientConfig: rest.TLSClientConfig{CAFile: filepath.Join(k.opts.SADir, "ca.crt")},
		UserAgent:       "podkeeper-" + k.opts.Component,
		// A second line of defence behind the aggregation: whatever a bug does,
		// this agent cannot send the API more than this.
		QPS: 5, Burst: 10,
	}, nil
}

var coreV1 = schema.GroupVersion{Version: "v1"}

// scheme knows only meta/v1 (Status, for the API's errors): bodies are this
// package's own structs, sent and read as raw JSON.
var scheme = func() *runtime.Scheme {
	s := runtime.NewScheme()
	metav1.AddToGroupVersion(s, coreV1)
	return s
}()

func newRESTClient(cfg *rest.Config) (*rest.RESTClient, error) {
	c := rest.CopyConfig(cfg)
	c.APIPath = "/api"
	c.GroupVersion = &coreV1
	c.ContentType = runtime.ContentTypeJSON
	c.NegotiatedSerializer = serializer.NewCodecFactory(scheme).WithoutConversion()
	return rest.RESTClientFor(c)
}

// NewForConfig is New with an explicit client configuration (a kubeconfig's,
// in tests and tools) instead of in-cluster discovery; base.KubeEvents is
// treated as "true".
func NewForConfig(ctx context.Context, cfg *rest.Config, base *config.Base, log *slog.Logger, opts Options) (*Kube, error) {
	k := newKube(ctx, base, log, opts)
	if err := k.attach(ctx, cfg); err != nil {
		k.cancel()
		return nil, err
	}
	go k.run()
	return k, nil
}

func newKube(ctx context.Context, base *config.Base, log *slog.Logger, opts Options) *Kube {
	opts.defaults()
	k := &Kube{log: log, opts: opts, base: base, series: map[key]*series{}, wake: make(chan struct{}, 1), done: make(chan struct{})}
	k.ctx, k.cancel = context.WithCancel(context.WithoutCancel(ctx))
	return k
}

// Enabled reports whether Events go to the API (false: only to the log).
func (k *Kube) Enabled() bool { return k.client != nil }

// Event records one occurrence. It never blocks on the network: the write
// happens in the background, aggregated per (type, reason).
func (k *Kube) Event(_ context.Context, t events.Type, reason, message string) {
	if k.closed.Load() {
		events.Log{L: k.log}.Event(context.Background(), t, reason, message)
		return
	}
	k.mu.Lock()
	s, ok := k.series[key{t, reason}]
	if !ok {
		if len(k.series) >= maxKeys {
			k.dropped++
			k.mu.Unlock()
			return
		}
		s = &series{}
		k.series[key{t, reason}] = s
	}
	s.pending++
	s.message = message
	k.mu.Unlock()
	select {
	case k.wake <- struct{}{}:
	default:
	}
}

// Stats reports how many Events were created, patched, and how many writes failed.
func (k *Kube) Stats() (creates, patches, failures int64) {
	return k.creates.Load(), k.patches.Load(), k.failures.Load()
}

// Close writes what is pending (ignoring Interval: the process is about to
// exit) and stops the background work. ctx bounds the flush.
func (k *Kube) Close(ctx context.Context) error {
	if !k.closed.CompareAndSwap(false, true) {
		return nil
	}
	k.cancel()
	select {
	case <-k.done:
	case <-ctx.Done():
		// A write in flight to a hanging API: give up rather than hold the Pod's exit.
		return ctx.Err()
	}
	k.flush(ctx, time.Now(), true)
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.dropped > 0 {
		k.log.Warn("events dropped: too many distinct reasons", "dropped", k.dropped)
	}
	return ctx.Err()
}

// CloseWithin is Close bounded by d, for a deferred call in an agent's main:
// an init container's last Event (Restored) must reach the API before exit,
// but an unreachable API must not hold the Pod up.
func (k *Kube) CloseWithin(d time.Duration) {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	if err := k.Close(ctx); err != nil {
		k.log.Warn("pending Kubernetes Events not all written", "err", err)
	}
}

func (k *Kube) run() {
	defer close(k.done)
	tick := time.NewTicker(min(k.opts.Interval/4+time.Millisecond, time.Second))
	defer tick.Stop()
	for {
		select {
		case <-k.ctx.Done():
			return
		case <-k.wake:
		case <-tick.C:
		}
		// Not k.ctx: Close cancels it, and a write cut off mid-flight may have
		// landed anyway; Close waits for this one (bounded by RequestTimeout).
		k.flush(context.WithoutCancel(k.ctx), time.Now(), false)
	}
}

type write struct {
	k       key
	s       *series
	name    string
	first   time.Time
	count   int32 // total after this write
	taken   int32 // occurrences this write carries
	message string
	create  bool
}

// flush writes every series whose Interval has passed (or all, when force).
func (k *Kube) flush(ctx context.Context, now time.Time, force bool) {
	k.mu.Lock()
	var todo []write
	for kk, s := range k.series {
		if s.pending == 0 || (!force && !s.lastWrite.IsZero() && now.Sub(s.lastWrite) < k.opts.Interval) {
			continue
		}
		w := write{k: kk, s: s, message: s.message}
		if s.name == "" || now.Sub(s.first) >= k.opts.SeriesWindow {
			w.create, w.first, w.count = true, now, s.pending
		} else {
			w.name, w.first, w.count = s.name, s.first, s.count+s.pending
		}
		w.taken = s.pending
		// Taken now, so occurrences during the write count toward the next one.
		s.pending, s.lastWrite = 0, now
		todo = append(todo, w)
	}
	k.mu.Unlock()
	for i := range todo {
		w := &todo[i]
		name, err := k.write(ctx, w, now)
		k.mu.Lock()
		switch {
		case err == nil:
			w.s.name, w.s.first, w.s.count = name, w.first, w.count
		case retryable(err) && !force:
			// Put the occurrences back; the next Interval retries them.
			w.s.pending += w.taken
		}
		k.mu.Unlock()
	}
}

func (k *Kube) write(ctx context.Context, w *write, now time.Time) (string, error) {
	msg := w.message
	if len(msg) > maxMessage {
		msg = msg[:maxMessage-3] + "..."
	}
	if k.client == nil {
		lvl := slog.LevelInfo
		if w.k.t == events.Warning {
			lvl = slog.LevelWarn
		}
		k.log.Log(ctx, lvl, "event", "reason", w.k.reason, "message", msg, "count", w.count)
		return "log", nil
	}
	rctx, cancel := context.WithTimeout(ctx, k.opts.RequestTimeout)
	defer cancel()
	if !w.create {
		patch, _ := json.Marshal(map[string]any{"count": w.count, "message": msg, "lastTimestamp": apiTime(now)})
		err := k.client.Patch("application/merge-patch+json").Namespace(k.base.PodNamespace).Resource("events").
			Name(w.name).Body(patch).Do(rctx).Error()
		if err == nil {
			k.patches.Add(1)
			return w.name, nil
		}
		if !apierrors.IsNotFound(err) {
			return "", k.failed(w, err)
		}
		// The API expires Events (1h by default): start a new one with the total.
		w.create, w.first = true, now
	}
	ev := &event{
		APIVersion: "v1", Kind: "Event",
		Metadata: objectMeta{GenerateName: k.base.PodName + ".", Namespace: k.base.PodNamespace},
		InvolvedObject: objectReference{
			APIVersion: "v1", Kind: "Pod", Namespace: k.base.PodNamespace, Name: k.base.PodName, UID: k.base.PodUID,
		},
		Reason: w.k.reason, Message: msg, Type: string(w.k.t), Count: w.count,
		FirstTimestamp: apiTime(w.first), LastTimestamp: apiTime(now),
		Source:              eventSource{Component: "podkeeper-" + k.opts.Component, Host: k.base.NodeName},
		ReportingController: "podkeeper.io/" + k.opts.Component,
		ReportingInstance:   k.base.PodName,
	}
	body, err := json.Marshal(ev)
	if err != nil {
		return "", err
	}
	raw, err := rawBody(k.client.Post().Namespace(k.base.PodNamespace).Resource("events").Body(body).Do(rctx))
	if err != nil {
		return "", k.failed(w, err)
	}
	var out event
	if err := json.Unmarshal(raw, &out); err != nil {
		return "", k.failed(w, err)
	}
	k.creates.Add(1)
	return out.Metadata.Name, nil
}

func (k *Kube) failed(w *write, err error) error {
	k.failures.Add(1)
	level := slog.LevelWarn
	if retryable(err) {
		level = slog.LevelDebug
	}
	k.log.Log(context.Background(), level, "could not post Kubernetes Event", "reason", w.k.reason, "retryable", retryable(err), "err", err)
	return err
}

// retryable: worth trying again at the next Interval (the API or the network
// is having a moment); anything else (forbidden, invalid) would fail the same way.
func retryable(err error) bool {
	var status apierrors.APIStatus
	if errors.As(err, &status) {
		return apierrors.IsServerTimeout(err) || apierrors.IsTimeout(err) || apierrors.IsTooManyRequests(err) ||
			apierrors.IsInternalError(err) || apierrors.IsServiceUnavailable(err) || status.Status().Code >= 500
	}
	// Not an API status: a transport error (refused, reset, TLS, deadline).
	return true
}

// Labels returns the Pod's labels from the downward API file, read at the
// first call and re-read every LabelsRefresh in the background (so agents that
// never ask pay nothing). The map is shared: callers must not modify it. nil
// when the file does not exist (outside a cluster, or not mounted).
func (k *Kube) Labels() map[string]string {
	k.labelsOnce.Do(func() {
		k.readLabels()
		go k.refreshLabels()
	})
	if p := k.labels.Load(); p != nil {
		return *p
	}
	return nil
}

func (k *Kube) readLabels() {
	b, err := os.ReadFile(k.opts.LabelsFile)
	if err != nil {
		if !errors.Is(err, fs.ErrNotExist) {
			// Keep the last labels: stale labels beat records without them.
			k.log.Debug("read Pod labels", "file", k.opts.LabelsFile, "err", err)
		}
		return
	}
	l, err := parseLabels(b)
	if err != nil {
		k.log.Warn("Pod labels file unreadable; keeping the last labels", "file", k.opts.LabelsFile, "err", err)
		return
	}
	k.labels.Store(&l)
}

func (k *Kube) refreshLabels() {
	t := time.NewTicker(k.opts.LabelsRefresh)
	defer t.Stop()
	for {
		select {
		case <-k.ctx.Done():
			return
		case <-t.C:
			k.readLabels()
		}
	}
}

// parseLabels reads the kubelet's downward API format: one key="value" per
// line, the value quoted as a Go string literal.
func parseLabels(b []byte) (map[string]string, error) {
	l := map[string]string{}
	for line := range strings.Lines(string(b)) {
		line = strings.TrimSpace(line)
		if line == "" {
			continue
		}
		key, quoted, ok := strings.Cut(line, "=")
		if !ok || key == "" {
			return nil, fmt.Errorf("line %q is not key=\"value\"", line)
		}
		v, err := strconv.Unquote(quoted)
		if err != nil {
			return nil, fmt.Errorf("label %s: value %s: %w", key, quoted, err)
		}
		l[key] = v
	}
	return l, nil
}
