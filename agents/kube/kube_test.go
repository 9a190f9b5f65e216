package kube

import (
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/podkeeper/podkeeper/agents/config"
	"github.com/podkeeper/podkeeper/agents/events"
	"github.com/podkeeper/podkeeper/test/peers"
)

// fakeAPI is an httptest stand-in for the few kube-apiserver endpoints this
// package calls, for edge cases a real apiserver will not produce on demand
// (5xx, expired Events, a permission that flips). The real thing is exercised
// by test/k8s.
type fakeAPI struct {
	t      *testing.T
	srv    *httptest.Server
	saDir  string
	token  string
	mu     sync.Mutex
	allow  bool
	events map[string]*event
	seq    int
	// fail: method -> statuses to answer with, one per request, before serving normally.
	fail    map[string][]int
	creates int
	patches int
	gets    int
	// hang, when set, holds every Event write until the channel is closed.
	hang chan struct{}
}

func newFakeAPI(t *testing.T) *fakeAPI {
	f := &fakeAPI{t: t, token: "sa-token-123", allow: true,
		events: map[string]*event{}, fail: map[string][]int{}}
	f.srv = httptest.NewTLSServer(http.HandlerFunc(f.serve))
	t.Cleanup(f.srv.Close)
	f.saDir = t.TempDir()
	ca := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: f.srv.Certificate().Raw})
	must(t, os.WriteFile(filepath.Join(f.saDir, "ca.crt"), ca, 0o600))
	must(t, os.WriteFile(filepath.Join(f.saDir, "token"), []byte(f.token), 0o600))
	must(t, os.WriteFile(filepath.Join(f.saDir, "namespace"), []byte("team"), 0o600))
	// The kubelet's downward API format, quoting included.
	must(t, os.WriteFile(filepath.Join(f.saDir, "labels"), []byte("app=\"upload\"\nnote=\"a \\\"quoted\\\" value\"\n"), 0o600))
	t.Cleanup(func() {
		if f.gets > 0 {
			t.Errorf("the agent read from the API %d times; it has no RBAC to read anything", f.gets)
		}
	})
	return f
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func status(w http.ResponseWriter, code int, reason string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	fmt.Fprintf(w, `{"kind":"Status","apiVersion":"v1","status":"Failure","reason":%q,"code":%d,"message":"fake %d"}`, reason, code, code)
}

var reasons = map[int]string{403: "Forbidden", 404: "NotFound", 500: "InternalError", 503: "ServiceUnavailable"}

func (f *fakeAPI) serve(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if r.Header.Get("Authorization") != "Bearer "+f.token {
		status(w, 401, "Unauthorized")
		return
	}
	if q := f.fail[r.Method]; len(q) > 0 {
		f.fail[r.Method] = q[1:]
		status(w, q[0], reasons[q[0]])
		return
	}
	if f.hang != nil && r.URL.Path == "/api/v1/namespaces/team/events" {
		h := f.hang
		f.mu.Unlock()
		<-h
		f.mu.Lock()
		status(w, 503, "ServiceUnavailable")
		return
	}
	body, _ := io.ReadAll(r.Body)
	w.Header().Set("Content-Type", "application/json")
	switch {
	case r.Method == "GET":
		// The agents read nothing from the API (no RBAC for it): any GET is a bug.
		f.gets++
		status(w, 403, "Forbidden")
	case r.Method == "POST" && r.URL.Path == "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews":
		var rev accessReview
		json.Unmarshal(body, &rev)
		rev.Status.Allowed = f.allow && rev.Spec.ResourceAttributes != nil && rev.Spec.ResourceAttributes.Resource == "events"
		json.NewEncoder(w).Encode(rev)
	case r.Method == "POST" && r.URL.Path == "/api/v1/namespaces/team/events":
		var ev event
		if err := json.Unmarshal(body, &ev); err != nil || ev.InvolvedObject.UID != "uid-1" || ev.Metadata.GenerateName == "" {
			status(w, 422, "Invalid")
			return
		}
		f.seq++
		ev.Metadata.Name = fmt.Sprintf("%s%d", ev.Metadata.GenerateName, f.seq)
		f.events[ev.Metadata.Name] = &ev
		f.creates++
		json.NewEncoder(w).Encode(ev)
	case r.Method == "PATCH" && strings.HasPrefix(r.URL.Path, "/api/v1/namespaces/team/events/"):
		ev, ok := f.events[strings.TrimPrefix(r.URL.Path, "/api/v1/namespaces/team/events/")]
		if !ok {
			status(w, 404, "NotFound")
			return
		}
		if r.Header.Get("Content-Type") != "application/merge-patch+json" {
			status(w, 415, "UnsupportedMediaType")
			return
		}
		must(f.t, json.Unmarshal(body, ev))
		f.patches++
		json.NewEncoder(w).Encode(ev)
	default:
		status(w, 404, "NotFound")
	}
}

