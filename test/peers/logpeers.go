package peers

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"
)

// LogReceiver is a running Fluent forward receiver that writes what it accepts
// to a file the test reads back.
type LogReceiver struct {
	*Process
	Kind string // "otelfwd" or "fluentserver"
	Addr string // 127.0.0.1:PORT
	Port int
	Out  string // the receiver's output file
}

// LogRecord is one record as a receiver stored it.
type LogRecord struct {
	Tag   string
	Time  time.Time
	Log   string         // the record's "log" field (the OTel body)
	Attrs map[string]any // every other field
}

// StartOtelFwd starts the OpenTelemetry Collector with the contrib
// fluent_forward receiver and the file exporter, without a batch processor so
// it acks a chunk only after the exporter accepted it.
func StartOtelFwd(t testing.TB) *LogReceiver {
	t.Helper()
	bin := Bin(t, "otelfwd")
	dir := t.TempDir()
	port := FreePort(t)
	r := &LogReceiver{Kind: "otelfwd", Port: port, Addr: "127.0.0.1:" + strconv.Itoa(port), Out: filepath.Join(dir, "logs.jsonl")}
	cfg := fmt.Sprintf(`receivers:
  fluent_forward:
    endpoint: %s
exporters:
  file:
    path: %s
    append: true
    flush_interval: 50ms
service:
  telemetry:
    logs:
      level: warn
    metrics:
      level: none
  pipelines:
    logs:
      receivers: [fluent_forward]
      exporters: [file]
`, r.Addr, r.Out)
	cfgPath := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	r.Process = &Process{Name: "otelfwd", Dir: dir, Log: filepath.Join(dir, "otelfwd.log"), t: t,
		Args: []string{bin, "--config", cfgPath}}
	r.startAndWait(t)
	t.Cleanup(r.Stop)
	return r
}

// StartFluentServer starts the npm @fluent-org/logger FluentServer (acks on
// arrival). With certPEM/keyPEM files it listens with TLS.
func StartFluentServer(t testing.TB, certFile, keyFile string) *LogReceiver {
	t.Helper()
	node, err := exec.LookPath("node")
	if err != nil {
		missing(t, "node is not installed: FluentServer (the TLS forward receiver) needs Node.js; install it (e.g. apt-get install nodejs npm) and run `make peers`")
	}
	dir := os.Getenv("PEERS_DIR")
	if dir == "" {
		dir = filepath.Join(Root(), ".cache", "peers")
	}
	script := filepath.Join(dir, "fluentserver", "server.js")
	if _, err := os.Stat(filepath.Join(dir, "fluentserver", "node_modules", "@fluent-org", "logger")); err != nil {
		missing(t, "FluentServer is not installed under %s: run `make peers` (test/peers/install.sh fluentserver)", filepath.Dir(script))
	}
	tmp := t.TempDir()
	port := FreePort(t)
	r := &LogReceiver{Kind: "fluentserver", Port: port, Addr: "127.0.0.1:" + strconv.Itoa(port), Out: filepath.Join(tmp, "out.jsonl")}
	r.Process = &Process{Name: "fluentserver", Dir: tmp, Log: filepath.Join(tmp, "fluentserver.log"), t: t,
		Args: []string{node, script, strconv.Itoa(port), r.Out}}
	if certFile != "" {
		r.Env = []string{"TLS_CERT=" + certFile, "TLS_KEY=" + keyFile}
	}
	r.startAndWait(t)
	t.Cleanup(r.Stop)
	return r
}

func (r *LogReceiver) startAndWait(t testing.TB) {
	t.Helper()
	if err := r.Start(); err != nil {
		t.Fatal(err)
	}
	err := WaitFor(context.Background(), 60*time.Second, func() error {
		if r.Exited() {
			return errors.New(r.Name + " exited during start")
		}
		c, err := net.DialTimeout("tcp", r.Addr, time.Second)
		if err == nil {
			c.Close()
		}
		return err
	})
	if err != nil {
		t.Fatalf("%s: %v\n--- log ---\n%s", r.Kind, err, r.Tail())
	}
}

// Restart starts a stopped receiver again on the same port, appending to the
// same output file.
func (r *LogReceiver) Restart(t testing.TB) {
	t.Helper()
	r.startAndWait(t)
}

// Terminate stops the receiver with SIGTERM and waits: an outage in which the
// receiver keeps what it acked. (SIGKILL of the collector can lose records it
// already acked from its file exporter's write buffer: the receiver's loss, not
// the sender's, so outage tests that count lines use this.)
func (r *LogReceiver) Terminate() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cmd == nil {
		return
	}
	_ = syscall.Kill(-r.cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-r.ch:
	case <-time.After(15 * time.Second):
		_ = syscall.Kill(-r.cmd.Process.Pid, syscall.SIGKILL)
		<-r.ch
	}
	r.cmd = nil
}

