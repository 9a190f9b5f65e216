package store_test

import (
	"context"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/podkeeper/podkeeper/agents/config"
	"github.com/podkeeper/podkeeper/agents/store"
	_ "github.com/podkeeper/podkeeper/agents/store/backends"
	"github.com/podkeeper/podkeeper/agents/store/storetest"
	"github.com/podkeeper/podkeeper/test/peers"
)

// TestConformance runs one suite against every backend, opened the way the
// agents open them; the subtest names (file, versitygw, minio) say which
// backend passed.
func TestConformance(t *testing.T) {
	t.Run("file", func(t *testing.T) {
		t.Parallel()
		storetest.Run(t, storetest.Backend{New: func(t *testing.T) store.Store {
			dir := t.TempDir()
			return open(t, &config.Store{URL: "file://" + dir, Scheme: "file", Path: dir})
		}})
	})
	for _, kind := range peers.S3Kinds {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			srv := peers.StartS3(t, kind)
			// Every request goes through a proxy: the Multiparter checks refuse
			// parts and count them there.
			proxy := peers.NewCountingProxy(t, srv.Endpoint)
			var n atomic.Int64
			storetest.Run(t, storetest.Backend{
				New: func(t *testing.T) store.Store {
					prefix := fmt.Sprintf("conformance/%d-%s", n.Add(1), strings.ReplaceAll(t.Name(), "/", "_"))
					cfg := srv.StoreConfig(t, prefix)
					cfg.S3Endpoint = proxy.URL
					return open(t, cfg)
				},
				MultipartThreshold: store.DefaultMultipartThreshold,
				Wire:               proxyWire{proxy},
			})
		})
	}
}

func open(t *testing.T, c *config.Store) store.Store {
	t.Helper()
	s, err := store.Open(context.Background(), c, nil)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// proxyWire is storetest.Wire on a peers.CountingProxy.
type proxyWire struct{ p *peers.CountingProxy }

func (w proxyWire) RefuseParts(from int) {
	if from == 0 {
		w.p.FailWith(0, nil)
		return
	}
	w.p.FailWith(http.StatusServiceUnavailable, func(r *http.Request) bool {
		n, err := strconv.Atoi(r.URL.Query().Get("partNumber"))
		return err == nil && n >= from
	})
}

func (w proxyWire) ResetCounts()     { w.p.Reset() }
func (w proxyWire) PartUploads() int { return w.p.Count("PUT-part") }

// TestOpenUnlinkedScheme: a binary without the backend says so instead of
// guessing.
func TestOpenUnlinkedScheme(t *testing.T) {
	_, err := store.Open(context.Background(), &config.Store{URL: "gs://b/p", Scheme: "gs"}, nil)
	if err == nil || !strings.Contains(err.Error(), "gs://") {
		t.Fatalf("unregistered scheme: %v", err)
	}
}
