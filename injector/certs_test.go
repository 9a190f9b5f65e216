package injector

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync"
	"testing"
	"time"

	"k8s.io/client-go/rest"
)

// fakeAPI keeps one Secret namespace and MutatingWebhookConfigurations with
// the API server's conditional-write rules: POST of an existing name is 409, a
// PUT whose resourceVersion is not the current one is 409.
type fakeAPI struct {
	mu      sync.Mutex
	rv      int
	objects map[string]obj // path -> object
	writes  map[string]int
}

func newFakeAPI() *fakeAPI {
	f := &fakeAPI{objects: map[string]obj{}, writes: map[string]int{}}
	f.objects[mwcPath+"podkeeper-injector"] = obj{"metadata": obj{"name": "podkeeper-injector", "resourceVersion": "1"},
		"webhooks": []any{obj{"name": "pods.podkeeper.io", "clientConfig": obj{"url": "https://127.0.0.1:1/mutate"}},
			obj{"name": "namespaces.podkeeper.io", "clientConfig": obj{"url": "https://127.0.0.1:1/mutate/namespace"}}}}
	f.rv = 1
	return f
}

func (f *fakeAPI) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var in obj
	if b, _ := io.ReadAll(r.Body); len(b) > 0 {
		json.Unmarshal(b, &in)
	}
	path := r.URL.Path
	switch r.Method {
	case "GET":
		o, ok := f.objects[path]
		if !ok {
			http.Error(w, "not found", 404)
			return
		}
		json.NewEncoder(w).Encode(o)
	case "POST":
		path += "/" + in["metadata"].(obj)["name"].(string)
		if _, ok := f.objects[path]; ok {
			http.Error(w, "already exists", 409)
			return
		}
		f.store(w, path, in)
	case "PUT":
		cur, ok := f.objects[path]
		if !ok {
			http.Error(w, "not found", 404)
			return
		}
		if dig(in, "metadata", "resourceVersion") != dig(cur, "metadata", "resourceVersion") {
			http.Error(w, "conflict", 409)
			return
		}
		f.store(w, path, in)
	}
}

func (f *fakeAPI) store(w http.ResponseWriter, path string, o obj) {
	f.rv++
	o["metadata"].(obj)["resourceVersion"] = strconv.Itoa(f.rv)
	f.objects[path] = o
	f.writes[path]++
	json.NewEncoder(w).Encode(o)
}

func (f *fakeAPI) get(path string) obj {
	f.mu.Lock()
	defer f.mu.Unlock()
	return deepCopy(f.objects[path]).(obj)
}

type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func managers(t *testing.T, f *fakeAPI, c *clock, n int) []*CertManager {
	srv := httptest.NewServer(f)
	t.Cleanup(srv.Close)
	api, err := NewAPI(&rest.Config{Host: srv.URL})
	if err != nil {
		t.Fatal(err)
	}
	var ms []*CertManager
	for i := 0; i < n; i++ {
		ms = append(ms, &CertManager{API: api, Namespace: "podkeeper-injector", SecretName: "podkeeper-injector-tls",
			Webhook: "podkeeper-injector", DNSNames: []string{"podkeeper-injector.podkeeper-injector.svc"},
			IPs: []net.IP{net.ParseIP("127.0.0.1")}, Log: slog.New(slog.DiscardHandler), Now: c.now})
	}
	return ms
}

// syncAll runs every replica's Sync at once and returns how many wrote.
func syncAll(t *testing.T, ms []*CertManager) int64 {
	before := int64(0)
	for _, m := range ms {
		before += m.Rotations.Load()
	}
	var wg sync.WaitGroup
	for _, m := range ms {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := m.Sync(context.Background()); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	after := int64(0)
	for _, m := range ms {
		after += m.Rotations.Load()
	}
	return after - before
}

const secretAt = "/api/v1/namespaces/podkeeper-injector/secrets/podkeeper-injector-tls"

// servedBy checks that every replica serves a certificate the webhook
// configuration's caBundle verifies, for the Service name.
func servedBy(t *testing.T, f *fakeAPI, ms []*CertManager) {
	t.Helper()
	pool := x509.NewCertPool()
	for _, h := range f.get(mwcPath + "podkeeper-injector")["webhooks"].([]any) {
		b64 := dig(h, "clientConfig", "caBundle").(string)
		var pemb []byte
		json.Unmarshal([]byte(strconv.Quote(b64)), &pemb)
		if !pool.AppendCertsFromPEM(pemb) {
			t.Fatalf("caBundle of %v is not PEM", dig(h, "name"))
		}
	}
	for i, m := range ms {
		if !m.Ready() {
			t.Fatalf("replica %d not ready", i)
		}
		c, _ := m.GetCertificate(nil)
		leaf, _ := x509.ParseCertificate(c.Certificate[0])
		if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, DNSName: "podkeeper-injector.podkeeper-injector.svc", CurrentTime: ms[0].now()}); err != nil {
			t.Errorf("replica %d: %v", i, err)
		}
	}
}

