package qcow2

import (
	"encoding/binary"
	"errors"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/internal/qemutest"
)

// fill returns a loader that stamps the slice with its key and counts loads.
func fill(loads *atomic.Int64) func(key uint64) func([]byte) error {
	return func(key uint64) func([]byte) error {
		return func(buf []byte) error {
			loads.Add(1)
			binary.BigEndian.PutUint64(buf, key)
			return nil
		}
	}
}

func TestCacheLRU(t *testing.T) {
	var loads atomic.Int64
	load := fill(&loads)
	c := newL2Cache(16*512, 512) // 16 slices, one shard
	if len(c.shards) != 1 || c.capacityBytes() != 16*512 {
		t.Fatalf("shards = %d, capacity = %d", len(c.shards), c.capacityBytes())
	}
	get := func(key uint64) {
		t.Helper()
		b, err := c.get(key, load(key))
		if err != nil || len(b) != 512 || binary.BigEndian.Uint64(b) != key {
			t.Fatalf("get(%#x) = %x..., %v", key, b[:8], err)
		}
	}
	for k := range uint64(16) {
		get(k * 512)
	}
	if loads.Load() != 16 || c.len() != 16 {
		t.Fatalf("loads = %d, len = %d; want 16, 16", loads.Load(), c.len())
	}
	get(0) // hit: 0 becomes the most recent, 512 the least
	if loads.Load() != 16 {
		t.Fatalf("hit loaded again")
	}
	get(100 * 512) // evicts 512
	if c.len() != 16 {
		t.Fatalf("len = %d after eviction, want 16", c.len())
	}
	get(0)
	if loads.Load() != 17 {
		t.Fatalf("slice 0 was evicted (loads = %d)", loads.Load())
	}
	get(512)
	if loads.Load() != 18 {
		t.Fatalf("slice 512 was not evicted (loads = %d)", loads.Load())
	}
	if hits, misses := c.stats(); hits != 2 || misses != 18 {
		t.Errorf("hits, misses = %d, %d; want 2, 18", hits, misses)
	}
}

func TestCacheBound(t *testing.T) {
	tests := []struct {
		capacity   int64
		slice      int
		wantSlices int64 // at least
		wantMax    int64 // bytes, at most
	}{
		{0, 4096, minCacheSlices, minCacheSlices * 4096},
		{1 << 20, 4096, 256, 1 << 20},
		{32 << 20, 4096, 8192, 32 << 20},
		{100 << 10, 512, 200, 100 << 10},
	}
	for _, tc := range tests {
		c := newL2Cache(tc.capacity, tc.slice)
		got := c.capacityBytes()
		if got < tc.wantSlices*int64(tc.slice) || got > tc.wantMax+int64(len(c.shards)*tc.slice) {
			t.Errorf("newL2Cache(%d, %d): capacity %d bytes in %d shards", tc.capacity, tc.slice, got, len(c.shards))
		}
		var loads atomic.Int64
		load := fill(&loads)
		for k := range uint64(3 * got / int64(tc.slice)) {
			if _, err := c.get(k*uint64(tc.slice), load(k*uint64(tc.slice))); err != nil {
				t.Fatal(err)
			}
		}
		if n := int64(c.len()) * int64(tc.slice); n > got {
			t.Errorf("newL2Cache(%d, %d) holds %d bytes, capacity %d", tc.capacity, tc.slice, n, got)
		}
	}
}

func TestDefaultCacheSize(t *testing.T) {
	tests := []struct {
		size  int64
		bits  uint
		entry int
		want  int64
	}{
		{1 << 30, 16, 8, 128 << 10},  // 1 GiB, 64 KiB clusters: 16384 entries
		{1 << 40, 16, 8, 32 << 20},   // 1 TiB: capped
		{256 << 30, 16, 8, 32 << 20}, // exactly the cap
		{1 << 30, 16, 16, 256 << 10}, // extended L2 entries
		{1000, 9, 8, 16},             // 2 clusters
		{0, 16, 8, 0},
	}
	for _, tc := range tests {
		if got := defaultCacheSize(tc.size, tc.bits, tc.entry); got != tc.want {
			t.Errorf("defaultCacheSize(%d, %d, %d) = %d, want %d", tc.size, tc.bits, tc.entry, got, tc.want)
		}
	}
}

