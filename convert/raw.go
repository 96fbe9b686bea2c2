package convert

import (
	"context"
	"fmt"
	"io"
	"sync"
	"sync/atomic"

	"github.com/imgloop/imgloop/disk"
)

// Stats summarises a conversion.
type Stats struct {
	// Read is the number of bytes read from the source (data extents).
	Read int64
	// Written is the number of bytes written to the destination; the rest
	// of the disk was left as holes.
	Written int64
}

// chunk is one read job: [off, off+n) of the virtual disk.
type chunk struct {
	off int64
	n   int
}

// Raw copies the virtual disk of src to dst as a raw image: byte i of the
// disk goes to offset i of dst. dst must already read as zeros over
// [0, src.Size()) (a new or freshly truncated file, sized by the caller);
// Raw writes only the non-zero parts and never extends dst itself beyond
// the data it writes, nor syncs it.
//
// Errors: those of Options (out of range), of disk.Extents and src.ReadAt
// (wrapped with the offset), of dst.WriteAt, or ctx.Err().
func Raw(ctx context.Context, src disk.Image, dst io.WriterAt, opts Options) (Stats, error) {
	opts, err := opts.withDefaults()
	if err != nil {
		return Stats{}, err
	}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)

	var (
		stats   Stats
		read    atomic.Int64
		written atomic.Int64
		wg      sync.WaitGroup
		jobs    = make(chan chunk, 2*opts.Workers)
	)
	size := src.Size()
	progress, stopPrefetch := startPrefetch(opts, size)
	defer stopPrefetch()
	fail := func(err error) { cancel(err) }

	for range opts.Workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, opts.ChunkSize)
			for c := range jobs {
				if ctx.Err() != nil {
					continue // drain
				}
				b := buf[:c.n]
				n, err := src.ReadAt(b, c.off)
				if err == nil && n != len(b) {
					err = io.ErrUnexpectedEOF
				}
				if err != nil {
					fail(fmt.Errorf("convert: reading %d bytes at offset %d: %w", len(b), c.off, err))
					continue
				}
				read.Add(int64(n))
				w, err := writeSparse(dst, b, c.off, opts.SparseSize)
				written.Add(w)
				if err != nil {
					fail(err)
					continue
				}
				progress(int64(c.n))
			}
		}()
	}

	chunkSize := int64(opts.ChunkSize)
	walkErr := disk.Extents(src, 0, size, func(e disk.Extent) error {
		if e.Status&disk.StatusZero != 0 {
			progress(e.Length)
			return ctx.Err()
		}
		for off, end := e.Offset, e.Offset+e.Length; off < end; {
			next := min(end, (off/chunkSize+1)*chunkSize)
			select {
			case jobs <- chunk{off: off, n: int(next - off)}:
			case <-ctx.Done():
				return ctx.Err()
			}
			off = next
		}
		return nil
	})
	close(jobs)
	wg.Wait()
	stats.Read, stats.Written = read.Load(), written.Load()

	// A worker's error is the cancellation's cause; it beats the context
	// error the walk returned because of it.
	if ctx.Err() != nil {
		return stats, context.Cause(ctx)
	}
	if walkErr != nil {
		return stats, fmt.Errorf("convert: mapping: %w", walkErr)
	}
	return stats, nil
}
