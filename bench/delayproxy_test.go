//go:build bench

package bench

import (
	"bytes"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// delayProxy is a TCP proxy to upstream that holds every chunk of bytes for
// delay in each direction (a round trip of 2 x delay) without limiting the
// bandwidth: what a bucket in another zone or region looks like to the
// client, with the server and client still on loopback.
type delayProxy struct {
	Addr  string
	ln    net.Listener
	Conns atomic.Int64 // connections accepted: a contender's keep-alive reuse shows here
}

func startDelayProxy(t *testing.T, upstream string, delay time.Duration) *delayProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &delayProxy{Addr: ln.Addr().String(), ln: ln}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			p.Conns.Add(1)
			go func() {
				// The TCP handshake the client just completed with the
				// proxy costs a round trip on a real network too.
				time.Sleep(2 * delay)
				u, err := net.Dial("tcp", upstream)
				if err != nil {
					c.Close()
					return
				}
				a, b := c.(*net.TCPConn), u.(*net.TCPConn)
				var wg sync.WaitGroup
				wg.Add(2)
				go func() { defer wg.Done(); delayPipe(b, a, delay) }()
				go func() { defer wg.Done(); delayPipe(a, b, delay) }()
				wg.Wait()
				a.Close()
				b.Close()
			}()
		}
	}()
	return p
}

type delayChunk struct {
	b   []byte
	due time.Time
}

// delayPipe copies src to dst, each chunk no earlier than delay after it was
// read; src's EOF becomes dst's CloseWrite, a write error closes both.
func delayPipe(dst, src *net.TCPConn, delay time.Duration) {
	q := make(chan delayChunk, 4096)
	go func() {
		defer close(q)
		buf := make([]byte, 64<<10)
		for {
			n, err := src.Read(buf)
			if n > 0 {
				q <- delayChunk{bytes.Clone(buf[:n]), time.Now().Add(delay)}
			}
			if err != nil {
				return
			}
		}
	}()
	for c := range q {
		if d := time.Until(c.due); d > 0 {
			time.Sleep(d)
		}
		if _, err := dst.Write(c.b); err != nil {
			dst.Close()
			src.Close()
			for range q {
			}
			return
		}
	}
	dst.CloseWrite()
}
