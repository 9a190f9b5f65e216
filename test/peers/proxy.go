package peers

import (
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"testing"
)

// CountingProxy sits between an agent and a peer on loopback and counts the
// requests by method and kind, so tests can assert "a rerun fetched nothing"
// or "a restart uploaded nothing" on the real server's traffic.
type CountingProxy struct {
	URL string

	mu     sync.Mutex
	counts map[string]int
	paths  map[string]int // Classify(r) + " " + the path after the bucket
	// Fail, when set, answers matching requests itself (fault injection).
	fail func(r *http.Request) (status int, ok bool)
}

// NewCountingProxy proxies to target (e.g. S3Server.Endpoint) until the test ends.
func NewCountingProxy(t testing.TB, target string) *CountingProxy {
	t.Helper()
	u, err := url.Parse(target)
	if err != nil {
		t.Fatal(err)
	}
	p := &CountingProxy{counts: map[string]int{}, paths: map[string]int{}}
	rp := httputil.NewSingleHostReverseProxy(u)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p.mu.Lock()
		p.counts[Classify(r)]++
		if _, rest, ok := strings.Cut(strings.TrimPrefix(r.URL.Path, "/"), "/"); ok {
			p.paths[Classify(r)+" "+rest]++
		}
		fail := p.fail
		p.mu.Unlock()
		if fail != nil {
			if status, ok := fail(r); ok {
				http.Error(w, "injected fault", status)
				return
			}
		}
		rp.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	p.URL = srv.URL
	return p
}

// Classify names an S3 request: "PUT" (object), "PUT-part", "GET", "GET-range",
// "HEAD", "LIST", "DELETE", "POST" (multipart create/complete, batch delete).
func Classify(r *http.Request) string {
	q := r.URL.Query()
	switch {
	case r.Method == http.MethodGet && (q.Has("list-type") || q.Has("uploads") && !strings.Contains(strings.Trim(r.URL.Path, "/"), "/")):
		return "LIST"
	case r.Method == http.MethodGet && q.Has("uploadId"):
		return "LIST-parts"
	case r.Method == http.MethodGet && r.Header.Get("Range") != "":
		return "GET-range"
	case r.Method == http.MethodPut && q.Has("partNumber"):
		return "PUT-part"
	}
	return r.Method
}

// Count returns how many requests of kind passed (see Classify).
func (p *CountingProxy) Count(kind string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.counts[kind]
}

// CountUnder returns how many requests of kind passed for keys (bucket
// excluded) that start with prefix.
func (p *CountingProxy) CountUnder(kind, prefix string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for k, v := range p.paths {
		if strings.HasPrefix(k, kind+" "+prefix) {
			n += v
		}
	}
	return n
}

// Counts returns a copy of all counters.
func (p *CountingProxy) Counts() map[string]int {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make(map[string]int, len(p.counts))
	for k, v := range p.counts {
		out[k] = v
	}
	return out
}

// Reset zeroes the counters.
func (p *CountingProxy) Reset() {
	p.mu.Lock()
	p.counts, p.paths = map[string]int{}, map[string]int{}
	p.mu.Unlock()
}

// FailWith makes the proxy answer requests for which match returns true with
// status (e.g. 503) instead of forwarding them; nil restores forwarding.
func (p *CountingProxy) FailWith(status int, match func(*http.Request) bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if match == nil {
		p.fail = nil
		return
	}
	p.fail = func(r *http.Request) (int, bool) { return status, match(r) }
}
