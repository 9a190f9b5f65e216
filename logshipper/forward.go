package logshipper

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"time"

	"github.com/fluent/fluent-logger-golang/fluent"
	"github.com/tinylib/msgp/msgp"
)

// transport delivers one batch; an error means the batch must be sent again.
type transport interface {
	send(ctx context.Context, chunk string, frame []byte) error
	close()
}

// ackError is a receiver that answered with the wrong chunk id: the connection
// is out of step and is replaced.
type ackError struct{ want, got string }

func (e *ackError) Error() string { return fmt.Sprintf("ack for chunk %q, want %q", e.got, e.want) }

// deliveryError wraps every failure of one attempt. All of them are retryable:
// the receiver may come back, its certificate may be fixed, a full disk may be
// emptied; only shutdown ends the retries.
type deliveryError struct {
	op  string
	err error
}

func (e *deliveryError) Error() string { return e.op + ": " + e.err.Error() }
func (e *deliveryError) Unwrap() error { return e.err }

func retryable(err error) bool {
	var de *deliveryError
	return errors.As(err, &de)
}

type forwarder struct {
	network, addr string
	tls           *tls.Config
	ack           bool
	timeout       time.Duration

	conn net.Conn
	rd   *msgp.Reader
}

func newTransport(c *Config) transport {
	if c.Output == "stdout" {
		return stdoutTransport{w: os.Stdout}
	}
	return newForwarder(c)
}

func newForwarder(c *Config) *forwarder {
	f := &forwarder{network: "tcp", addr: c.FluentAddr, ack: c.FluentAck, timeout: c.FluentTimeout}
	if p, ok := strings.CutPrefix(c.FluentAddr, "unix://"); ok {
		f.network, f.addr = "unix", p
	}
	if c.FluentTLS {
		f.tls = &tls.Config{RootCAs: c.caPool, MinVersion: tls.VersionTLS12}
		if f.network == "tcp" {
			host, _, _ := net.SplitHostPort(f.addr)
			f.tls.ServerName = host
		}
	}
	return f
}

func (f *forwarder) dial(ctx context.Context) error {
	dctx, cancel := context.WithTimeout(ctx, f.timeout)
	defer cancel()
	var d net.Dialer
	conn, err := d.DialContext(dctx, f.network, f.addr)
	if err != nil {
		return &deliveryError{"connect", err}
	}
	if f.tls != nil {
		tc := tls.Client(conn, f.tls)
		if err := tc.HandshakeContext(dctx); err != nil {
			conn.Close()
			return &deliveryError{"tls handshake", err}
		}
		conn = tc
	}
	f.conn, f.rd = conn, msgp.NewReader(conn)
	return nil
}

func (f *forwarder) close() {
	if f.conn != nil {
		f.conn.Close()
		f.conn, f.rd = nil, nil
	}
}

func (f *forwarder) send(ctx context.Context, chunk string, frame []byte) error {
	if f.conn == nil {
		if err := f.dial(ctx); err != nil {
			return err
		}
	}
	// A cancelled context (shutdown deadline) must not leave us blocked in I/O.
	stop := context.AfterFunc(ctx, func() { f.conn.SetDeadline(time.Now()) })
	defer stop()
	f.conn.SetWriteDeadline(time.Now().Add(f.timeout))
	if _, err := f.conn.Write(frame); err != nil {
		f.close()
		return &deliveryError{"write", err}
	}
	if !f.ack {
		return nil
	}
	f.conn.SetReadDeadline(time.Now().Add(f.timeout))
	var resp fluent.AckResp
	if err := resp.DecodeMsg(f.rd); err != nil {
		f.close()
		if errors.Is(err, io.EOF) {
			err = errors.New("receiver closed the connection before acking")
		}
		return &deliveryError{"ack", err}
	}
	if resp.Ack != chunk {
		f.close()
		return &deliveryError{"ack", &ackError{want: chunk, got: resp.Ack}}
	}
	return nil
}

// stdoutTransport writes JSON lines (LOGSHIP_OUTPUT=stdout).
type stdoutTransport struct{ w io.Writer }

func (s stdoutTransport) send(_ context.Context, _ string, frame []byte) error {
	if _, err := s.w.Write(frame); err != nil {
		return &deliveryError{"stdout", err}
	}
	return nil
}
func (stdoutTransport) close() {}