// Records reads every complete record the receiver has written so far.
func (r *LogReceiver) Records() ([]LogRecord, error) {
	b, err := os.ReadFile(r.Out)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	if i := bytes.LastIndexByte(b, '\n'); i >= 0 {
		b = b[:i+1] // the exporter may be half-way through a line
	} else {
		return nil, nil
	}
	var out []LogRecord
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 1<<20), 256<<20)
	for sc.Scan() {
		line := sc.Bytes()
		if len(bytes.TrimSpace(line)) == 0 {
			continue
		}
		var recs []LogRecord
		if r.Kind == "otelfwd" {
			recs, err = parseOTLP(line)
		} else {
			recs, err = parseFluentServer(line)
		}
		if err != nil {
			return nil, fmt.Errorf("%s output: %w", r.Kind, err)
		}
		out = append(out, recs...)
	}
	return out, sc.Err()
}

type otlpValue struct {
	StringValue *string  `json:"stringValue"`
	IntValue    *string  `json:"intValue"`
	BoolValue   *bool    `json:"boolValue"`
	DoubleValue *float64 `json:"doubleValue"`
	KvlistValue *struct {
		Values []otlpKV `json:"values"`
	} `json:"kvlistValue"`
	ArrayValue *struct {
		Values []otlpValue `json:"values"`
	} `json:"arrayValue"`
}

type otlpKV struct {
	Key   string    `json:"key"`
	Value otlpValue `json:"value"`
}

func (v otlpValue) Go() any {
	switch {
	case v.StringValue != nil:
		return *v.StringValue
	case v.IntValue != nil:
		n, _ := strconv.ParseInt(*v.IntValue, 10, 64)
		return n
	case v.BoolValue != nil:
		return *v.BoolValue
	case v.DoubleValue != nil:
		return *v.DoubleValue
	case v.KvlistValue != nil:
		m := map[string]any{}
		for _, kv := range v.KvlistValue.Values {
			m[kv.Key] = kv.Value.Go()
		}
		return m
	case v.ArrayValue != nil:
		var a []any
		for _, e := range v.ArrayValue.Values {
			a = append(a, e.Go())
		}
		return a
	}
	return nil
}

func parseOTLP(line []byte) ([]LogRecord, error) {
	var doc struct {
		ResourceLogs []struct {
			ScopeLogs []struct {
				LogRecords []struct {
					TimeUnixNano string    `json:"timeUnixNano"`
					Body         otlpValue `json:"body"`
					Attributes   []otlpKV  `json:"attributes"`
				} `json:"logRecords"`
			} `json:"scopeLogs"`
		} `json:"resourceLogs"`
	}
	if err := json.Unmarshal(line, &doc); err != nil {
		return nil, err
	}
	var out []LogRecord
	for _, rl := range doc.ResourceLogs {
		for _, sl := range rl.ScopeLogs {
			for _, lr := range sl.LogRecords {
				ns, _ := strconv.ParseInt(lr.TimeUnixNano, 10, 64)
				rec := LogRecord{Time: time.Unix(0, ns), Attrs: map[string]any{}}
				if s, ok := lr.Body.Go().(string); ok {
					rec.Log = s
				}
				for _, kv := range lr.Attributes {
					if kv.Key == "fluent.tag" {
						rec.Tag, _ = kv.Value.Go().(string)
						continue
					}
					rec.Attrs[kv.Key] = kv.Value.Go()
				}
				out = append(out, rec)
			}
		}
	}
	return out, nil
}

func parseFluentServer(line []byte) ([]LogRecord, error) {
	var doc struct {
		Tag    string         `json:"tag"`
		Time   float64        `json:"time"`
		Record map[string]any `json:"record"`
	}
	if err := json.Unmarshal(line, &doc); err != nil {
		return nil, err
	}
	rec := LogRecord{Tag: doc.Tag, Time: time.Unix(0, int64(doc.Time*1e9)), Attrs: doc.Record}
	if s, ok := doc.Record["log"].(string); ok {
		rec.Log = s
		delete(doc.Record, "log")
	}
	return []LogRecord{rec}, nil
}

// TestCA writes a fresh CA and a server certificate for 127.0.0.1/localhost
// into dir and returns the file paths.
func TestCA(t testing.TB, dir string) (caFile, certFile, keyFile string) {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	ca := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "podkeeper test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign}
	caDER, err := x509.CreateCertificate(rand.Reader, ca, ca, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	srvKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	srv := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "127.0.0.1"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		DNSNames: []string{"localhost"}, IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	srvDER, err := x509.CreateCertificate(rand.Reader, srv, caCert, &srvKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, _ := x509.MarshalPKCS8PrivateKey(srvKey)
	write := func(name, typ string, der []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	return write("ca.pem", "CERTIFICATE", caDER), write("server.pem", "CERTIFICATE", srvDER), write("server-key.pem", "PRIVATE KEY", keyDER)
}
