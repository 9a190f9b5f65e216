// Package security runs the agent binaries the way a Pod does and checks what
// they print: credentials never appear in stdout, stderr or an Event (with
// KUBE_EVENTS=false Events go to the log), on the happy path, on an S3 outage
// and when a variable carrying credentials is refused.
package security

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/podkeeper/podkeeper/test/peers"
)

// Credentials of this test's own S3 peer: distinctive, with the characters
// that URL escaping changes, so an escaped copy is caught too.
const (
	key    = "AKIAPODKEEPERREDACT7Q"
	secret = "Rd4ct/Th1s+S3cret-K3y/nEvEr-PrInTeD0000"
	bucket = "redaction"
)

// needles are every form a leaked credential could take in a line.
func needles() map[string]string {
	return map[string]string{
		"access key":                key,
		"secret":                    secret,
		"secret, query-escaped":     url.QueryEscape(secret),
		"secret, path-escaped":      url.PathEscape(secret),
		"key:secret, basic auth":    base64.StdEncoding.EncodeToString([]byte(key + ":" + secret)),
		"secret's distinctive part": "nEvEr-PrInTeD",
	}
}

type run struct {
	name string
	out  *peers.LockedBuffer
	cmd  *exec.Cmd
	done chan struct{}
	code int
}

type harness struct {
	t    *testing.T
	bins string
	runs []*run
}

func (h *harness) start(name string, env ...string) *run {
	h.t.Helper()
	agent := strings.SplitN(name, " ", 2)[0]
	r := &run{name: name, out: &peers.LockedBuffer{}, done: make(chan struct{})}
	r.cmd = exec.Command(filepath.Join(h.bins, agent))
	r.cmd.Env = append([]string{"PATH=" + os.Getenv("PATH"), "HOME=" + h.t.TempDir(), "LOG_LEVEL=debug", "KUBE_EVENTS=false",
		"POD_NAME=upload-0", "POD_NAMESPACE=files", "POD_UID=1234", "NODE_NAME=node-a"}, env...)
	r.cmd.Stdout, r.cmd.Stderr = r.out, r.out
	r.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := r.cmd.Start(); err != nil {
		h.t.Fatal(err)
	}
	go func() {
		r.cmd.Wait()
		r.code = r.cmd.ProcessState.ExitCode()
		close(r.done)
	}()
	h.runs = append(h.runs, r)
	h.t.Cleanup(func() { r.cmd.Process.Kill(); <-r.done })
	return r
}

// wait waits for r to exit and checks its code.
func (h *harness) wait(r *run, timeout time.Duration, want int) {
	h.t.Helper()
	select {
	case <-r.done:
	case <-time.After(timeout):
		h.t.Errorf("%s did not exit within %s", r.name, timeout)
		r.cmd.Process.Kill()
		<-r.done
		return
	}
	if r.code != want {
		h.t.Errorf("%s: exit %d, want %d", r.name, r.code, want)
	}
}

func (h *harness) term(r *run, timeout time.Duration, want int) {
	h.t.Helper()
	r.cmd.Process.Signal(syscall.SIGTERM)
	h.wait(r, timeout, want)
}

func buildAgents(t *testing.T) string {
	dir := t.TempDir()
	cmd := exec.Command("go", "build", "-trimpath", "-o", dir+"/", "./cmd/restore", "./cmd/syncer", "./cmd/logshipper")
	cmd.Dir = peers.Root()
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	return dir
}

// s3Peer is versitygw started with this test's credentials.
func s3Peer(t *testing.T) (p *peers.Process, endpoint string) {
	dir := t.TempDir()
	data := filepath.Join(dir, "data")
	if err := os.MkdirAll(data, 0o755); err != nil {
		t.Fatal(err)
	}
	addr := "127.0.0.1:" + strconv.Itoa(peers.FreePort(t))
	p = &peers.Process{Name: "versitygw", Dir: dir, Log: filepath.Join(dir, "versitygw.log"),
		Args: []string{peers.Bin(t, "versitygw"), "--port", addr, "--access", key, "--secret", secret, "--quiet", "--keep-alive", "posix", data}}
	startS3(t, p, "http://"+addr)
	t.Cleanup(p.Stop)
	client := s3Client("http://" + addr)
	if _, err := client.CreateBucket(context.Background(), &s3.CreateBucketInput{Bucket: aws.String(bucket)}); err != nil {
		t.Fatal(err)
	}
	return p, "http://" + addr
}

