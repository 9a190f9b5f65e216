// Package peers starts the real servers the tests run against — versitygw and
// MinIO for S3, an OpenTelemetry Collector fluent_forward receiver and the npm
// FluentServer for logs — each on a random free 127.0.0.1 port in a temp dir,
// stopped by PID when the test ends. test/peers/install.sh (make peers) builds
// them into .cache/peers; a peer that is missing fails the test with the command
// that installs it, never a silent skip.
package peers

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/podkeeper/podkeeper/agents/config"
)

// Credentials every S3 peer is started with. The agents read credentials from the
// SDK's default chain, so the helper exports them into the test process.
const (
	AccessKey = "podkeeper"
	SecretKey = "podkeeper-secret-key"
	Bucket    = "podkeeper-test"
)

var envOnce sync.Once

func exportCredentials() {
	envOnce.Do(func() {
		os.Setenv("AWS_ACCESS_KEY_ID", AccessKey)
		os.Setenv("AWS_SECRET_ACCESS_KEY", SecretKey)
		os.Setenv("AWS_EC2_METADATA_DISABLED", "true")
		os.Unsetenv("AWS_PROFILE")
		os.Unsetenv("AWS_SESSION_TOKEN")
	})
}

// Root is the project root (the directory holding go.mod).
func Root() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}

// missing fails the test with the install command, or skips it under -short
// (`make unit`, the inner loop that runs without peers); `make test` installs
// them first, so there a missing peer is a failure, never a silent skip.
func missing(t testing.TB, format string, args ...any) {
	t.Helper()
	if testing.Short() {
		t.Skipf("-short: "+format, args...)
	}
	t.Fatalf(format, args...)
}

// Bin returns the path of an installed peer binary, failing the test with the
// install command when it is missing.
func Bin(t testing.TB, name string) string {
	t.Helper()
	dir := os.Getenv("PEERS_DIR")
	if dir == "" {
		dir = filepath.Join(Root(), ".cache", "peers")
	}
	p := filepath.Join(dir, "bin", name)
	if _, err := os.Stat(p); err != nil {
		missing(t, "peer %s is not installed at %s: run `make peers` (test/peers/install.sh %s) first", name, p, name)
	}
	return p
}

// FreePort returns a port that was free on 127.0.0.1 a moment ago.
func FreePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("free port: %v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// Process is a peer running as a child process.
type Process struct {
	Name string
	Args []string
	Env  []string
	Dir  string
	Log  string // combined stdout/stderr

	t   testing.TB
	mu  sync.Mutex
	cmd *exec.Cmd
	ch  chan struct{}
}

// Pid is the running process's id (0 before Start).
func (p *Process) Pid() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil || p.cmd.Process == nil {
		return 0
	}
	return p.cmd.Process.Pid
}

// Start launches the process; it is killed when the test ends.
func (p *Process) Start() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	logf, err := os.OpenFile(p.Log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	cmd := exec.Command(p.Args[0], p.Args[1:]...)
	cmd.Env = append(os.Environ(), p.Env...)
	cmd.Dir = p.Dir
	cmd.Stdout, cmd.Stderr = logf, logf
	// Own process group, and killed with the test binary if it dies first.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("start %s: %w", p.Name, err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); logf.Close(); close(done) }()
	p.cmd, p.ch = cmd, done
	return nil
}

// Stop kills the process (SIGKILL: an outage, not a clean shutdown) and waits.
func (p *Process) Stop() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil {
		return
	}
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
	<-p.ch
	p.cmd = nil
}

// Exited reports whether the process has ended on its own.
func (p *Process) Exited() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil {
		return true
	}
	select {
	case <-p.ch:
		return true
	default:
		return false
	}
}

// Tail returns the end of the process's log for failure messages.
func (p *Process) Tail() string {
	b, _ := os.ReadFile(p.Log)
	if len(b) > 4000 {
		b = b[len(b)-4000:]
	}
	return string(b)
}

// errPermanent marks a condition error that waiting will not fix.
var errPermanent = errors.New("permanent")

// WaitFor polls cond until it returns nil or the deadline passes (or cond
// returns an error wrapping errPermanent).
func WaitFor(ctx context.Context, timeout time.Duration, cond func() error) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		err := cond()
		if err == nil || errors.Is(err, errPermanent) {
			return err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("after %s: %w", timeout, err)
		case <-tick.C:
		}
	}
}

// S3Server is a running S3-compatible peer.
type S3Server struct {
	*Process
	Kind     string // "versitygw" or "minio"
	Endpoint string
	Port     int
	DataDir  string
	ready    func() error
	certs    *CertFiles
}

// StartS3 starts the named S3 peer ("versitygw" or "minio") with an empty bucket.
func StartS3(t testing.TB, kind string) *S3Server {
	t.Helper()
	return startS3(t, kind, nil)
}

// StartS3TLS starts versitygw over HTTPS with a certificate from a throwaway CA;
// the CA file is in CA (for S3_CA_FILE).
func StartS3TLS(t testing.TB) (*S3Server, CertFiles) {
	t.Helper()
	certs := NewCerts(t)
	return startS3(t, "versitygw", &certs), certs
}

