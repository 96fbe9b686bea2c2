package client

import (
	"bytes"
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/imgloop/imgloop/disk"
	_ "github.com/imgloop/imgloop/disk/qcow2"
	_ "github.com/imgloop/imgloop/disk/raw"
	"github.com/imgloop/imgloop/export/nbd"
	"github.com/imgloop/imgloop/export/nbd/internal/wire"
	"github.com/imgloop/imgloop/internal/qemutest"
)

// shortDir returns a temporary directory with a short path (unix socket
// paths are limited to 108 bytes; t.TempDir's can be longer).
func shortDir(t testing.TB) string {
	t.Helper()
	d, err := os.MkdirTemp("", "c")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// openImage opens path for a test, closing it at cleanup.
func openImage(t testing.TB, path, format string, readOnly bool) disk.Image {
	t.Helper()
	img, err := disk.Open(path, disk.OpenOptions{Format: format, ReadOnly: readOnly})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { img.Close() })
	return img
}

// server is one of our servers on a listener.
type server struct {
	*nbd.Server
	network, addr string
}

// startServer serves exports on a new unix socket ("unix") or TCP
// loopback port ("tcp"), shut down at cleanup.
func startServer(t testing.TB, network string, exports []nbd.Export, opts nbd.Options) *server {
	t.Helper()
	if opts.Logf == nil {
		opts.Logf = func(format string, args ...any) { t.Logf("server: "+format, args...) }
	}
	srv, err := nbd.NewServer(exports, opts)
	if err != nil {
		t.Fatal(err)
	}
	addr := "127.0.0.1:0"
	if network == "unix" {
		addr = filepath.Join(shortDir(t), "s")
	}
	ln, err := net.Listen(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ln) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
		if err := <-done; err != nbd.ErrServerClosed {
			t.Errorf("Serve: %v", err)
		}
	})
	return &server{srv, network, ln.Addr().String()}
}

// dial connects to s, closing the connection at cleanup.
func (s *server) dial(t testing.TB, opts Options) *Conn {
	t.Helper()
	return dialAt(t, s.network, s.addr, opts)
}

// dialAt connects to addr, closing the connection at cleanup.
func dialAt(t testing.TB, network, addr string, opts Options) *Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := Dial(ctx, network, addr, opts)
	if err != nil {
		t.Fatalf("Dial(%s %s): %v", network, addr, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// mode is one of the three reply modes.
type mode struct {
	name string
	opts Options
}

var allContexts = []string{wire.ContextBaseAllocation, wire.ContextAllocationDepth}

// modes are the header modes a client can negotiate.
var modes = []mode{
	{"simple", Options{}},
	{"structured", Options{StructuredReplies: true, MetaContexts: allContexts}},
	{"extended", Options{ExtendedHeaders: true, MetaContexts: allContexts}},
}

// makeQcow2 makes a qcow2 image with data, zeros, a discarded range and
// compressed clusters, written by qemu-io.
func makeQcow2(t testing.TB, dir, size string) string {
	t.Helper()
	p := filepath.Join(dir, "img.qcow2")
	qemutest.Create(t, p, "qcow2", "cluster_size=65536", size)
	qemutest.IO(t, p, "qcow2",
		"write -P 0xaa 0 1M", "write -P 0x55 3M 64k", "write -z 1M 128k",
		"write -c -P 0x11 8M 256k", "discard 0 64k", "write -P 0x77 4097k 3k")
	return p
}

// readAll reads the whole export in pieces of chunk bytes.
func readAll(t testing.TB, img disk.Image, chunk int) []byte {
	t.Helper()
	b := make([]byte, img.Size())
	for off := 0; off < len(b); off += chunk {
		n := min(chunk, len(b)-off)
		if _, err := img.ReadAt(b[off:off+n], int64(off)); err != nil {
			t.Fatalf("ReadAt(%d at %d): %v", n, off, err)
		}
	}
	return b
}

// startProcess runs a server program until cleanup and waits for its
// unix socket sock to accept connections.
func startProcess(t testing.TB, sock, name string, args ...string) {
	t.Helper()
	qemutest.Require(t, name)
	cmd := exec.Command(name, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for deadline := time.Now().Add(10 * time.Second); ; {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not start: %s", name, stderr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}
