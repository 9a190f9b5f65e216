package injector

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/podkeeper/podkeeper/agents/events"
)

// Paths the webhook configuration calls: one webhook for namespaces labelled
// podkeeper.io/inject=enabled (every Pod unless it says "false"), one for the
// others (only Pods annotated podkeeper.io/inject: "true").
const (
	PathPod       = "/mutate"
	PathNamespace = "/mutate/namespace"
)

// AdmissionReview (admission.k8s.io/v1), the fields the webhook uses.
type AdmissionReview struct {
	APIVersion string             `json:"apiVersion"`
	Kind       string             `json:"kind"`
	Request    *AdmissionRequest  `json:"request,omitempty"`
	Response   *AdmissionResponse `json:"response,omitempty"`
}

type AdmissionRequest struct {
	UID       string                                `json:"uid"`
	Kind      struct{ Group, Version, Kind string } `json:"kind"`
	Namespace string                                `json:"namespace"`
	Name      string                                `json:"name"`
	Operation string                                `json:"operation"`
	Object    json.RawMessage                       `json:"object"`
	DryRun    *bool                                 `json:"dryRun,omitempty"`
}

type AdmissionResponse struct {
	UID       string   `json:"uid"`
	Allowed   bool     `json:"allowed"`
	Result    *Status  `json:"status,omitempty"`
	Patch     []byte   `json:"patch,omitempty"`
	PatchType *string  `json:"patchType,omitempty"`
	Warnings  []string `json:"warnings,omitempty"`
}

type Status struct {
	Code    int    `json:"code"`
	Message string `json:"message"`
}

// Webhook serves admission reviews.
type Webhook struct {
	// Reject: refuse a Pod whose podkeeper.io annotations are wrong (the
	// webhook's failurePolicy is Fail). Otherwise (failurePolicy Ignore, the
	// default) it is admitted unchanged with a warning, counted in
	// podkeeper_injector_admissions_total{result="invalid"}.
	Reject bool
	Native bool
	Log    *slog.Logger
	// Events: a Warning PodNotMutated on the injector's own Pod for each Pod it
	// could not mutate (agents/kube aggregates them: the count grows, the
	// message names the latest Pod and why). Nil: only the log and the metric.
	Events events.Recorder

	defaults atomic.Pointer[Defaults]
	total    *prometheus.CounterVec
	latency  prometheus.Histogram
}

// NewWebhook registers its metrics in reg.
func NewWebhook(d Defaults, reg prometheus.Registerer, log *slog.Logger) *Webhook {
	w := &Webhook{Log: log}
	w.SetDefaults(d)
	w.total = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "podkeeper_injector_admissions_total",
		Help: "Pod admissions by result: injected, unchanged (not requested or already injected), invalid (bad podkeeper.io annotation: refused or admitted unchanged), error.",
	}, []string{"result"})
	w.latency = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "podkeeper_injector_admission_duration_seconds",
		Help:    "Time to answer one admission review, from the request read to the response written.",
		Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, 1},
	})
	for _, r := range []string{"injected", "unchanged", "invalid", "error"} {
		w.total.WithLabelValues(r)
	}
	if reg != nil {
		reg.MustRegister(w.total, w.latency)
	}
	return w
}

// SetDefaults replaces the defaults (the ConfigMap changed).
func (w *Webhook) SetDefaults(d Defaults) { w.defaults.Store(&d) }

func (w *Webhook) ServeHTTP(rw http.ResponseWriter, r *http.Request) {
	t0 := time.Now()
	defer func() { w.latency.Observe(time.Since(t0).Seconds()) }()
	if r.Method != http.MethodPost {
		http.Error(rw, "POST an AdmissionReview", http.StatusMethodNotAllowed)
		return
	}
	var rev AdmissionReview
	body, err := io.ReadAll(io.LimitReader(r.Body, 8<<20))
	if err == nil {
		err = json.Unmarshal(body, &rev)
	}
	if err != nil || rev.Request == nil {
		w.total.WithLabelValues("error").Inc()
		http.Error(rw, fmt.Sprintf("not an AdmissionReview: %v", err), http.StatusBadRequest)
		return
	}
	resp := w.review(rev.Request, r.URL.Path == PathNamespace)
	out, _ := json.Marshal(AdmissionReview{APIVersion: "admission.k8s.io/v1", Kind: "AdmissionReview", Response: resp})
	rw.Header().Set("Content-Type", "application/json")
	rw.Write(out)
}

func (w *Webhook) review(req *AdmissionRequest, nsOptIn bool) *AdmissionResponse {
	resp := &AdmissionResponse{UID: req.UID, Allowed: true}
	if req.Kind.Kind != "Pod" || req.Operation != "CREATE" {
		w.total.WithLabelValues("unchanged").Inc()
		return resp
	}
	var pod obj
	if err := json.Unmarshal(req.Object, &pod); err != nil {
		w.total.WithLabelValues("error").Inc()
		resp.Warnings = []string{"podkeeper injector: the Pod does not decode, agents not injected: " + err.Error()}
		return resp
	}
	name := req.Name
	if name == "" {
		name, _ = dig(pod, "metadata", "generateName").(string)
	}
	res, err := Mutate(*w.defaults.Load(), Request{Pod: pod, Namespace: req.Namespace, NSOptIn: nsOptIn, Native: w.Native})
	if err != nil {
		var bad *Error
		result := "error"
		if errors.As(err, &bad) {
			result = "invalid"
		}
		w.total.WithLabelValues(result).Inc()
		w.Log.Warn("Pod not mutated", "namespace", req.Namespace, "pod", name, "workload", Workload(pod), "err", err, "refused", w.Reject)
		msg := "podkeeper injector: " + err.Error()
		// No Event for a dry run (the webhook declares sideEffects: None).
		if w.Events != nil && (req.DryRun == nil || !*req.DryRun) {
			what := "admitted without the agents"
			if w.Reject {
				what = "refused"
			}
			w.Events.Event(context.Background(), events.Warning, "PodNotMutated",
				fmt.Sprintf("Pod %s/%s (workload %s) %s: %v", req.Namespace, name, Workload(pod), what, err))
		}
		if w.Reject {
			resp.Allowed = false
			resp.Result = &Status{Code: http.StatusUnprocessableEntity, Message: msg}
			return resp
		}
		resp.Warnings = []string{msg + " (admitted without the agents)"}
		return resp
	}
	if res.Patch == nil {
		w.total.WithLabelValues("unchanged").Inc()
		return resp
	}
	patch, err := json.Marshal(res.Patch)
	if err != nil {
		w.total.WithLabelValues("error").Inc()
		resp.Warnings = []string{"podkeeper injector: " + err.Error()}
		return resp
	}
	pt := "JSONPatch"
	resp.Patch, resp.PatchType = patch, &pt
	w.total.WithLabelValues("injected").Inc()
	w.Log.Debug("agents injected", "namespace", req.Namespace, "pod", name, "agents", res.Added)
	return resp
}
