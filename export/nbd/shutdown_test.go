package nbd

import (
	"bytes"
	"context"
	"errors"
	"net"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/export/nbd/internal/wire"
	"github.com/imgloop/imgloop/internal/qemutest"
)

// gatedImage holds every read and write until gate is closed.
type gatedImage struct {
	disk.Image
	gate    chan struct{}
	started atomic.Int32
}

func (g *gatedImage) ReadAt(p []byte, off int64) (int, error) {
	g.started.Add(1)
	<-g.gate
	return g.Image.ReadAt(p, off)
}

func (g *gatedImage) WriteAt(p []byte, off int64) (int, error) {
	g.started.Add(1)
	<-g.gate
	return g.Image.WriteAt(p, off)
}

// waitStarted waits until n requests reached the image.
func (g *gatedImage) waitStarted(t *testing.T, n int32) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for g.started.Load() < n {
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d requests reached the image", g.started.Load(), n)
		}
		time.Sleep(time.Millisecond)
	}
}

// TestShutdownAnswersInFlight: Shutdown waits for the requests in flight
// (reads and writes blocked in the image), answers each of them, then
// closes the connection; Serve returns ErrServerClosed, new connections
// are refused, and the writes reached the image.
func TestShutdownAnswersInFlight(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	p := filepath.Join(t.TempDir(), "s.qcow2")
	qemutest.Create(t, p, "qcow2", "", "4M")
	base := openImage(t, p, "qcow2", false)
	img := &gatedImage{Image: base, gate: make(chan struct{})}
	s := startServer(t, []Export{{Image: img}}, Options{})
	r := dialRaw(t, s.sock)
	r.start(true, false)
	const reads, writes = 6, 4
	data := bytes.Repeat([]byte{0xc3}, 4096)
	for i := range reads {
		r.request(wire.Request{Type: wire.CmdRead, Cookie: uint64(i), Offset: uint64(i) << 12, Length: 4096}, false, nil)
	}
	for i := range writes {
		r.request(wire.Request{Type: wire.CmdWrite, Cookie: uint64(100 + i), Offset: uint64(1<<20 + i<<12), Length: 4096}, false, data)
	}
	img.waitStarted(t, reads+writes)

	done := make(chan error, 1)
	go func() { done <- s.Shutdown(context.Background()) }()
	select {
	case err := <-done:
		t.Fatalf("Shutdown returned with requests in flight: %v", err)
	case <-time.After(200 * time.Millisecond):
	}
	// New connections are refused once Shutdown began.
	if nc, err := net.DialTimeout("unix", s.sock, time.Second); err == nil {
		nc.SetReadDeadline(time.Now().Add(2 * time.Second))
		var b [1]byte
		if n, _ := nc.Read(b[:]); n > 0 {
			t.Error("a new connection got a greeting after Shutdown")
		}
		nc.Close()
	}
	close(img.gate)

	answered := map[uint64]bool{}
	for range reads + writes {
		cookie, errno, _, _ := r.reply(false)
		if errno != 0 {
			t.Errorf("request %d: %s during a graceful shutdown", cookie, wire.ErrorName(errno))
		}
		answered[cookie] = true
	}
	if len(answered) != reads+writes {
		t.Errorf("%d distinct replies, want %d", len(answered), reads+writes)
	}
	if !r.closed() {
		t.Error("connection still open after Shutdown")
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Shutdown: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Shutdown did not return after the requests were answered")
	}
	got := make([]byte, writes*4096)
	if _, err := base.ReadAt(got, 1<<20); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, bytes.Repeat(data, writes)) {
		t.Error("writes answered during Shutdown did not reach the image")
	}
}

// TestShutdownDeadline: a request stuck in the image past Shutdown's
// context makes Shutdown close the connection by force and return the
// context's error.
func TestShutdownDeadline(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	p := filepath.Join(t.TempDir(), "s.qcow2")
	qemutest.Create(t, p, "qcow2", "", "4M")
	img := &gatedImage{Image: openImage(t, p, "qcow2", true), gate: make(chan struct{})}
	defer close(img.gate)
	s := startServer(t, []Export{{Image: img}}, Options{})
	r := dialRaw(t, s.sock)
	r.start(true, false)
	r.request(wire.Request{Type: wire.CmdRead, Cookie: 1, Length: 4096}, false, nil)
	img.waitStarted(t, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	finished := make(chan error, 1)
	go func() { finished <- s.Shutdown(ctx) }()
	if !r.closed() {
		t.Error("connection still open after a forced Shutdown")
	}
	// The read stays blocked in the image until the test ends: Shutdown
	// itself waits for the connection's goroutines, so release them.
	img.gate <- struct{}{}
	select {
	case err := <-finished:
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("Shutdown: %v, want the context's deadline", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("forced Shutdown did not return")
	}
}
