// Command upload-app is the e2e tests' stand-in for a file-upload application, and the
// offline node's sandbox ("pause") process. One static binary, no shell in the image, so
// every action the tests need inside a Pod is a subcommand run with `kubectl exec`:
//
//	upload-app run                 the app container: prints what it finds in the data dir
//	                               (proof that restore ran before it) and the status of the
//	                               URLs in APP_CHECK_READY (the sidecars' /readyz), optionally
//	                               writes a batch (APP_FILES, APP_LINES...), then waits for SIGTERM
//	upload-app write [flags]       write N files (nested, one large) and M log lines, print sums
//	upload-app sums [-dir D]       sha256 of every file under D, sorted: "SUM  PATH"
//	upload-app pause               block until SIGTERM/SIGINT (the pod sandbox image)
//
// With APP_HTTP_ADDR, `run` also serves HTTP (what a client of an upload service does):
//
//	PUT  /files/PATH               store the body as PATH in the data dir, answer "SUM  PATH" once closed
//	GET  /files/PATH               the file's bytes (404 if missing)
//	POST /write?files=N&batch=B    what `write -files N -batch B` does (large-kib= too), its output
//	any other request              "ok" (the workloads' probes)
//
// Every signal received is printed with a timestamp and, when APP_WITNESS names a file, appended
// to it, so a test can observe the termination order of the containers of a Pod.
package main

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

func main() {
	args := os.Args[1:]
	if len(args) == 0 {
		args = []string{"run"}
	}
	var err error
	switch args[0] {
	case "pause":
		waitSignal("pause")
	case "run":
		err = run()
	case "write":
		err = writeCmd(args[1:])
	case "sums":
		fl := flag.NewFlagSet("sums", flag.ExitOnError)
		dir := fl.String("dir", env("APP_DATA_DIR", "/data"), "directory to hash")
		fl.Parse(args[1:])
		err = printSums(os.Stdout, *dir)
	default:
		err = fmt.Errorf("unknown subcommand %q (run, write, sums, pause)", args[0])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "upload-app:", err)
		os.Exit(1)
	}
}

func env(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

func envInt(k string, def int) int {
	v, err := strconv.Atoi(env(k, strconv.Itoa(def)))
	if err != nil {
		fmt.Fprintf(os.Stderr, "upload-app: %s=%q is not an integer\n", k, os.Getenv(k))
		os.Exit(2)
	}
	return v
}

func stamp() string { return time.Now().UTC().Format(time.RFC3339Nano) }

// waitSignal blocks until SIGTERM or SIGINT and records it; the termination-order checks read
// these lines, so they are written before the process exits.
func waitSignal(who string) {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	s := <-sigs
	line := fmt.Sprintf("%s %s %s received %v", stamp(), who, env("POD_NAME", "-"), s)
	fmt.Println(line)
	if w := os.Getenv("APP_WITNESS"); w != "" {
		if f, err := os.OpenFile(w, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o666); err == nil {
			fmt.Fprintln(f, line)
			f.Close()
		}
	}
}

func run() error {
	dir := env("APP_DATA_DIR", "/data")
	// The example workload's own probes (tcpSocket on its http port) and the uploads of the tests.
	if addr := os.Getenv("APP_HTTP_ADDR"); addr != "" {
		go func() {
			err := http.ListenAndServe(addr, handler(dir))
			fmt.Fprintln(os.Stderr, "upload-app: http:", err)
			os.Exit(1)
		}()
	}
	fmt.Printf("%s app started in %s; files present before the app wrote anything:\n", stamp(), dir)
	if err := printSums(os.Stdout, dir); err != nil {
		return err
	}
	fmt.Println("end of files present at start")
	// The sidecars must be ready before the app starts; the app, sharing the Pod's network, sees
	// their readiness endpoints exactly as it is at its own start.
	for _, u := range strings.Split(os.Getenv("APP_CHECK_READY"), ",") {
		if u = strings.TrimSpace(u); u != "" {
			fmt.Printf("%s at app start %s: %s\n", stamp(), u, probe(u))
		}
	}
	if n, m := envInt("APP_FILES", 0), envInt("APP_LINES", 0); n > 0 || m > 0 {
		if err := write(os.Stdout, dir, env("APP_LOG_FILE", "/logs/app.log"), n, envInt("APP_LARGE_KIB", 0), m, env("APP_BATCH", "start")); err != nil {
			return err
		}
	}
	if os.Getenv("APP_EXIT") == "true" {
		return nil
	}
	waitSignal("app")
	return nil
}

func probe(url string) string {
	c := http.Client{Timeout: 2 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return "error " + err.Error()
	}
	resp.Body.Close()
	return "status " + strconv.Itoa(resp.StatusCode)
}

func writeCmd(args []string) error {
	fl := flag.NewFlagSet("write", flag.ExitOnError)
	dir := fl.String("dir", env("APP_DATA_DIR", "/data"), "data directory (the synced emptyDir)")
	logf := fl.String("log", env("APP_LOG_FILE", "/logs/app.log"), "log file the lines are appended to")
	files := fl.Int("files", 0, "number of files, spread over nested directories")
	large := fl.Int("large-kib", 0, "size of one extra large file in KiB (0 = none)")
	lines := fl.Int("lines", 0, "number of log lines")
	batch := fl.String("batch", "b1", "name of this batch: prefixes file names and log lines")
	fl.Parse(args)
	return write(os.Stdout, *dir, *logf, *files, *large, *lines, *batch)
}

// write creates the files with random content (so a byte-identical restore is meaningful) and
// prints their sums, then appends the log lines. Files are written in place and closed, which is
// how ordinary upload apps behave.
func write(out io.Writer, dir, logFile string, files, largeKiB, lines int, batch string) error {
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 7))
	put := func(rel string, size int) error {
		p := filepath.Join(dir, rel)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return err
		}
		f, err := os.Create(p)
		if err != nil {
			return err
		}
		h := sha256.New()
		buf := make([]byte, 64<<10)
		for left := size; left > 0; {
			n := min(left, len(buf))
			for i := range buf[:n] {
				buf[i] = byte(rng.Uint32())
			}
			f.Write(buf[:n])
			h.Write(buf[:n])
			left -= n
		}
		if err := f.Close(); err != nil {
			return err
		}
		fmt.Fprintf(out, "wrote %s  %s\n", hex.EncodeToString(h.Sum(nil)), rel)
		return nil
	}
	for i := range files {
		rel := filepath.Join(batch, fmt.Sprintf("d%d", i%3), fmt.Sprintf("sub%d", i%2), fmt.Sprintf("file-%03d.bin", i))
		if err := put(rel, 1+rng.IntN(64<<10)); err != nil {
			return err
		}
	}
	if largeKiB > 0 {
		if err := put(filepath.Join(batch, "large.bin"), largeKiB<<10); err != nil {
			return err
		}
	}
	if lines > 0 {
		if err := os.MkdirAll(filepath.Dir(logFile), 0o755); err != nil {
			return err
		}
		f, err := os.OpenFile(logFile, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
		if err != nil {
			return err
		}
		w := bufio.NewWriter(f)
		for i := range lines {
			fmt.Fprintf(w, "%s upload-app %s line %06d\n", stamp(), batch, i)
		}
		if err := w.Flush(); err != nil {
			return err
		}
		if err := f.Close(); err != nil {
			return err
		}
		fmt.Fprintf(out, "logged %d lines to %s\n", lines, logFile)
	}
	return nil
}