func startS3(t *testing.T, p *peers.Process, endpoint string) {
	t.Helper()
	if err := p.Start(); err != nil {
		t.Fatal(err)
	}
	err := peers.WaitFor(context.Background(), 30*time.Second, func() error {
		if p.Exited() {
			return errors.New("versitygw exited")
		}
		resp, err := http.Get(endpoint)
		if err == nil {
			resp.Body.Close()
		}
		return err
	})
	if err != nil {
		t.Fatalf("%v\n%s", err, p.Tail())
	}
}

func s3Client(endpoint string) *s3.Client {
	return s3.New(s3.Options{Region: "us-east-1", BaseEndpoint: aws.String(endpoint), UsePathStyle: true,
		Credentials: credentials.NewStaticCredentialsProvider(key, secret, "")})
}

func TestCredentialsNeverPrinted(t *testing.T) {
	if testing.Short() {
		t.Skip("needs the versitygw peer and builds the agents")
	}
	h := &harness{t: t, bins: buildAgents(t)}
	s3p, endpoint := s3Peer(t)
	storeEnv := []string{"STORE_URL=s3://" + bucket + "/red", "S3_ENDPOINT=" + endpoint, "S3_REGION=us-east-1",
		"AWS_ACCESS_KEY_ID=" + key, "AWS_SECRET_ACCESS_KEY=" + secret, "AWS_EC2_METADATA_DISABLED=true"}
	httpAddr := func() string { return "127.0.0.1:" + strconv.Itoa(peers.FreePort(t)) }

	// 1. The syncer uploads, the S3 server goes away while files keep coming
	// (UploadsFailing), then SIGTERM with uploads pending.
	up := t.TempDir()
	sy := h.start("syncer", append(storeEnv, "SYNC_DIR="+up, "SYNC_HTTP_ADDR="+httpAddr(), "SYNC_SETTLE=100ms",
		"SYNC_SNAPSHOT_INTERVAL=500ms", "SYNC_SHUTDOWN_TIMEOUT=3s")...)
	for i := range 5 {
		must(t, os.WriteFile(filepath.Join(up, fmt.Sprintf("f%d.bin", i)), []byte(strings.Repeat("x", 1000*i)), 0o644))
	}
	client := s3Client(endpoint)
	err := peers.WaitFor(context.Background(), 30*time.Second, func() error {
		// A change-log batch is the syncer's acknowledgement: restore sees the files.
		out, err := client.ListObjectsV2(context.Background(), &s3.ListObjectsV2Input{Bucket: aws.String(bucket), Prefix: aws.String("red/log/")})
		if err != nil {
			return err
		}
		if len(out.Contents) == 0 {
			return errors.New("no change-log batch yet")
		}
		return nil
	})
	if err != nil {
		t.Fatalf("%v\n%s", err, sy.out.String())
	}
	s3p.Stop() // the outage
	for i := range 3 {
		must(t, os.WriteFile(filepath.Join(up, fmt.Sprintf("late%d.bin", i)), []byte("late"), 0o644))
	}
	// The error paths must have printed before the output is searched.
	err = peers.WaitFor(context.Background(), 30*time.Second, func() error {
		if !strings.Contains(sy.out.String(), "retrying") {
			return errors.New("no retry logged yet")
		}
		return nil
	})
	if err != nil {
		t.Fatalf("%v\n%s", err, sy.out.String())
	}
	h.term(sy, 30*time.Second, 1)

	// 2. restore: a full run with S3 up, then one during an outage.
	startS3(t, s3p, endpoint)
	h.wait(h.start("restore", append(storeEnv, "RESTORE_DIR="+t.TempDir())...), 60*time.Second, 0)
	// A wrong secret: the server's refusal (SignatureDoesNotMatch) is printed,
	// and servers echo the access key in such answers.
	h.wait(h.start("restore with a wrong secret", append(storeEnv, "AWS_SECRET_ACCESS_KEY="+secret+"-wrong", "RESTORE_DIR="+t.TempDir(),
		"RESTORE_IF_MISSING=fail")...), 120*time.Second, 1)
	s3p.Stop()
	h.wait(h.start("restore during outage", append(storeEnv, "RESTORE_DIR="+t.TempDir(), "RESTORE_IF_MISSING=fail")...), 120*time.Second, 1)

	// 3. The logshipper with the same Secret in its environment, its receiver
	// down, then SIGTERM with records not delivered.
	logs := t.TempDir()
	must(t, os.WriteFile(filepath.Join(logs, "app.log"), []byte("hello\nworld\n"), 0o644))
	ls := h.start("logshipper", append(storeEnv[3:], "LOGSHIP_PATHS="+logs+"/*.log", "LOGSHIP_STATE_DIR="+t.TempDir(),
		"FLUENT_ADDR=127.0.0.1:"+strconv.Itoa(peers.FreePort(t)), "FLUENT_TIMEOUT=500ms", "LOGSHIP_SHUTDOWN_TIMEOUT=2s", "LOGSHIP_HTTP_ADDR="+httpAddr())...)
	// Its error path (a refused delivery, retried) must have printed first.
	if err := peers.WaitFor(context.Background(), 30*time.Second, func() error {
		if !strings.Contains(ls.out.String(), "not delivered") {
			return errors.New("no failed delivery logged yet")
		}
		return nil
	}); err != nil {
		t.Fatalf("%v\n%s", err, ls.out.String())
	}
	h.term(ls, 30*time.Second, 1)

	// 4. Variables carrying credentials are refused (exit 2) without
	// printing them.
	refused := map[string][]string{
		"STORE_URL with user-info":          {"STORE_URL=s3://" + key + ":" + secret + "@" + bucket + "/red"},
		"STORE_URL with escaped user-info":  {"STORE_URL=s3://" + key + ":" + url.QueryEscape(secret) + "@" + bucket + "/red"},
		"S3_ENDPOINT with user-info":        {"S3_ENDPOINT=http://" + key + ":" + secret + "@" + strings.TrimPrefix(endpoint, "http://")},
		"S3_ENDPOINT with escaped userinfo": {"S3_ENDPOINT=http://" + key + ":" + url.PathEscape(secret) + "@" + strings.TrimPrefix(endpoint, "http://")},
	}
	for what, vars := range refused {
		for _, agent := range []string{"restore", "syncer"} {
			env := append(append([]string{}, storeEnv...), vars...)
			env = append(env, "RESTORE_DIR="+t.TempDir(), "SYNC_DIR="+t.TempDir(), "SYNC_HTTP_ADDR=off")
			h.wait(h.start(agent+" "+what, env...), 10*time.Second, 2)
		}
	}
	h.wait(h.start("logshipper FLUENT_ADDR with user-info", append(storeEnv[3:], "LOGSHIP_PATHS="+logs+"/*.log", "LOGSHIP_STATE_DIR="+t.TempDir(),
		"FLUENT_ADDR=tcp://"+key+":"+secret+"@127.0.0.1:24224")...), 30*time.Second, 2)

	// The error paths did print: the outage and the refusals are in the output.
	all := ""
	lines := 0
	for _, r := range h.runs {
		out := r.out.String()
		all += out
		lines += strings.Count(out, "\n")
		t.Logf("%-45s exit %d, %3d lines", r.name, r.code, strings.Count(out, "\n"))
	}
	for _, want := range []string{"connection refused", "UploadsFailing", "STORE_URL", "S3_ENDPOINT", "FLUENT_ADDR"} {
		if !strings.Contains(all, want) {
			t.Errorf("no %q in any output: the error paths did not run", want)
		}
	}
	hits := 0
	for _, r := range h.runs {
		out := r.out.String()
		for what, n := range needles() {
			if c := strings.Count(out, n); c > 0 {
				hits += c
				i := strings.Index(out, n)
				t.Errorf("%s printed the %s %d times, e.g. …%s…", r.name, what, c, out[max(0, i-150):min(len(out), i+len(n)+30)])
			}
		}
	}
	t.Logf("%d runs of the three agents, %d lines of stdout/stderr, %d credential hits", len(h.runs), lines, hits)
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
