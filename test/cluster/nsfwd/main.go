// Command nsfwd connects one Pod's network namespace with the host's loopback on the offline test
// node, without any interface in the host's network namespace. The CNI plugin veth-self starts one
// per Pod sandbox (and stops it on DEL):
//
//	nsfwd -netns PATH -ip POD_IP -ports-file FILE -pidfile FILE
//
// Two directions, both plain TCP relays:
//
//   - into the Pod: for every port listed in -ports-file (the test's S3 server, log receiver and API
//     server; re-read when it changes) nsfwd listens on 127.0.0.1:PORT inside the Pod's namespace and
//     relays each connection to 127.0.0.1:PORT on the host, so the Pod reaches the test's loopback
//     servers at the very addresses a hostNetwork Pod would use.
//   - out of the Pod: the Pod's IP is a loopback address of the host (127.244.0.N, see veth-self), so
//     the kubelet's probes and the tests dial POD_IP:PORT on the host's lo. nsfwd mirrors every TCP
//     port something listens on inside the Pod (read from the namespace's /proc/net/tcp{,6}) as a
//     listener on POD_IP:PORT on the host and relays to it; a port nobody listens on in the Pod is
//     refused on the host too (a tcpSocket probe must not pass before the app listens).
//
// A socket keeps the namespace it was created in: nsfwd creates the Pod-side sockets on an OS thread
// locked and switched (setns) into the Pod's namespace, which is never switched back and ends with its
// goroutine; everything else runs in the host's namespace.
package main

