package injector

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"slices"
	"sync/atomic"
	"time"
)

// Secret keys: the CA bundle (newest CA first, the previous one while it is
// valid, so Pods served with a certificate of either are trusted during a CA
// rotation), the CA's key, and the serving certificate and key.
const (
	KeyCA     = "ca.crt"
	KeyCAKey  = "ca.key"
	KeyCert   = "tls.crt"
	KeyKey    = "tls.key"
	tlsSecret = "kubernetes.io/tls"
)

// CertManager keeps the webhook's serving certificate in a Secret of its own
// namespace and the caBundle of its MutatingWebhookConfiguration in step:
//   - at start and every CheckEvery: read the Secret; create it (CA + serving
//     certificate) when absent; renew the serving certificate RenewBefore its
//     expiry (or when its names changed), and the CA when it would expire
//     within two serving-certificate lifetimes;
//   - every write is conditional: create-if-absent (409: another replica
//     created it, read theirs) and updates on the resourceVersion read (409:
//     another replica rotated first, use theirs). So all replicas serve a
//     certificate from the one Secret;
//   - the caBundle is set to the Secret's ca.crt in every webhook of the
//     configuration (GET + PUT on its resourceVersion, retried on 409).
type CertManager struct {
	API        *API
	Namespace  string
	SecretName string
	Webhook    string   // MutatingWebhookConfiguration name ("" = leave caBundle alone)
	DNSNames   []string // the Service's names
	IPs        []net.IP // e.g. 127.0.0.1 for a webhook called by URL on loopback

	CAValidity, CertValidity, RenewBefore time.Duration
	Log                                   *slog.Logger
	Now                                   func() time.Time

	cur      atomic.Pointer[tls.Certificate]
	curPEM   atomic.Pointer[[]byte]
	bundleOK atomic.Bool
	// Rotations counts certificates this replica wrote (tests, metrics).
	Rotations atomic.Int64
}

func (m *CertManager) now() time.Time {
	if m.Now != nil {
		return m.Now()
	}
	return time.Now()
}

func (m *CertManager) defaults() {
	if m.CAValidity == 0 {
		m.CAValidity = 5 * 365 * 24 * time.Hour
	}
	if m.CertValidity == 0 {
		m.CertValidity = 90 * 24 * time.Hour
	}
	if m.RenewBefore == 0 {
		m.RenewBefore = m.CertValidity / 3
	}
}

// GetCertificate serves the current certificate (tls.Config.GetCertificate).
func (m *CertManager) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	c := m.cur.Load()
	if c == nil {
		return nil, errors.New("no serving certificate yet")
	}
	return c, nil
}

// Ready reports whether a certificate is loaded and the caBundle was set.
func (m *CertManager) Ready() bool {
	return m.cur.Load() != nil && (m.Webhook == "" || m.bundleOK.Load())
}

// Sync runs one round: Secret read/created/rotated, certificate loaded,
// caBundle patched.
func (m *CertManager) Sync(ctx context.Context) error {
	m.defaults()
	var sec *Secret
	for try := 0; ; try++ {
		if try == 5 {
			return errors.New("the Secret kept changing under us (5 conflicts)")
		}
		s, err := m.API.GetSecret(ctx, m.Namespace, m.SecretName)
		switch {
		case IsCode(err, http.StatusNotFound):
			data, err := m.generate(nil)
			if err != nil {
				return err
			}
			s = &Secret{APIVersion: "v1", Kind: "Secret", Type: tlsSecret, Data: data,
				Metadata: Meta{Name: m.SecretName, Namespace: m.Namespace, Labels: map[string]string{"app.kubernetes.io/name": "podkeeper-injector"}}}
			s, err = m.API.CreateSecret(ctx, s)
			if IsCode(err, http.StatusConflict) {
				m.Log.Info("TLS Secret created by another replica meanwhile; using theirs", "secret", m.SecretName)
				continue
			}
			if err != nil {
				return fmt.Errorf("create Secret %s/%s: %w", m.Namespace, m.SecretName, err)
			}
			m.Rotations.Add(1)
			m.Log.Info("created CA and serving certificate", "secret", m.SecretName)
		case err != nil:
			return fmt.Errorf("read Secret %s/%s: %w", m.Namespace, m.SecretName, err)
		default:
			if why := m.stale(s.Data); why != "" {
				data, err := m.generate(s.Data)
				if err != nil {
					return err
				}
				s.Data = data
				if s.Type == "" {
					s.Type = tlsSecret
				}
				s2, err := m.API.UpdateSecret(ctx, s)
				if IsCode(err, http.StatusConflict) {
					m.Log.Info("TLS Secret rotated by another replica meanwhile; using theirs", "secret", m.SecretName)
					continue
				}
				if err != nil {
					return fmt.Errorf("rotate Secret %s/%s: %w", m.Namespace, m.SecretName, err)
				}
				s = s2
				m.Rotations.Add(1)
				m.Log.Info("rotated the serving certificate", "secret", m.SecretName, "why", why)
			}
		}
		sec = s
		break
	}
	if err := m.load(sec.Data); err != nil {
		return err
	}
	if m.Webhook == "" {
		return nil
	}
	for try := 0; ; try++ {
		changed, err := m.API.SetCABundle(ctx, m.Webhook, sec.Data[KeyCA])
		if IsCode(err, http.StatusConflict) && try < 5 {
			continue
		}
		if err != nil {
			m.bundleOK.Store(false)
			return fmt.Errorf("caBundle of MutatingWebhookConfiguration %s: %w", m.Webhook, err)
		}
		if changed {
			m.Log.Info("caBundle set", "webhookconfiguration", m.Webhook)
		}
		m.bundleOK.Store(true)
		return nil
	}
}