// total is the count of all Events with reason, as a reader of the API sees it.
func (f *fakeAPI) total(reason string) (n int32, objects int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, ev := range f.events {
		if ev.Reason == reason {
			n += ev.Count
			objects++
		}
	}
	return n, objects
}

func (f *fakeAPI) opts() Options {
	return Options{Component: "syncer", Host: f.srv.URL, SADir: f.saDir}
}

func testLog() (*slog.Logger, *peers.LockedBuffer) {
	b := &peers.LockedBuffer{}
	return slog.New(slog.NewJSONHandler(b, &slog.HandlerOptions{Level: slog.LevelDebug})), b
}

func base(mode string) *config.Base {
	return &config.Base{PodName: "upload-0", PodNamespace: "team", PodUID: "uid-1", NodeName: "node-a", KubeEvents: mode}
}

func TestAutoOutsideClusterIsQuietlyLogOnly(t *testing.T) {
	t.Setenv("KUBERNETES_SERVICE_HOST", "")
	log, buf := testLog()
	k, err := New(t.Context(), base("auto"), log, Options{SADir: t.TempDir()})
	if err != nil {
		t.Fatalf("auto outside a cluster must not fail: %v", err)
	}
	if k.Enabled() || k.Labels() != nil {
		t.Fatalf("enabled=%v labels=%v outside a cluster", k.Enabled(), k.Labels())
	}
	k.Event(t.Context(), events.Warning, "UploadsFailing", "s3 down")
	must(t, k.Close(t.Context()))
	if !strings.Contains(buf.String(), `"reason":"UploadsFailing"`) || strings.Contains(buf.String(), `"level":"WARN","msg":"Kubernetes`) {
		t.Fatalf("want the event in the log and no warning about the API, got:\n%s", buf)
	}
}

func TestTrueOutsideClusterIsConfigError(t *testing.T) {
	t.Setenv("KUBERNETES_SERVICE_HOST", "")
	log, _ := testLog()
	_, err := New(t.Context(), base("true"), log, Options{SADir: t.TempDir()})
	var ce *config.Error
	if !errors.As(err, &ce) || !ce.Has("KUBE_EVENTS") {
		t.Fatalf("want a *config.Error naming KUBE_EVENTS, got %v", err)
	}
}

func TestFalseNeverCallsTheAPI(t *testing.T) {
	f := newFakeAPI(t)
	log, _ := testLog()
	k, err := New(t.Context(), base("false"), log, f.opts())
	must(t, err)
	k.Event(t.Context(), events.Normal, "Restored", "x")
	must(t, k.Close(t.Context()))
	if n, _ := f.total("Restored"); n != 0 || k.Enabled() {
		t.Fatalf("KUBE_EVENTS=false reached the API (count %d)", n)
	}
}

func TestTrueNeedsPodIdentity(t *testing.T) {
	f := newFakeAPI(t)
	log, _ := testLog()
	b := base("true")
	b.PodName, b.PodUID = "", ""
	_, err := New(t.Context(), b, log, f.opts())
	var ce *config.Error
	if !errors.As(err, &ce) || !ce.Has("POD_NAME") || !ce.Has("POD_UID") {
		t.Fatalf("want a *config.Error naming POD_NAME and POD_UID, got %v", err)
	}
}

func TestNamespaceFromServiceAccount(t *testing.T) {
	f := newFakeAPI(t)
	log, _ := testLog()
	b := base("true")
	b.PodNamespace = ""
	k, err := New(t.Context(), b, log, f.opts())
	must(t, err)
	defer k.Close(t.Context())
	if b.PodNamespace != "team" || !k.Enabled() {
		t.Fatalf("namespace %q, enabled %v", b.PodNamespace, k.Enabled())
	}
}

func TestForbidden(t *testing.T) {
	f := newFakeAPI(t)
	f.allow = false
	log, buf := testLog()
	_, err := New(t.Context(), base("true"), log, f.opts())
	if err == nil || !strings.Contains(err.Error(), "not allowed to create events") {
		t.Fatalf("true + forbidden: want an error at start, got %v", err)
	}
	k, err := New(t.Context(), base("auto"), log, f.opts())
	if err != nil {
		t.Fatalf("auto + forbidden must degrade, not fail: %v", err)
	}
	defer k.Close(t.Context())
	if k.Enabled() || !strings.Contains(buf.String(), "events stay in the log") {
		t.Fatalf("auto + forbidden: enabled=%v log:\n%s", k.Enabled(), buf)
	}
}