import (
	"bufio"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"os/signal"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

func main() {
	netnsPath := flag.String("netns", "", "the Pod's network namespace (CNI_NETNS)")
	podIP := flag.String("ip", "", "the Pod's IP: a loopback address of the host (127.244.0.N)")
	portsFile := flag.String("ports-file", "", "host loopback ports to make reachable inside the Pod (one a line or space separated; may be missing)")
	pidfile := flag.String("pidfile", "", "written once the listeners for the ports file are up")
	poll := flag.Duration("poll", 100*time.Millisecond, "how often the Pod's listening ports and the ports file are checked")
	flag.Parse()
	log.SetPrefix(fmt.Sprintf("nsfwd %s ", *podIP))
	log.SetFlags(log.LstdFlags | log.Lmicroseconds | log.LUTC)
	if *netnsPath == "" || net.ParseIP(*podIP) == nil {
		log.Fatal("-netns and -ip are required")
	}
	fd, err := unix.Open(*netnsPath, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		log.Fatalf("open netns: %v", err)
	}
	f := &fwd{nsfd: fd, podIP: *podIP, into: map[int]net.Listener{}, out: map[int]net.Listener{}}
	f.syncInto(*portsFile)
	if *pidfile != "" {
		if err := os.WriteFile(*pidfile+".tmp", []byte(strconv.Itoa(os.Getpid())+"\n"), 0o644); err != nil {
			log.Fatal(err)
		}
		if err := os.Rename(*pidfile+".tmp", *pidfile); err != nil {
			log.Fatal(err)
		}
	}
	log.Printf("up: netns %s, into the Pod: %v", *netnsPath, f.intoPorts())
	go f.watchPod(*poll)
	go func() {
		for range time.Tick(*poll * 5) {
			f.syncInto(*portsFile)
		}
	}()
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	<-sigs
	log.Printf("stopped")
}

type fwd struct {
	nsfd  int
	podIP string

	mu        sync.Mutex
	into      map[int]net.Listener // inside the Pod on 127.0.0.1:PORT -> host 127.0.0.1:PORT
	out       map[int]net.Listener // on the host on POD_IP:PORT -> inside the Pod
	portsStat string
}

// inPod runs fn on a fresh OS thread switched into the Pod's namespace. The thread is never
// switched back: the goroutine keeps it locked, so the runtime ends the thread with it.
func (f *fwd) inPod(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if err := unix.Setns(f.nsfd, unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("setns: %w", err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

func (f *fwd) intoPorts() []int {
	f.mu.Lock()
	defer f.mu.Unlock()
	var ps []int
	for p := range f.into {
		ps = append(ps, p)
	}
	return ps
}

// syncInto opens a Pod-side listener for every port of the ports file not yet served.
func (f *fwd) syncInto(file string) {
	if file == "" {
		return
	}
	st, err := os.Stat(file)
	if err != nil {
		return
	}
	key := fmt.Sprint(st.ModTime().UnixNano(), st.Size())
	if key == f.portsStat {
		return
	}
	b, err := os.ReadFile(file)
	if err != nil {
		return
	}
	f.portsStat = key
	for _, w := range strings.Fields(string(b)) {
		port, err := strconv.Atoi(w)
		if err != nil || port <= 0 || port > 65535 {
			log.Printf("ports file: ignoring %q", w)
			continue
		}
		f.mu.Lock()
		_, have := f.into[port]
		f.mu.Unlock()
		if have {
			continue
		}
		var l net.Listener
		err = f.inPod(func() (err error) {
			l, err = net.Listen("tcp4", "127.0.0.1:"+strconv.Itoa(port))
			return err
		})
		if err != nil {
			log.Printf("into the Pod: listen 127.0.0.1:%d: %v", port, err)
			continue
		}
		f.mu.Lock()
		f.into[port] = l
		f.mu.Unlock()
		target := "127.0.0.1:" + strconv.Itoa(port)
		go serve(l, func() (net.Conn, error) { return net.DialTimeout("tcp", target, 5*time.Second) })
	}
}

// watchPod mirrors the Pod's listening ports on POD_IP:PORT on the host, polling the namespace's
// socket tables from a thread that stays in it.
func (f *fwd) watchPod(every time.Duration) {
	err := f.inPod(func() error {
		for {
			ports, err := listening()
			if err != nil {
				return err
			}
			f.mirror(ports)
			time.Sleep(every)
		}
	})
	log.Fatalf("watching the Pod's ports: %v", err)
}

func (f *fwd) mirror(ports map[int]bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for p := range f.into {
		delete(ports, p) // nsfwd's own listeners
	}
	for p, l := range f.out {
		if !ports[p] {
			l.Close()
			delete(f.out, p)
			log.Printf("out of the Pod: %s:%d closed (nothing listens in the Pod)", f.podIP, p)
		}
	}
	for p := range ports {
		if _, ok := f.out[p]; ok {
			continue
		}
		// net.Listen here would run on the Pod's thread: the host-side socket is made on another goroutine.
		addr := net.JoinHostPort(f.podIP, strconv.Itoa(p))
		lc := make(chan net.Listener, 1)
		go func() {
			l, err := net.Listen("tcp4", addr)
			if err != nil {
				log.Printf("out of the Pod: listen %s: %v", addr, err)
			}
			lc <- l
		}()
		l := <-lc
		if l == nil {
			continue
		}
		f.out[p] = l
		log.Printf("out of the Pod: %s -> Pod's 127.0.0.1:%d", addr, p)
		target := "127.0.0.1:" + strconv.Itoa(p)
		go serve(l, func() (c net.Conn, err error) {
			err = f.inPod(func() error {
				c, err = net.DialTimeout("tcp", target, 5*time.Second)
				return err
			})
			return c, err
		})
	}
}

// listening returns the TCP ports in LISTEN state on the wildcard or a loopback address in the
// calling thread's network namespace.
func listening() (map[int]bool, error) {
	ports := map[int]bool{}
	for _, name := range []string{"/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"} {
		fh, err := os.Open(name)
		if err != nil {
			if errors.Is(err, os.ErrNotExist) && strings.HasSuffix(name, "6") {
				continue
			}
			return nil, err
		}
		sc := bufio.NewScanner(fh)
		sc.Scan() // header
		for sc.Scan() {
			// sl local_address rem_address st ...; local_address is HEXIP:HEXPORT
			fs := strings.Fields(sc.Text())
			if len(fs) < 4 || fs[3] != "0A" {
				continue
			}
			ip, port, ok := strings.Cut(fs[1], ":")
			if !ok {
				continue
			}
			if !wildcardOrLoopback(ip) {
				continue
			}
			if p, err := strconv.ParseUint(port, 16, 16); err == nil {
				ports[int(p)] = true
			}
		}
		fh.Close()
	}
	return ports, nil
}

// wildcardOrLoopback: 0.0.0.0, 127.x.x.x (little-endian hex: ..7F), ::, ::1 and ::ffff:127.x.
func wildcardOrLoopback(hexIP string) bool {
	switch {
	case strings.Trim(hexIP, "0") == "":
		return true
	case len(hexIP) == 8:
		return strings.HasSuffix(hexIP, "7F")
	case len(hexIP) == 32:
		return hexIP == "00000000000000000000000001000000" ||
			(strings.HasPrefix(hexIP, "0000000000000000FFFF0000") && strings.HasSuffix(hexIP, "7F"))
	}
	return false
}

// serve relays every connection accepted on l to a connection from dial, both ways.
func serve(l net.Listener, dial func() (net.Conn, error)) {
	for {
		c, err := l.Accept()
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				log.Printf("accept %s: %v", l.Addr(), err)
			}
			return
		}
		go func() {
			defer c.Close()
			d, err := dial()
			if err != nil {
				return // the client sees the connection closed, as after a refused dial
			}
			defer d.Close()
			done := make(chan struct{}, 2)
			pipe := func(dst, src net.Conn) {
				io.Copy(dst, src)
				if tc, ok := dst.(*net.TCPConn); ok {
					tc.CloseWrite()
				}
				done <- struct{}{}
			}
			go pipe(d, c)
			go pipe(c, d)
			<-done
			<-done
		}()
	}
}