func TestCertsReplicasAgree(t *testing.T) {
	f := newFakeAPI()
	c := &clock{t: time.Now()}
	ms := managers(t, f, c, 3)
	if n := syncAll(t, ms); n != 1 {
		t.Fatalf("3 replicas starting together: %d wrote the Secret, want 1", n)
	}
	servedBy(t, f, ms)
	first := string(f.get(secretAt)["data"].(obj)[KeyCert].(string))
	// Nothing to do a day later.
	c.add(24 * time.Hour)
	if n := syncAll(t, ms); n != 0 {
		t.Fatalf("a day later: %d writes", n)
	}
	// 61 days later (90 d certificates, renewed 30 d before expiry): one rotation, same CA.
	ca := f.get(secretAt)["data"].(obj)[KeyCA]
	c.add(60 * 24 * time.Hour)
	if n := syncAll(t, ms); n != 1 {
		t.Fatalf("renewal: %d replicas rotated, want 1", n)
	}
	d := f.get(secretAt)["data"].(obj)
	if d[KeyCert] == first || d[KeyCA] != ca {
		t.Fatal("serving certificate not renewed, or the CA changed")
	}
	servedBy(t, f, ms)
	if w := f.writes[mwcPath+"podkeeper-injector"]; w != 1 {
		t.Fatalf("caBundle written %d times, want 1 (unchanged CA)", w)
	}
}

func TestCertsCARotation(t *testing.T) {
	f := newFakeAPI()
	c := &clock{t: time.Now()}
	ms := managers(t, f, c, 2)
	ms[0].CAValidity, ms[1].CAValidity = 365*24*time.Hour, 365*24*time.Hour
	syncAll(t, ms)
	oldCA := f.get(secretAt)["data"].(obj)[KeyCA].(string)
	// 200 days in: the CA has less than two certificate lifetimes left.
	c.add(200 * 24 * time.Hour)
	// Replica 1 still serves the old certificate: still trusted by the new bundle.
	stale, _ := ms[1].GetCertificate(nil)
	if n := syncAll(t, ms[:1]); n != 1 {
		t.Fatalf("CA rotation: %d writes", n)
	}
	var bundle []byte
	json.Unmarshal([]byte(strconv.Quote(f.get(secretAt)["data"].(obj)[KeyCA].(string))), &bundle)
	cas, _ := parseCerts(bundle)
	if len(cas) != 2 || f.get(secretAt)["data"].(obj)[KeyCA] == oldCA {
		t.Fatalf("bundle after CA rotation holds %d CAs, want new + old", len(cas))
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(bundle)
	leaf, _ := x509.ParseCertificate(stale.Certificate[0])
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, CurrentTime: c.now().Add(-150 * 24 * time.Hour)}); err != nil {
		t.Fatalf("old serving certificate not trusted by the new bundle: %v", err)
	}
	syncAll(t, ms)
	servedBy(t, f, ms)
}

// A real TLS handshake: the served certificate is what a client trusting the
// caBundle accepts for 127.0.0.1.
func TestCertsServeTLS(t *testing.T) {
	f := newFakeAPI()
	ms := managers(t, f, &clock{t: time.Now()}, 1)
	syncAll(t, ms)
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{GetCertificate: ms[0].GetCertificate})
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") })}
	go srv.Serve(ln)
	defer srv.Close()
	var bundle []byte
	json.Unmarshal([]byte(strconv.Quote(f.get(secretAt)["data"].(obj)[KeyCA].(string))), &bundle)
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(bundle)
	c := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	resp, err := c.Get("https://" + ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
}