// handler serves the data directory: uploads (PUT), downloads (GET), batches (POST /write). Paths
// stay inside dir (os.Root); a file is answered only once written and closed.
func handler(dir string) http.Handler {
	mux := http.NewServeMux()
	// any other path: "ok", for the workloads' own probes (files-api's readiness GET /ready...)
	mux.HandleFunc("/", func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok\n") })
	mux.HandleFunc("PUT /files/{path...}", func(w http.ResponseWriter, r *http.Request) {
		rel := r.PathValue("path")
		sum, err := putFile(dir, rel, r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		fmt.Printf("%s stored %s  %s\n", stamp(), sum, rel)
		fmt.Fprintf(w, "%s  %s\n", sum, rel)
	})
	mux.HandleFunc("GET /files/{path...}", func(w http.ResponseWriter, r *http.Request) {
		root, err := os.OpenRoot(dir)
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		defer root.Close()
		f, err := root.Open(r.PathValue("path"))
		if err != nil {
			http.Error(w, err.Error(), http.StatusNotFound)
			return
		}
		defer f.Close()
		if st, err := f.Stat(); err != nil || !st.Mode().IsRegular() {
			http.Error(w, "not a file", http.StatusNotFound)
			return
		}
		io.Copy(w, f)
	})
	mux.HandleFunc("POST /write", func(w http.ResponseWriter, r *http.Request) {
		n, _ := strconv.Atoi(r.FormValue("files"))
		large, _ := strconv.Atoi(r.FormValue("large-kib"))
		batch := r.FormValue("batch")
		if batch == "" {
			batch = "http"
		}
		if err := write(w, dir, env("APP_LOG_FILE", "/logs/app.log"), n, large, 0, batch); err != nil {
			fmt.Fprintf(w, "error: %v\n", err)
		}
	})
	return mux
}

func putFile(dir, rel string, body io.Reader) (string, error) {
	root, err := os.OpenRoot(dir)
	if err != nil {
		return "", err
	}
	defer root.Close()
	if d := filepath.Dir(rel); d != "." {
		if err := root.MkdirAll(d, 0o755); err != nil {
			return "", err
		}
	}
	f, err := root.Create(rel)
	if err != nil {
		return "", err
	}
	h := sha256.New()
	if _, err := io.Copy(io.MultiWriter(f, h), body); err != nil {
		f.Close()
		return "", err
	}
	if err := f.Close(); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

func printSums(w io.Writer, dir string) error {
	var out []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) && p == dir {
				return fs.SkipDir
			}
			return err
		}
		if !d.Type().IsRegular() {
			return nil
		}
		f, err := os.Open(p)
		if err != nil {
			return err
		}
		defer f.Close()
		h := sha256.New()
		if _, err := io.Copy(h, f); err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		out = append(out, hex.EncodeToString(h.Sum(nil))+"  "+rel)
		return nil
	})
	if err != nil {
		return err
	}
	sort.Strings(out)
	if len(out) > 0 {
		_, err = fmt.Fprintln(w, strings.Join(out, "\n"))
	}
	return err
}