func TestCacheLoadError(t *testing.T) {
	c := newL2Cache(1<<20, 4096)
	boom := errors.New("boom")
	if _, err := c.get(4096, func([]byte) error { return boom }); !errors.Is(err, boom) {
		t.Fatalf("get = %v, want boom", err)
	}
	if c.len() != 0 {
		t.Fatalf("failed load cached")
	}
	var loads atomic.Int64
	if _, err := c.get(4096, fill(&loads)(4096)); err != nil || loads.Load() != 1 {
		t.Fatalf("retry after error: %v, loads %d", err, loads.Load())
	}
}

// TestCacheSingleLoad checks that concurrent misses on one slice load it
// once, and that a slow load does not block other slices.
func TestCacheSingleLoad(t *testing.T) {
	c := newL2Cache(1<<20, 4096)
	var loads atomic.Int64
	release := make(chan struct{})
	slow := func(buf []byte) error {
		loads.Add(1)
		<-release
		buf[0] = 7
		return nil
	}
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			b, err := c.get(0, slow)
			if err != nil || b[0] != 7 {
				t.Errorf("get = %v, %v", b[:1], err)
			}
		}()
	}
	// Another slice loads while slice 0 is stuck.
	done := make(chan struct{})
	go func() {
		var n atomic.Int64
		c.get(8192, fill(&n)(8192))
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("a stuck load blocked an unrelated slice")
	}
	time.Sleep(10 * time.Millisecond)
	close(release)
	wg.Wait()
	if loads.Load() != 1 {
		t.Errorf("slice loaded %d times, want 1", loads.Load())
	}
}

// TestCacheConcurrent hammers a small sharded cache from many goroutines
// (run with -race).
func TestCacheConcurrent(t *testing.T) {
	c := newL2Cache(512*4096, 4096) // several shards
	if len(c.shards) < 2 {
		t.Fatalf("%d shards", len(c.shards))
	}
	var loads atomic.Int64
	load := fill(&loads)
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			x := uint64(g)*7919 + 1
			for range 5000 {
				x = x*6364136223846793005 + 1442695040888963407
				key := (x >> 33) % 2000 * 4096
				b, err := c.get(key, load(key))
				if err != nil || binary.BigEndian.Uint64(b) != key {
					t.Errorf("get(%#x) = %x, %v", key, b[:8], err)
					return
				}
			}
		}()
	}
	wg.Wait()
	if n := c.len(); int64(n)*4096 > c.capacityBytes() {
		t.Errorf("%d slices cached, capacity %d bytes", n, c.capacityBytes())
	}
}

// TestImageCache checks the cache an Image sizes from its options, and
// that reading the disk twice hits the cache.
func TestImageCache(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	p := filepath.Join(t.TempDir(), "img.qcow2")
	qemutest.Create(t, p, "qcow2", "cluster_size=4096", "16M") // 4096 L2 entries: 32 KiB
	qemutest.IO(t, p, "qcow2", "write -P 0x11 0 16M")
	tests := []struct {
		cacheSize int64
		want      int64 // capacity in bytes
	}{
		{0, minCacheSlices * 4096}, // 32 KiB cover the disk; the minimum is 64 KiB
		{1 << 20, 1 << 20},
	}
	for _, tc := range tests {
		img := openImage(t, p, disk.OpenOptions{ReadOnly: true, CacheSize: tc.cacheSize})
		if got := img.cache.capacityBytes(); got != tc.want {
			t.Errorf("CacheSize %d: capacity %d, want %d", tc.cacheSize, got, tc.want)
		}
		buf := make([]byte, 1<<20)
		for pass := range 2 {
			for off := int64(0); off < img.Size(); off += int64(len(buf)) {
				if _, err := img.ReadAt(buf, off); err != nil {
					t.Fatal(err)
				}
			}
			hits, misses := img.cache.stats()
			if misses != 8 { // 32 KiB of L2 table in 4 KiB slices, loaded once
				t.Errorf("CacheSize %d pass %d: %d misses, want 8", tc.cacheSize, pass, misses)
			}
			if pass == 1 && hits == 0 {
				t.Errorf("CacheSize %d: no hits on the second pass", tc.cacheSize)
			}
		}
	}
}
