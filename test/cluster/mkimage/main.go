// Command mkimage writes a one-layer OCI image archive holding a single static binary, for
// `ctr images import`. The offline node cannot pull anything, and the sandbox ("pause") image and
// the e2e test app need no base image, so a tar of one file is all an image has to be; the
// standard library is enough, which keeps a container-tool dependency out of the module.
//
//	mkimage -bin FILE -path /app [-entrypoint /app,arg] [-user 65532:65532] -out IMAGE.tar NAME...
package main

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"
)

type descriptor struct {
	MediaType   string            `json:"mediaType"`
	Digest      string            `json:"digest"`
	Size        int64             `json:"size"`
	Annotations map[string]string `json:"annotations,omitempty"`
	Platform    map[string]string `json:"platform,omitempty"`
}

func main() {
	bin := flag.String("bin", "", "static binary to put in the image")
	path := flag.String("path", "", "absolute path of the binary inside the image")
	entry := flag.String("entrypoint", "", "comma-separated entrypoint (default: -path)")
	user := flag.String("user", "65532:65532", "user:group the image runs as")
	out := flag.String("out", "", "output OCI archive")
	flag.Parse()
	if *bin == "" || !strings.HasPrefix(*path, "/") || *out == "" || flag.NArg() == 0 {
		fmt.Fprintln(os.Stderr, "usage: mkimage -bin FILE -path /ABS [-entrypoint a,b] [-user U:G] -out FILE.tar NAME...")
		os.Exit(2)
	}
	if err := run(*bin, *path, *entry, *user, *out, flag.Args()); err != nil {
		fmt.Fprintln(os.Stderr, "mkimage:", err)
		os.Exit(1)
	}
}

func run(bin, path, entry, user, out string, names []string) error {
	data, err := os.ReadFile(bin)
	if err != nil {
		return err
	}
	// A fixed timestamp keeps the layer digest stable across builds of the same binary.
	epoch := time.Unix(0, 0)
	var layer bytes.Buffer
	tw := tar.NewWriter(&layer)
	// /tmp is world-writable like in distroless: Go's os.TempDir must work as a non-root user.
	hdrs := []*tar.Header{{Name: "tmp/", Typeflag: tar.TypeDir, Mode: 0o1777, ModTime: epoch}}
	dir := strings.TrimPrefix(path[:strings.LastIndex(path, "/")+1], "/")
	for i := 0; i < len(dir); i++ {
		if dir[i] == '/' {
			hdrs = append(hdrs, &tar.Header{Name: dir[:i+1], Typeflag: tar.TypeDir, Mode: 0o755, ModTime: epoch})
		}
	}
	for _, h := range hdrs {
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
	}
	if err := tw.WriteHeader(&tar.Header{Name: strings.TrimPrefix(path, "/"), Typeflag: tar.TypeReg, Mode: 0o755, Size: int64(len(data)), ModTime: epoch}); err != nil {
		return err
	}
	if _, err := tw.Write(data); err != nil {
		return err
	}
	if err := tw.Close(); err != nil {
		return err
	}

	ep := []string{path}
	if entry != "" {
		ep = strings.Split(entry, ",")
	}
	blobs := map[string][]byte{}
	add := func(mt string, b []byte) descriptor {
		sum := sha256.Sum256(b)
		d := "sha256:" + hex.EncodeToString(sum[:])
		blobs[d] = b
		return descriptor{MediaType: mt, Digest: d, Size: int64(len(b))}
	}
	layerDesc := add("application/vnd.oci.image.layer.v1.tar", layer.Bytes())
	cfg, _ := json.Marshal(map[string]any{
		"architecture": "amd64",
		"os":           "linux",
		"created":      epoch.UTC().Format(time.RFC3339),
		"config":       map[string]any{"Entrypoint": ep, "User": user, "Env": []string{"PATH=/"}},
		"rootfs":       map[string]any{"type": "layers", "diff_ids": []string{layerDesc.Digest}},
	})
	cfgDesc := add("application/vnd.oci.image.config.v1+json", cfg)
	manifest, _ := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     "application/vnd.oci.image.manifest.v1+json",
		"config":        cfgDesc,
		"layers":        []descriptor{layerDesc},
	})
	manDesc := add("application/vnd.oci.image.manifest.v1+json", manifest)
	var index struct {
		SchemaVersion int          `json:"schemaVersion"`
		MediaType     string       `json:"mediaType"`
		Manifests     []descriptor `json:"manifests"`
	}
	index.SchemaVersion, index.MediaType = 2, "application/vnd.oci.image.index.v1+json"
	for _, n := range names {
		d := manDesc
		// containerd names the imported image after io.containerd.image.name; ref.name is the OCI spelling.
		d.Annotations = map[string]string{"io.containerd.image.name": n, "org.opencontainers.image.ref.name": n}
		d.Platform = map[string]string{"architecture": "amd64", "os": "linux"}
		index.Manifests = append(index.Manifests, d)
	}
	idx, _ := json.Marshal(index)

	f, err := os.Create(out + ".tmp")
	if err != nil {
		return err
	}
	defer os.Remove(out + ".tmp")
	aw := tar.NewWriter(f)
	file := func(name string, b []byte) error {
		if err := aw.WriteHeader(&tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(b)), ModTime: epoch}); err != nil {
			return err
		}
		_, err := aw.Write(b)
		return err
	}
	if err := file("oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`)); err != nil {
		return err
	}
	if err := file("index.json", idx); err != nil {
		return err
	}
	for d, b := range blobs {
		if err := file("blobs/sha256/"+strings.TrimPrefix(d, "sha256:"), b); err != nil {
			return err
		}
	}
	if err := aw.Close(); err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if _, err := io.WriteString(os.Stdout, fmt.Sprintf("%s: %s (%d bytes layer)\n", out, strings.Join(names, " "), layer.Len())); err != nil {
		return err
	}
	return os.Rename(out+".tmp", out)
}