func TestUnreachable(t *testing.T) {
	f := newFakeAPI(t)
	f.srv.Close()
	log, _ := testLog()
	if _, err := New(t.Context(), base("true"), log, f.opts()); err == nil {
		t.Fatal("true + unreachable API: want an error at start")
	}
}

// A loop that reports the same problem 1000 times costs one create and, at
// Close, one patch; nothing is lost: the API's count is the number of calls.
func TestAggregation(t *testing.T) {
	f := newFakeAPI(t)
	log, _ := testLog()
	o := f.opts()
	o.Interval = time.Hour
	k, err := New(t.Context(), base("true"), log, o)
	must(t, err)
	for i := range 1000 {
		k.Event(t.Context(), events.Warning, "UploadsFailing", fmt.Sprintf("attempt %d failed", i))
	}
	k.Event(t.Context(), events.Normal, "SnapshotWritten", "snapshot 1")
	must(t, peers.WaitFor(t.Context(), 10*time.Second, func() error {
		if n, _ := f.total("SnapshotWritten"); n != 1 {
			return fmt.Errorf("SnapshotWritten count %d", n)
		}
		return nil
	}))
	must(t, k.Close(t.Context()))
	n, objects := f.total("UploadsFailing")
	f.mu.Lock()
	creates, patches := f.creates, f.patches
	var last string
	for _, ev := range f.events {
		if ev.Reason == "UploadsFailing" {
			last = ev.Message
			if ev.Type != "Warning" || ev.Source.Component != "podkeeper-syncer" || ev.InvolvedObject.Name != "upload-0" || ev.ReportingInstance != "upload-0" {
				t.Errorf("event fields: %+v", ev)
			}
		}
	}
	f.mu.Unlock()
	if n != 1000 || objects != 1 || creates != 2 || patches > 1 || last != "attempt 999 failed" {
		t.Fatalf("count=%d objects=%d creates=%d patches=%d last=%q; want 1000 in one Event, 2 creates, <=1 patch, the latest message", n, objects, creates, patches, last)
	}
}

// With a short Interval the number of API writes stays bounded by time, not by
// the number of calls.
func TestRateLimit(t *testing.T) {
	f := newFakeAPI(t)
	log, _ := testLog()
	o := f.opts()
	o.Interval = 100 * time.Millisecond
	k, err := New(t.Context(), base("true"), log, o)
	must(t, err)
	start := time.Now()
	calls := 0
	for time.Since(start) < 500*time.Millisecond {
		k.Event(t.Context(), events.Warning, "BacklogGrowing", "backlog")
		calls++
	}
	must(t, k.Close(t.Context()))
	elapsed := time.Since(start)
	n, _ := f.total("BacklogGrowing")
	f.mu.Lock()
	writes := f.creates + f.patches
	f.mu.Unlock()
	limit := int(elapsed/o.Interval) + 2 // +1 for the first write, +1 for Close's flush
	if int(n) != calls || writes > limit {
		t.Fatalf("%d calls in %s: count %d, %d writes (limit %d)", calls, elapsed, n, writes, limit)
	}
}

// A 5xx is retried at the next Interval without losing occurrences; an Event
// the API expired (404 on patch) is created again with the running total.
func TestRetryAndExpiry(t *testing.T) {
	f := newFakeAPI(t)
	log, _ := testLog()
	o := f.opts()
	o.Interval = 20 * time.Millisecond
	k, err := New(t.Context(), base("true"), log, o)
	must(t, err)
	defer k.Close(t.Context())
	f.mu.Lock()
	f.fail["POST"] = []int{500, 503}
	f.mu.Unlock()
	k.Event(t.Context(), events.Warning, "LeaseConflict", "held by upload-1")
	k.Event(t.Context(), events.Warning, "LeaseConflict", "held by upload-1")
	must(t, peers.WaitFor(t.Context(), 10*time.Second, func() error {
		if n, _ := f.total("LeaseConflict"); n != 2 {
			return fmt.Errorf("count %d after 5xx", n)
		}
		return nil
	}))
	f.mu.Lock()
	clear(f.events) // the API expired it
	f.mu.Unlock()
	k.Event(t.Context(), events.Warning, "LeaseConflict", "held by upload-1")
	must(t, peers.WaitFor(t.Context(), 10*time.Second, func() error {
		if n, objs := f.total("LeaseConflict"); n != 3 || objs != 1 {
			return fmt.Errorf("count %d in %d objects after expiry", n, objs)
		}
		return nil
	}))
	if _, _, failures := k.Stats(); failures < 2 {
		t.Fatalf("failures %d, want the two 5xx counted", failures)
	}
}

