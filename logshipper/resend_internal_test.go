package logshipper

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/tinylib/msgp/msgp"

	"github.com/podkeeper/podkeeper/agents/config"
	"github.com/podkeeper/podkeeper/agents/health"
	"github.com/podkeeper/podkeeper/agents/lifecycle"
	"github.com/podkeeper/podkeeper/test/peers"
)

// misbehavingReceiver is a fake forward receiver on a unix socket for the edge
// cases real receivers do not produce on demand: connection closed before the
// ack, no ack at all, an ack for another chunk. From the fourth connection on
// it behaves.
type misbehavingReceiver struct {
	mu     sync.Mutex
	chunks []string       // chunk of each frame received, in order
	logs   map[string]int // records of acked frames
	conns  int
	ln     net.Listener
}

func (r *misbehavingReceiver) serve() {
	for {
		c, err := r.ln.Accept()
		if err != nil {
			return
		}
		r.mu.Lock()
		r.conns++
		n := r.conns
		r.mu.Unlock()
		go r.handle(c, n)
	}
}

func (r *misbehavingReceiver) handle(c net.Conn, n int) {
	defer c.Close()
	rd := msgp.NewReader(c)
	for {
		chunk, logs, err := readFrame(rd)
		if err != nil {
			return
		}
		r.mu.Lock()
		r.chunks = append(r.chunks, chunk)
		r.mu.Unlock()
		switch n {
		case 1:
			return // dropped before the ack
		case 2:
			io.Copy(io.Discard, c) // never acks; the client gives up and closes
			return
		case 3:
			c.Write(msgp.AppendString(msgp.AppendString(msgp.AppendMapHeader(nil, 1), "ack"), "some-other-chunk"))
			continue
		}
		r.mu.Lock()
		for _, l := range logs {
			r.logs[l]++
		}
		r.mu.Unlock()
		c.Write(msgp.AppendString(msgp.AppendString(msgp.AppendMapHeader(nil, 1), "ack"), chunk))
	}
}

// readFrame decodes one PackedForward frame.
func readFrame(rd *msgp.Reader) (chunk string, logs []string, err error) {
	if _, err = rd.ReadArrayHeader(); err != nil {
		return
	}
	if _, err = rd.ReadString(); err != nil {
		return
	}
	entries, err := rd.ReadBytes(nil)
	if err != nil {
		return
	}
	opts := map[string]any{}
	if err = rd.ReadMapStrIntf(opts); err != nil {
		return
	}
	chunk, _ = opts["chunk"].(string)
	for len(entries) > 0 {
		var rec map[string]any
		if _, entries, err = msgp.ReadArrayHeaderBytes(entries); err != nil {
			return
		}
		if entries, err = msgp.Skip(entries); err != nil { // the EventTime
			return
		}
		if rec, entries, err = msgp.ReadMapStrIntfBytes(entries, nil); err != nil {
			return
		}
		logs = append(logs, rec["log"].(string))
	}
	return
}

// A batch that is not acked (dropped connection, timeout, wrong ack) is resent
// with the same chunk id until it is, over a unix socket.
func TestResendSameChunkOverUnixSocket(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "fluent.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	r := &misbehavingReceiver{ln: ln, logs: map[string]int{}}
	go r.serve()

	logs := filepath.Join(dir, "logs")
	os.MkdirAll(logs, 0o755)
	appendLines(t, filepath.Join(logs, "app.log"), 0, 50)
	var cfg Config
	if err := config.Load(&cfg, config.Env{"LOGSHIP_PATHS": filepath.Join(logs, "*.log"), "LOGSHIP_STATE_DIR": filepath.Join(dir, "state"),
		"FLUENT_ADDR": "unix://" + sock, "FLUENT_TIMEOUT": "300ms", "LOGSHIP_HTTP_ADDR": "off", "LOGSHIP_BATCH_WAIT": "20ms"}); err != nil {
		t.Fatal(err)
	}
	rec := &recorder{}
	s := New(&cfg, lifecycle.Deps{Log: slog.New(slog.NewTextHandler(io.Discard, nil)), Events: rec,
		Health: health.New("logshipper"), DrainTimeout: cfg.DrainTimeout()})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	err = peers.WaitFor(context.Background(), 30*time.Second, func() error {
		r.mu.Lock()
		defer r.mu.Unlock()
		if len(r.logs) < 50 {
			return io.ErrUnexpectedEOF
		}
		return nil
	})
	cancel()
	if err != nil {
		t.Fatalf("not all lines acked: %v (chunks %v)", err, r.chunks)
	}
	if err := <-done; err != nil {
		t.Fatalf("Run: %v", err)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.chunks) < 4 {
		t.Fatalf("frames %v: want the first batch four times", r.chunks)
	}
	for i := 1; i < 4; i++ {
		if r.chunks[i] != r.chunks[0] || r.chunks[0] == "" {
			t.Fatalf("resend %d used chunk %q, first was %q", i, r.chunks[i], r.chunks[0])
		}
	}
	for i := range 50 {
		if l := fmt.Sprintf("line %05d of the application log", i); r.logs[l] != 1 {
			t.Fatalf("%q acked %d times", l, r.logs[l])
		}
	}
	if len(rec.got) == 0 || rec.got[0].reason != "LogsDelayed" {
		t.Errorf("events %+v, want LogsDelayed", rec.got)
	}
}
