package injector

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/podkeeper/podkeeper/agents/events"
)

type recorder struct{ msgs []string }

func (r *recorder) Event(_ context.Context, t events.Type, reason, msg string) {
	r.msgs = append(r.msgs, string(t)+" "+reason+" "+msg)
}

func review(t *testing.T, h http.Handler, path string, p obj, dry bool) AdmissionResponse {
	t.Helper()
	pb, _ := json.Marshal(p)
	body, _ := json.Marshal(AdmissionReview{APIVersion: "admission.k8s.io/v1", Kind: "AdmissionReview", Request: &AdmissionRequest{
		UID: "u-1", Kind: struct{ Group, Version, Kind string }{"", "v1", "Pod"}, Namespace: "files",
		Operation: "CREATE", Object: pb, DryRun: &dry}})
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("POST", path, bytes.NewReader(body)))
	var out AdmissionReview
	if err := json.Unmarshal(rec.Body.Bytes(), &out); err != nil || out.Response == nil || out.Response.UID != "u-1" {
		t.Fatalf("response %d %s: %v", rec.Code, rec.Body, err)
	}
	return *out.Response
}

func TestWebhook(t *testing.T) {
	d, _ := ParseDefaults(nil)
	reg := prometheus.NewRegistry()
	w := NewWebhook(d, reg, slog.New(slog.DiscardHandler))
	w.Native = true
	ev := &recorder{}
	w.Events = ev

	// Injected: a JSONPatch; the namespace path injects without the Pod's annotation.
	r := review(t, w, PathPod, pod(on), false)
	if !r.Allowed || r.PatchType == nil || *r.PatchType != "JSONPatch" || len(r.Patch) == 0 {
		t.Fatalf("annotated Pod: %+v", r)
	}
	var ops []Op
	if err := json.Unmarshal(r.Patch, &ops); err != nil {
		t.Fatalf("patch: %v (%s)", err, base64.StdEncoding.EncodeToString(r.Patch))
	}
	if r := review(t, w, PathPod, pod(map[string]string{AnnStoreURL: "s3://b/p"}), false); r.Patch != nil {
		t.Fatal("a Pod that did not ask was mutated")
	}
	if r := review(t, w, PathNamespace, pod(map[string]string{AnnStoreURL: "s3://b/p"}), false); r.Patch == nil {
		t.Fatal("a Pod of a labelled namespace was not mutated")
	}
	// A bad annotation under Ignore: admitted unchanged, with a warning and an Event.
	bad := pod(with(AnnAgents, "backup"))
	r = review(t, w, PathPod, bad, false)
	if !r.Allowed || r.Patch != nil || len(r.Warnings) != 1 || !strings.Contains(r.Warnings[0], AnnAgents) {
		t.Fatalf("Ignore: %+v", r)
	}
	if len(ev.msgs) != 1 || !strings.Contains(ev.msgs[0], "Warning PodNotMutated Pod files/files-api-5d8f7c9b4- (workload files-api) admitted without the agents") {
		t.Fatalf("events: %q", ev.msgs)
	}
	// Under Fail: refused naming the annotation; a dry run leaves no Event.
	w.Reject = true
	r = review(t, w, PathPod, bad, true)
	if r.Allowed || r.Result == nil || r.Result.Code != 422 || !strings.Contains(r.Result.Message, AnnAgents) {
		t.Fatalf("Fail: %+v", r)
	}
	if len(ev.msgs) != 1 {
		t.Fatalf("a dry run posted an Event: %q", ev.msgs)
	}
	for res, want := range map[string]float64{"injected": 2, "unchanged": 1, "invalid": 2, "error": 0} {
		if got := testutil.ToFloat64(w.total.WithLabelValues(res)); got != want {
			t.Errorf("admissions_total{result=%q} = %v, want %v", res, got, want)
		}
	}
	// Not an AdmissionReview.
	rec := httptest.NewRecorder()
	w.ServeHTTP(rec, httptest.NewRequest("POST", PathPod, strings.NewReader("{")))
	if rec.Code != 400 {
		t.Fatalf("garbage: %d", rec.Code)
	}
}