// A Forbidden write is not retried (it would fail the same way every Interval).
func TestForbiddenWriteIsDropped(t *testing.T) {
	f := newFakeAPI(t)
	log, _ := testLog()
	o := f.opts()
	o.Interval = 10 * time.Millisecond
	k, err := New(t.Context(), base("true"), log, o)
	must(t, err)
	f.mu.Lock()
	f.fail["POST"] = []int{403}
	f.mu.Unlock()
	k.Event(t.Context(), events.Warning, "MassDeleteBlocked", "x")
	must(t, peers.WaitFor(t.Context(), 10*time.Second, func() error {
		if _, _, failures := k.Stats(); failures != 1 {
			return errors.New("no failure yet")
		}
		return nil
	}))
	must(t, k.Close(t.Context()))
	if n, _ := f.total("MassDeleteBlocked"); n != 0 {
		t.Fatalf("forbidden event retried: count %d", n)
	}
}

// Labels come from the downward API file and follow it when the kubelet
// rewrites it; an unreadable rewrite keeps the last labels.
func TestLabelsRefresh(t *testing.T) {
	f := newFakeAPI(t)
	log, buf := testLog()
	o := f.opts()
	o.LabelsRefresh = 20 * time.Millisecond
	k, err := New(t.Context(), base("auto"), log, o)
	must(t, err)
	defer k.Close(t.Context())
	if l := k.Labels(); l["app"] != "upload" || l["note"] != `a "quoted" value` {
		t.Fatalf("labels at start: %v", l)
	}
	file := filepath.Join(f.saDir, "labels")
	must(t, os.WriteFile(file+".new", []byte("app=\"upload\"\nversion=\"v2\"\n"), 0o600))
	must(t, os.Rename(file+".new", file))
	must(t, peers.WaitFor(t.Context(), 10*time.Second, func() error {
		if k.Labels()["version"] != "v2" {
			return fmt.Errorf("labels %v", k.Labels())
		}
		return nil
	}))
	must(t, os.WriteFile(file+".new", []byte("garbage without quotes\n"), 0o600))
	must(t, os.Rename(file+".new", file))
	must(t, peers.WaitFor(t.Context(), 10*time.Second, func() error {
		if !strings.Contains(buf.String(), "Pod labels file unreadable") {
			return errors.New("bad file not read yet")
		}
		return nil
	}))
	if k.Labels()["version"] != "v2" {
		t.Fatalf("labels lost on an unreadable file: %v", k.Labels())
	}
}

func TestParseLabels(t *testing.T) {
	l, err := parseLabels([]byte("a=\"1\"\nb.io/c=\"x=y\"\n\n"))
	if err != nil || len(l) != 2 || l["a"] != "1" || l["b.io/c"] != "x=y" {
		t.Fatalf("%v %v", l, err)
	}
	for _, bad := range []string{"a=1\n", "=\"x\"\n", "a\n", "a=\"unterminated\n"} {
		if _, err := parseLabels([]byte(bad)); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestLongMessageTruncated(t *testing.T) {
	f := newFakeAPI(t)
	log, _ := testLog()
	k, err := New(t.Context(), base("true"), log, f.opts())
	must(t, err)
	k.Event(t.Context(), events.Normal, "Restored", strings.Repeat("x", 5000))
	must(t, k.Close(t.Context()))
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, ev := range f.events {
		if len(ev.Message) > maxMessage {
			t.Fatalf("message of %d bytes sent", len(ev.Message))
		}
		return
	}
	t.Fatal("no event")
}

// An API that accepts the connection and never answers must not hold the
// agent's exit beyond CloseWithin's bound.
func TestCloseWithinHangingAPI(t *testing.T) {
	f := newFakeAPI(t)
	log, _ := testLog()
	k, err := New(t.Context(), base("true"), log, f.opts())
	must(t, err)
	f.mu.Lock()
	f.hang = make(chan struct{})
	f.mu.Unlock()
	defer close(f.hang)
	k.Event(t.Context(), events.Normal, "Restored", "x")
	must(t, peers.WaitFor(t.Context(), 10*time.Second, func() error {
		k.mu.Lock()
		defer k.mu.Unlock()
		if s := k.series[key{events.Normal, "Restored"}]; s == nil || s.pending != 0 {
			return errors.New("write not in flight yet")
		}
		return nil
	}))
	start := time.Now()
	k.CloseWithin(200 * time.Millisecond)
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("CloseWithin(200ms) took %s", d)
	}
}
