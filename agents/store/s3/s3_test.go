package s3_test

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/podkeeper/podkeeper/agents/store"
	"github.com/podkeeper/podkeeper/agents/store/s3"
	"github.com/podkeeper/podkeeper/test/peers"
)

// TestS3OutageIsRetryable: a server that is down yields retryable errors (the
// agents' backoff loops rely on it), and the same store works once it is back.
func TestS3OutageIsRetryable(t *testing.T) {
	srv := peers.StartS3(t, "versitygw")
	ctx := context.Background()
	s, err := s3.New(ctx, srv.StoreConfig(t, "outage"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Put(ctx, "k", strings.NewReader("v"), 1, store.PutOptions{}); err != nil {
		t.Fatal(err)
	}
	srv.Stop()
	_, err = s.Head(ctx, "k", store.HeadOptions{})
	if err == nil || !store.IsRetryable(err) {
		t.Fatalf("head during outage: retryable=%v err=%v", store.IsRetryable(err), err)
	}
	if _, err := s.Put(ctx, "k2", strings.NewReader("v"), 1, store.PutOptions{}); !store.IsRetryable(err) {
		t.Fatalf("put during outage: %v", err)
	}
	srv.Restart(t)
	if _, err := s.Head(ctx, "k", store.HeadOptions{}); err != nil {
		t.Fatalf("after restart: %v", err)
	}
	// A permanent error is not retryable: wrong credentials.
	t.Setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-key")
	bad, err := s3.New(ctx, srv.StoreConfig(t, "outage"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := bad.Head(ctx, "k", store.HeadOptions{}); err == nil || store.IsRetryable(err) || errors.Is(err, store.ErrNotExist) {
		t.Fatalf("bad credentials: retryable=%v err=%v", store.IsRetryable(err), err)
	}
}

// TestS3CustomCA: S3_CA_FILE makes an HTTPS endpoint signed by a private CA
// trusted, and without it the same endpoint is refused (a permanent error).
func TestS3CustomCA(t *testing.T) {
	srv, _ := peers.StartS3TLS(t)
	ctx := context.Background()
	cfg := srv.StoreConfig(t, "tls")
	if cfg.S3CAFile == "" || !strings.HasPrefix(cfg.S3Endpoint, "https://") {
		t.Fatalf("TLS peer config: %+v", cfg)
	}
	s, err := s3.New(ctx, cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Put(ctx, "k", strings.NewReader("v"), 1, store.PutOptions{}); err != nil {
		t.Fatalf("put over TLS with S3_CA_FILE: %v", err)
	}
	cfg.S3CAFile = ""
	untrusting, err := s3.New(ctx, cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	_, err = untrusting.Head(ctx, "k", store.HeadOptions{})
	if err == nil {
		t.Fatal("an unknown CA was trusted without S3_CA_FILE")
	}
	if store.IsRetryable(err) {
		t.Fatalf("a certificate error must be permanent, not retried forever: %v", err)
	}
}