// Run syncs every interval until ctx ends, logging failures (the current
// certificate keeps serving).
func (m *CertManager) Run(ctx context.Context, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if err := m.Sync(ctx); err != nil && ctx.Err() == nil {
				m.Log.Error("TLS sync failed; the current certificate keeps serving", "err", err)
			}
		}
	}
}

func (m *CertManager) load(data map[string][]byte) error {
	if p := m.curPEM.Load(); p != nil && bytes.Equal(*p, data[KeyCert]) {
		return nil
	}
	c, err := tls.X509KeyPair(data[KeyCert], data[KeyKey])
	if err != nil {
		return fmt.Errorf("Secret %s: %w", m.SecretName, err)
	}
	pemCopy := bytes.Clone(data[KeyCert])
	m.cur.Store(&c)
	m.curPEM.Store(&pemCopy)
	return nil
}

// stale says why the Secret's content must be renewed ("" = it is fine).
func (m *CertManager) stale(data map[string][]byte) string {
	now := m.now()
	cas, err := parseCerts(data[KeyCA])
	if err != nil || len(cas) == 0 {
		return "no valid ca.crt"
	}
	if _, err := parseKey(data[KeyCAKey]); err != nil {
		return "no valid ca.key"
	}
	if now.Add(2 * m.CertValidity).After(cas[0].NotAfter) {
		return "CA expires soon"
	}
	leafs, err := parseCerts(data[KeyCert])
	if err != nil || len(leafs) == 0 {
		return "no valid tls.crt"
	}
	if _, err := tls.X509KeyPair(data[KeyCert], data[KeyKey]); err != nil {
		return "tls.crt and tls.key do not match"
	}
	leaf := leafs[0]
	if now.Add(m.RenewBefore).After(leaf.NotAfter) {
		return "serving certificate expires soon"
	}
	if err := leaf.CheckSignatureFrom(cas[0]); err != nil {
		return "serving certificate not signed by the current CA"
	}
	for _, n := range m.DNSNames {
		if !slices.Contains(leaf.DNSNames, n) {
			return "serving certificate lacks " + n
		}
	}
	for _, ip := range m.IPs {
		if !slices.ContainsFunc(leaf.IPAddresses, ip.Equal) {
			return "serving certificate lacks " + ip.String()
		}
	}
	return ""
}

// generate returns new Secret data from old (nil: nothing yet): the CA kept
// when it is valid long enough, else a new one bundled with the old one while
// that is valid; always a new serving certificate.
func (m *CertManager) generate(old map[string][]byte) (map[string][]byte, error) {
	now := m.now()
	var ca *x509.Certificate
	var caKey *ecdsa.PrivateKey
	var bundle []byte
	if old != nil {
		cas, err1 := parseCerts(old[KeyCA])
		k, err2 := parseKey(old[KeyCAKey])
		if err1 == nil && err2 == nil && len(cas) > 0 && !now.Add(2*m.CertValidity).After(cas[0].NotAfter) &&
			k.PublicKey.Equal(cas[0].PublicKey) {
			ca, caKey, bundle = cas[0], k, old[KeyCA]
		}
	}
	if ca == nil {
		var err error
		caKey, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return nil, err
		}
		tmpl := &x509.Certificate{
			SerialNumber:          serial(),
			Subject:               pkix.Name{CommonName: "podkeeper-injector-ca " + now.UTC().Format("2006-01-02T15:04:05Z")},
			NotBefore:             now.Add(-time.Hour),
			NotAfter:              now.Add(m.CAValidity),
			IsCA:                  true,
			BasicConstraintsValid: true,
			MaxPathLenZero:        true,
			KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &caKey.PublicKey, caKey)
		if err != nil {
			return nil, err
		}
		ca, _ = x509.ParseCertificate(der)
		bundle = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
		// The previous CA stays trusted while it is valid: replicas still
		// serving its certificate keep working until they sync.
		if old != nil {
			if prev, err := parseCerts(old[KeyCA]); err == nil && len(prev) > 0 && now.Before(prev[0].NotAfter) {
				bundle = append(bundle, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: prev[0].Raw})...)
			}
		}
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	cn := "podkeeper-injector"
	if len(m.DNSNames) > 0 {
		cn = m.DNSNames[0]
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: cn},
		DNSNames:     m.DNSNames,
		IPAddresses:  m.IPs,
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(m.CertValidity),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		return nil, err
	}
	kd, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, err
	}
	cad, err := x509.MarshalECPrivateKey(caKey)
	if err != nil {
		return nil, err
	}
	return map[string][]byte{
		KeyCA:    bundle,
		KeyCAKey: pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: cad}),
		KeyCert:  pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		KeyKey:   pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kd}),
	}, nil
}

func serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	return n
}

func parseCerts(b []byte) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			break
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		return nil, errors.New("no certificate")
	}
	return out, nil
}

func parseKey(b []byte) (*ecdsa.PrivateKey, error) {
	blk, _ := pem.Decode(b)
	if blk == nil {
		return nil, errors.New("no PEM key")
	}
	return x509.ParseECPrivateKey(blk.Bytes)
}

// FileCerts serves a certificate from files another tool keeps current
// (cert-manager's Secret mounted as a volume): reloaded when they change.
type FileCerts struct {
	CertFile, KeyFile string
	cur               atomic.Pointer[tls.Certificate]
}

// Load reads the files (again).
func (f *FileCerts) Load() error {
	c, err := tls.LoadX509KeyPair(f.CertFile, f.KeyFile)
	if err != nil {
		return err
	}
	f.cur.Store(&c)
	return nil
}

func (f *FileCerts) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	c := f.cur.Load()
	if c == nil {
		return nil, errors.New("no serving certificate yet")
	}
	return c, nil
}
