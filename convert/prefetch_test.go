package convert

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"
)

// TestPrefetch checks that the prefetcher follows progress to the end of
// the file, stops when told, and tolerates a missing file.
func TestPrefetch(t *testing.T) {
	path := filepath.Join(t.TempDir(), "src")
	if err := os.WriteFile(path, make([]byte, 3*prefetchStep+100), 0o644); err != nil {
		t.Fatal(err)
	}
	var calls atomic.Int64
	p := Prefetch(path, prefetchStep, func() float64 { calls.Add(1); return 1 })
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		t.Fatal("prefetcher did not finish a fully consumed file")
	}
	p.Stop()
	if calls.Load() == 0 {
		t.Error("progress never consulted")
	}

	// Never any progress: it waits, and Stop ends it.
	p = Prefetch(path, 1, func() float64 { return 0 })
	time.Sleep(10 * time.Millisecond)
	p.Stop()

	Prefetch(filepath.Join(t.TempDir(), "missing"), 0, func() float64 { return 0 }).Stop()
}

// TestRawPrefetch runs a conversion with prefetching on.
func TestRawPrefetch(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "host")
	src := newImage()
	if err := os.WriteFile(path, src.data, 0o644); err != nil {
		t.Fatal(err)
	}
	dst := &memDst{data: make([]byte, src.Size()), failAt: -1}
	if _, err := Raw(context.Background(), src, dst, Options{Prefetch: []string{path, filepath.Join(dir, "missing")}}); err != nil {
		t.Fatal(err)
	}
	want := bytes.Clone(src.data)
	clear(want[3<<20:])
	if !bytes.Equal(dst.data, want) {
		t.Error("output differs")
	}
}
