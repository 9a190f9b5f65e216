package injector

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"

	"k8s.io/client-go/rest"
)

// API is the injector's whole use of the Kubernetes API: its own Secret, its
// own MutatingWebhookConfiguration and the server's version. Plain JSON over
// client-go's rest transport (auth, TLS); no clientset.
type API struct {
	host string
	hc   *http.Client
}

// NewAPI connects with cfg (rest.InClusterConfig in a cluster).
func NewAPI(cfg *rest.Config) (*API, error) {
	hc, err := rest.HTTPClientFor(cfg)
	if err != nil {
		return nil, err
	}
	return &API{host: strings.TrimSuffix(cfg.Host, "/"), hc: hc}, nil
}

// StatusError is a non-2xx answer of the API.
type StatusError struct {
	Code int
	Body string
}

func (e *StatusError) Error() string { return fmt.Sprintf("API answered %d: %s", e.Code, e.Body) }

// IsCode reports whether err is an API answer with this status code.
func IsCode(err error, code int) bool {
	se, ok := err.(*StatusError)
	return ok && se.Code == code
}

func (a *API) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, a.host+path, body)
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json")
	resp, err := a.hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if resp.StatusCode/100 != 2 {
		return &StatusError{Code: resp.StatusCode, Body: strings.TrimSpace(string(b))}
	}
	if out != nil {
		return json.Unmarshal(b, out)
	}
	return nil
}

// Secret is the part of a core/v1 Secret the injector uses.
type Secret struct {
	APIVersion string            `json:"apiVersion"`
	Kind       string            `json:"kind"`
	Metadata   Meta              `json:"metadata"`
	Type       string            `json:"type,omitempty"`
	Data       map[string][]byte `json:"data,omitempty"`
}

type Meta struct {
	Name            string            `json:"name"`
	Namespace       string            `json:"namespace,omitempty"`
	ResourceVersion string            `json:"resourceVersion,omitempty"`
	Labels          map[string]string `json:"labels,omitempty"`
}

func secretPath(ns, name string) string {
	return "/api/v1/namespaces/" + ns + "/secrets/" + name
}

func (a *API) GetSecret(ctx context.Context, ns, name string) (*Secret, error) {
	var s Secret
	return &s, a.do(ctx, "GET", secretPath(ns, name), nil, &s)
}

// CreateSecret fails with 409 when another replica created it first.
func (a *API) CreateSecret(ctx context.Context, s *Secret) (*Secret, error) {
	var out Secret
	return &out, a.do(ctx, "POST", "/api/v1/namespaces/"+s.Metadata.Namespace+"/secrets", s, &out)
}

// UpdateSecret fails with 409 when the Secret changed since s was read
// (s.Metadata.ResourceVersion).
func (a *API) UpdateSecret(ctx context.Context, s *Secret) (*Secret, error) {
	var out Secret
	return &out, a.do(ctx, "PUT", secretPath(s.Metadata.Namespace, s.Metadata.Name), s, &out)
}

const mwcPath = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/"

// SetCABundle sets caBundle in every webhook of the named configuration, with
// an update conditional on the resourceVersion read (409 when another replica
// wrote in between: the caller retries). It reports whether it changed anything.
func (a *API) SetCABundle(ctx context.Context, name string, bundle []byte) (bool, error) {
	var mwc obj
	if err := a.do(ctx, "GET", mwcPath+name, nil, &mwc); err != nil {
		return false, err
	}
	hooks, _ := mwc["webhooks"].([]any)
	if len(hooks) == 0 {
		return false, fmt.Errorf("MutatingWebhookConfiguration %s has no webhooks", name)
	}
	changed := false
	for _, h := range hooks {
		cc, _ := dig(h, "clientConfig").(obj)
		if cc == nil {
			cc = obj{}
			h.(obj)["clientConfig"] = cc
		}
		want := bundle // []byte marshals as base64, as the API wants
		got, _ := cc["caBundle"].(string)
		if wb, _ := json.Marshal(want); string(wb) != strconv.Quote(got) {
			cc["caBundle"] = want
			changed = true
		}
	}
	if !changed {
		return false, nil
	}
	return true, a.do(ctx, "PUT", mwcPath+name, mwc, nil)
}

// NativeSidecars asks the API server's version: native sidecars (init
// containers with restartPolicy: Always) are on by default from 1.29.
func (a *API) NativeSidecars(ctx context.Context) (bool, string, error) {
	var v struct{ Major, Minor, GitVersion string }
	if err := a.do(ctx, "GET", "/version", nil, &v); err != nil {
		return false, "", err
	}
	return nativeFor(v.Major, v.Minor), v.GitVersion, nil
}

func nativeFor(major, minor string) bool {
	digits := func(s string) int {
		n := 0
		for _, c := range s {
			if c < '0' || c > '9' {
				break
			}
			n = n*10 + int(c-'0')
		}
		return n
	}
	ma, mi := digits(major), digits(minor)
	return ma > 1 || (ma == 1 && mi >= 29)
}
