package convert

import (
	"fmt"
	"runtime"
)

// Defaults used for zero fields of Options.
const (
	// DefaultChunkSize is the read size: large enough that per-call costs
	// (map lookups, syscalls) vanish, small enough that Workers buffers stay
	// a few MiB. qemu-img convert uses 2 MiB.
	DefaultChunkSize = 1 << 20
	// DefaultSparseSize is the zero-detection granularity, qemu-img
	// convert's default for -S (4 KiB, the usual file system block).
	DefaultSparseSize = 4096
	// MaxChunkSize bounds ChunkSize (memory use is Workers*ChunkSize).
	MaxChunkSize = 64 << 20
	// MaxWorkers bounds Workers.
	MaxWorkers = 256
)

// Options tune Raw; the zero value picks the defaults.
type Options struct {
	// Workers is the number of concurrent readers; 0 means DefaultWorkers().
	Workers int
	// ChunkSize is the size of one read, a multiple of SparseSize; chunks
	// are aligned to it in the virtual disk. 0 means DefaultChunkSize.
	ChunkSize int
	// SparseSize is the granularity at which all-zero data is detected and
	// left as a hole, a power of two >= 512; 0 means DefaultSparseSize.
	// Negative disables zero detection (every data extent is written).
	SparseSize int
	// Progress, if set, is called with the number of bytes of the virtual
	// disk just handled (copied or skipped); the calls add up to the disk
	// size on success. It is called from several goroutines at once.
	Progress func(n int64)
	// Prefetch lists host files of the source (the image file, its data
	// file) to read into the page cache ahead of the copy, in step with its
	// progress (see Prefetch). Empty: no prefetching.
	Prefetch []string
	// Backed (Clusters only) says that the destination has a backing file
	// holding the same data as the source's backing chain, as with
	// qemu-img convert -B: clusters that the source's top layer leaves to
	// its backing file (extents of Depth > 0) stay unallocated, so that
	// they read through the destination's backing file, and the other
	// clusters that read as zeros become zero clusters rather than
	// unallocated ones, which would expose the backing file.
	Backed bool
	// BackingSize is the size of the destination's backing file (with
	// Backed): past it, unallocated clusters read as zeros, so clusters
	// the source maps as zeros there stay unallocated too.
	BackingSize int64
}

// DefaultWorkers returns the default worker count: two per CPU (so that
// one worker's I/O overlaps another's decompression), at least 4.
func DefaultWorkers() int {
	return max(4, 2*runtime.GOMAXPROCS(0))
}

// Validate reports an error if a field of o is out of range (zero fields
// are fine: they pick the defaults).
func (o Options) Validate() error {
	_, err := o.withDefaults()
	return err
}

// withDefaults returns opts with zero fields filled in, or an error for
// values out of range.
func (o Options) withDefaults() (Options, error) {
	if o.Workers == 0 {
		o.Workers = DefaultWorkers()
	}
	if o.ChunkSize == 0 {
		o.ChunkSize = DefaultChunkSize
	}
	if o.SparseSize == 0 {
		o.SparseSize = DefaultSparseSize
	}
	if o.Workers < 1 || o.Workers > MaxWorkers {
		return o, fmt.Errorf("convert: workers %d out of range 1..%d", o.Workers, MaxWorkers)
	}
	if o.SparseSize > 0 && (o.SparseSize < 512 || o.SparseSize&(o.SparseSize-1) != 0) {
		return o, fmt.Errorf("convert: sparse size %d is not a power of two >= 512", o.SparseSize)
	}
	if o.ChunkSize < 512 || o.ChunkSize > MaxChunkSize || (o.SparseSize > 0 && o.ChunkSize%o.SparseSize != 0) {
		return o, fmt.Errorf("convert: chunk size %d is not a multiple of the sparse size within 512..%d", o.ChunkSize, MaxChunkSize)
	}
	return o, nil
}
