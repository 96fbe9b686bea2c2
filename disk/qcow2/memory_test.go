package qcow2

import (
	"math/rand/v2"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/imgloop/imgloop/internal/qemutest"
)

// memoryBound is the most heap a writer of the image below may use
// (beyond what the test itself holds): the L1 table (2 MiB here), the L2
// slice cache (at most 32 MiB, QEMU's default), pinned dirty slices,
// the refcount blocks held (maxRefblockBytes) and the metadata bitmap.
const memoryBound = 64 << 20

// TestWriteMemoryBounded runs a long random workload (scattered writes
// allocating clusters, L2 tables and refcount blocks, discards, flushes)
// on a large lazy-refcounts image with 512-byte clusters and 64-bit
// refcounts (a refcount block then covers only 32 KiB of the file), and
// checks that the refcount blocks held in memory and the process's heap
// stay bounded: with lazy refcounts they used to stay loaded until
// Close, about 4 GiB per TiB of image with 512-byte clusters.
func TestWriteMemoryBounded(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	p := filepath.Join(t.TempDir(), "big.qcow2")
	qemutest.Create(t, p, "qcow2", "cluster_size=512,lazy_refcounts=on,refcount_bits=64", "8G")
	img := openRW(t, p)
	defer img.Close()
	writes := 12000
	if testing.Short() || raceEnabled {
		writes = 1500
	}
	r := rand.New(rand.NewPCG(42, 1))
	buf := make([]byte, 64<<10)
	for i := range buf {
		buf[i] = byte(i*7 + 1)
	}
	var base runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&base)
	peak := uint64(0)
	maxBlocks := 0
	size := img.Size()
	for i := 0; i < writes; i++ {
		off := r.Int64N(size/512-128) * 512
		if _, err := img.WriteAt(buf, off); err != nil {
			t.Fatalf("write %d at %d: %v", i, off, err)
		}
		if i%4 == 3 {
			// Free clusters low in the file, so that the free-cluster
			// search walks the refcount blocks from there.
			if err := img.Discard(r.Int64N(size/512-128)*512, 64<<10); err != nil {
				t.Fatal(err)
			}
		}
		if i%500 == 499 {
			if err := img.Flush(); err != nil {
				t.Fatal(err)
			}
		}
		img.w.mu.Lock()
		maxBlocks = max(maxBlocks, len(img.w.alloc.blocks))
		img.w.mu.Unlock()
		if i%250 == 0 {
			var ms runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&ms)
			peak = max(peak, ms.HeapInuse)
		}
	}
	fileSize, _ := img.f.Size()
	limit := max(maxCleanRefblocks, maxRefblockBytes/512)
	t.Logf("%d writes of 64 KiB: file %d MiB, at most %d refcount blocks held (limit %d), heap peak %d MiB over %d MiB",
		writes, fileSize>>20, maxBlocks, limit, (peak-min(peak, base.HeapInuse))>>20, base.HeapInuse>>20)
	// Between limitDirty calls an allocating write may load a few more.
	if maxBlocks > limit+1024 {
		t.Errorf("%d refcount blocks held, more than the limit %d", maxBlocks, limit)
	}
	if peak > base.HeapInuse+memoryBound {
		t.Errorf("heap peaked at %d MiB over the start, more than %d MiB", (peak-base.HeapInuse)>>20, memoryBound>>20)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if res := qemuCheck(t, p); res.Leaks != 0 {
		t.Errorf("qemu-img check: %d leaks", res.Leaks)
	}
}
