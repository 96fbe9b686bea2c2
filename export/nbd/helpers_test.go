package nbd

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/imgloop/imgloop/disk"
	_ "github.com/imgloop/imgloop/disk/qcow2"
	_ "github.com/imgloop/imgloop/disk/raw"
)

// shortDir returns a temporary directory with a short path (unix socket
// paths are limited to 108 bytes; t.TempDir's can be longer).
func shortDir(t testing.TB) string {
	t.Helper()
	d, err := os.MkdirTemp("", "nbd")
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

// testServer is a server on a unix socket, shut down at cleanup.
type testServer struct {
	*Server
	sock string
}

// uri returns the nbd+unix URI of the named export.
func (s *testServer) uri(name string) string {
	return "nbd+unix:///" + name + "?socket=" + s.sock
}

// startServer serves exports on a new unix socket.
func startServer(t testing.TB, exports []Export, opts Options) *testServer {
	t.Helper()
	if opts.Logf == nil {
		opts.Logf = func(format string, args ...any) { t.Logf("server: "+format, args...) }
	}
	srv, err := NewServer(exports, opts)
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(shortDir(t), "s")
	ln, err := net.Listen("unix", sock)
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
		if err := <-done; err != ErrServerClosed {
			t.Errorf("Serve: %v", err)
		}
	})
	return &testServer{srv, sock}
}
