// Package health is the one small HTTP server every agent runs: /startupz
// (the agent has done what the app may rely on before it starts: the syncer
// watches, the logshipper reads), /healthz (liveness: the agent's main loop is
// alive), /readyz (readiness: what each agent says it means, e.g. its store or
// receiver reachable) and /metrics (Prometheus, names podkeeper_<agent>_...).
package health

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Server serves the probes and metrics of one agent.
type Server struct {
	Registry *prometheus.Registry
	agent    string

	mu       sync.Mutex
	started  bool
	ready    error // nil = ready
	beatAt   time.Time
	maxStall time.Duration

	srv *http.Server
	ln  net.Listener
}

// New returns a server for agent with Go and process collectors registered. It
// starts not ready and alive.
func New(agent string) *Server {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return &Server{Registry: reg, agent: agent, ready: errors.New("starting"), beatAt: time.Now()}
}

// Name returns the metric name podkeeper_<agent>_<name>.
func (s *Server) Name(name string) string { return "podkeeper_" + s.agent + "_" + name }

// SetReady marks the agent ready (err == nil) or not ready with a reason.
func (s *Server) SetReady(err error) {
	s.mu.Lock()
	s.ready = err
	s.mu.Unlock()
}

// SetStarted marks the start-up done; /startupz answers 200 from then on. It
// is separate from readiness so that an outage later (the store, the
// receiver) shows on /readyz without a startup probe ever restarting the
// container for it.
func (s *Server) SetStarted() {
	s.mu.Lock()
	s.started = true
	s.mu.Unlock()
}

// Beat records that the main loop is alive. With SetLiveness(d), /healthz fails
// when no beat came for d.
func (s *Server) Beat() {
	s.mu.Lock()
	s.beatAt = time.Now()
	s.mu.Unlock()
}

// SetLiveness sets how long the main loop may go without a Beat (0 = no check).
func (s *Server) SetLiveness(d time.Duration) {
	s.mu.Lock()
	s.maxStall = d
	s.mu.Unlock()
}

func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		stall, max := time.Since(s.beatAt), s.maxStall
		s.mu.Unlock()
		if max > 0 && stall > max {
			http.Error(w, fmt.Sprintf("main loop stalled for %s", stall.Round(time.Millisecond)), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("/startupz", func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		started := s.started
		s.mu.Unlock()
		if !started {
			http.Error(w, "starting", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "started")
	})
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		err := s.ready
		s.mu.Unlock()
		if err != nil {
			http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ready")
	})
	mux.Handle("/metrics", promhttp.HandlerFor(s.Registry, promhttp.HandlerOpts{Registry: s.Registry}))
	return mux
}

// Start listens on addr (":8081", "127.0.0.1:0"; "" or "off" disables) and
// serves in the background.
func (s *Server) Start(addr string, log *slog.Logger) error {
	if addr == "" || addr == "off" {
		return nil
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("health server: %w", err)
	}
	s.ln = ln
	s.srv = &http.Server{Handler: s.Handler(), ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := s.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("health server stopped", "err", err)
		}
	}()
	log.Debug("health server listening", "addr", ln.Addr().String())
	return nil
}

// Addr is the address actually listened on ("" when disabled).
func (s *Server) Addr() string {
	if s.ln == nil {
		return ""
	}
	return s.ln.Addr().String()
}

// Close stops the server.
func (s *Server) Close() {
	if s.srv != nil {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = s.srv.Shutdown(ctx)
	}
}