func startS3(t testing.TB, kind string, certs *CertFiles) *S3Server {
	exportCredentials()
	bin := Bin(t, kind)
	dir := t.TempDir()
	data := filepath.Join(dir, "data")
	if err := os.MkdirAll(data, 0o755); err != nil {
		t.Fatal(err)
	}
	port := FreePort(t)
	addr := "127.0.0.1:" + strconv.Itoa(port)
	scheme := "http://"
	if certs != nil {
		scheme = "https://"
	}
	s := &S3Server{Kind: kind, Endpoint: scheme + addr, Port: port, DataDir: data, certs: certs}
	s.Process = &Process{Name: kind, Dir: dir, Log: filepath.Join(dir, kind+".log"), t: t}
	switch kind {
	case "versitygw":
		// --keep-alive: without it versitygw closes the connection after every
		// response, so every request of every client pays a TCP connect and the
		// server's request path, not the client, sets every small-object number.
		s.Args = []string{bin, "--port", addr, "--access", AccessKey, "--secret", SecretKey, "--quiet", "--keep-alive"}
		if certs != nil {
			s.Args = append(s.Args, "--cert", certs.Cert, "--key", certs.Key)
		}
		s.Args = append(s.Args, "posix", data)
		s.ready = func() error {
			c, err := net.DialTimeout("tcp", addr, time.Second)
			if err == nil {
				c.Close()
			}
			return err
		}
	case "minio":
		console := FreePort(t)
		s.Args = []string{bin, "server", "--quiet", "--address", addr, "--console-address", "127.0.0.1:" + strconv.Itoa(console), data}
		s.Env = []string{"MINIO_ROOT_USER=" + AccessKey, "MINIO_ROOT_PASSWORD=" + SecretKey, "MINIO_BROWSER=off", "MINIO_UPDATE=off", "HOME=" + dir}
		s.ready = func() error {
			resp, err := http.Get(s.Endpoint + "/minio/health/ready")
			if err != nil {
				return err
			}
			resp.Body.Close()
			if resp.StatusCode != 200 {
				return fmt.Errorf("minio not ready: %s", resp.Status)
			}
			return nil
		}
	default:
		t.Fatalf("unknown S3 peer %q", kind)
	}
	if err := s.startAndWait(); err != nil {
		t.Fatalf("%v\n--- %s log ---\n%s", err, kind, s.Tail())
	}
	t.Cleanup(s.Stop)
	// MinIO answers its health check before it has finished initialising and
	// refuses requests with 503 XMinioServerNotInitialized for a moment.
	err := WaitFor(context.Background(), 30*time.Second, func() error {
		_, err := s.Client().CreateBucket(context.Background(), &s3.CreateBucketInput{Bucket: aws.String(Bucket)})
		var re *awshttp.ResponseError
		if err != nil && !(errors.As(err, &re) && re.HTTPStatusCode() == http.StatusServiceUnavailable) {
			return fmt.Errorf("%w: %v", errPermanent, err)
		}
		return err
	})
	if err != nil {
		t.Fatalf("create bucket on %s: %v", kind, err)
	}
	return s
}

func (s *S3Server) startAndWait() error {
	if err := s.Start(); err != nil {
		return err
	}
	return WaitFor(context.Background(), 30*time.Second, func() error {
		if s.Exited() {
			return errors.New(s.Name + " exited during start")
		}
		return s.ready()
	})
}

// Restart starts a stopped server again on the same port and data directory
// (the end of a simulated outage).
func (s *S3Server) Restart(t testing.TB) {
	t.Helper()
	if err := s.startAndWait(); err != nil {
		t.Fatalf("restart %s: %v\n%s", s.Kind, err, s.Tail())
	}
}

// Client returns a raw SDK client for assertions (not the code under test).
func (s *S3Server) Client() *s3.Client {
	o := s3.Options{
		Region:                     "us-east-1",
		BaseEndpoint:               aws.String(s.Endpoint),
		UsePathStyle:               true,
		Credentials:                credentials.NewStaticCredentialsProvider(AccessKey, SecretKey, ""),
		RequestChecksumCalculation: aws.RequestChecksumCalculationWhenRequired,
		ResponseChecksumValidation: aws.ResponseChecksumValidationWhenRequired,
	}
	if s.certs != nil {
		pem, _ := os.ReadFile(s.certs.CA)
		pool := x509.NewCertPool()
		pool.AppendCertsFromPEM(pem)
		o.HTTPClient = &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	}
	return s3.New(o)
}

// StoreURL is s3://Bucket/prefix.
func (s *S3Server) StoreURL(prefix string) string { return "s3://" + Bucket + "/" + prefix }

// Env is the environment an agent needs to reach this server under prefix.
func (s *S3Server) AgentEnv(prefix string) []string {
	env := []string{"STORE_URL=" + s.StoreURL(prefix), "S3_ENDPOINT=" + s.Endpoint, "AWS_ACCESS_KEY_ID=" + AccessKey,
		"AWS_SECRET_ACCESS_KEY=" + SecretKey, "AWS_EC2_METADATA_DISABLED=true", "S3_REGION=us-east-1"}
	if s.certs != nil {
		env = append(env, "S3_CA_FILE="+s.certs.CA)
	}
	return env
}

// StoreConfig is a validated store configuration for prefix on this server.
func (s *S3Server) StoreConfig(t testing.TB, prefix string) *config.Store {
	t.Helper()
	env := config.Env{}
	for _, kv := range s.AgentEnv(prefix) {
		for i := range kv {
			if kv[i] == '=' {
				env[kv[:i]] = kv[i+1:]
				break
			}
		}
	}
	var c config.Store
	if err := config.Load(&c, env); err != nil {
		t.Fatalf("store config: %v", err)
	}
	return &c
}

// S3Kinds are the S3 peers every S3 test runs against.
var S3Kinds = []string{"versitygw", "minio"}
