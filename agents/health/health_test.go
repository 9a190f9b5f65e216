package health

import (
	"errors"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestProbesAndMetrics(t *testing.T) {
	s := New("syncer")
	c := prometheus.NewCounter(prometheus.CounterOpts{Name: s.Name("uploads_total"), Help: "x"})
	s.Registry.MustRegister(c)
	c.Add(3)
	if err := s.Start("127.0.0.1:0", slog.Default()); err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	base := "http://" + s.Addr()
	if code, _ := get(t, base+"/startupz"); code != 503 {
		t.Fatalf("startupz before SetStarted: %d", code)
	}
	s.SetStarted()
	if code, _ := get(t, base+"/startupz"); code != 200 {
		t.Fatalf("startupz after SetStarted: %d", code)
	}
	if code, body := get(t, base+"/readyz"); code != 503 || !strings.Contains(body, "starting") {
		t.Fatalf("readyz before ready: %d %q", code, body)
	}
	s.SetReady(nil)
	if code, _ := get(t, base+"/readyz"); code != 200 {
		t.Fatalf("readyz: %d", code)
	}
	s.SetReady(errors.New("lease lost"))
	if code, body := get(t, base+"/readyz"); code != 503 || !strings.Contains(body, "lease lost") {
		t.Fatalf("readyz after loss: %d %q", code, body)
	}
	if code, _ := get(t, base+"/healthz"); code != 200 {
		t.Fatalf("healthz: %d", code)
	}
	s.SetLiveness(1) // 1ns: any time since the last beat is a stall
	if code, body := get(t, base+"/healthz"); code != 503 || !strings.Contains(body, "stalled") {
		t.Fatalf("healthz stalled: %d %q", code, body)
	}
	_, body := get(t, base+"/metrics")
	for _, want := range []string{"podkeeper_syncer_uploads_total 3", "go_goroutines", "process_resident_memory_bytes"} {
		if !strings.Contains(body, want) {
			t.Errorf("metrics lack %q", want)
		}
	}
}
