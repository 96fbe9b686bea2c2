package convert

import (
	"context"
	"fmt"
	"io"
	"sync"

	"github.com/imgloop/imgloop/disk"
)

// ClusterWriter is the destination of Clusters: an image written one
// cluster at a time in increasing order, such as a qcow2.StreamWriter.
// Clusters never written read as zeros.
type ClusterWriter interface {
	// ClusterSize returns the size of a cluster, a power of two.
	ClusterSize() int
	// WriteCluster stores guest cluster index (data: one cluster).
	WriteCluster(index int64, data []byte) error
	// WriteCompressed stores guest cluster index as compressed, the
	// output of Compress.
	WriteCompressed(index int64, compressed []byte) error
	// Compress appends data (one cluster) compressed to dst, or reports
	// false when compressing does not pay (store it uncompressed then).
	// It must be safe for concurrent use.
	Compress(dst, data []byte) ([]byte, bool)
}

// batch is one chunk of the disk on its way from a worker to the writer.
type batch struct {
	seq      int64
	off      int64 // virtual offset, cluster aligned
	n        int   // bytes of the disk it covers
	progress int64 // bytes of progress it accounts for
	buf      []byte
	comp     []byte        // compressed clusters, back to back
	clusters []clusterPart // what to do with each cluster of buf
}

// clusterPart says how a cluster of a batch is stored.
type clusterPart struct {
	skip       bool // all zeros: left unallocated
	compressed bool // comp[start:end] holds it
	start, end int
}

// Clusters copies the virtual disk of src into w, cluster by cluster in
// order: ranges the source maps as zeros and (unless opts.SparseSize is
// negative) clusters that read as all zeros are not written; with
// compress, the other clusters are compressed where that pays. Reading,
// zero detection and compression run on opts.Workers goroutines; one
// goroutine hands the clusters to w in order, through a reorder buffer of
// 2*Workers chunks of opts.ChunkSize (rounded to whole clusters) at most.
// Clusters does not close w.
//
// Errors: those of Options, of disk.Extents and src.ReadAt (wrapped with
// the offset), of w, or ctx.Err().
func Clusters(ctx context.Context, src disk.Image, w ClusterWriter, compress bool, opts Options) (Stats, error) {
	opts, err := opts.withDefaults()
	if err != nil {
		return Stats{}, err
	}
	cs := int64(w.ClusterSize())
	if cs < 512 || cs&(cs-1) != 0 {
		return Stats{}, fmt.Errorf("convert: cluster size %d is not a power of two >= 512", cs)
	}
	chunkSize := max(cs, int64(opts.ChunkSize)/cs*cs)
	size := src.Size()
	progress, stopPrefetch := startPrefetch(opts, size)
	defer stopPrefetch()
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	fail := func(err error) { cancel(err) }

	inflight := 2 * opts.Workers
	free := make(chan *batch, inflight)
	for range inflight {
		free <- &batch{}
	}
	jobs := make(chan *batch, inflight)
	results := make(chan *batch, inflight)
	var stats Stats

	// Workers: read, detect zeros, compress.
	var wg sync.WaitGroup
	var readMu sync.Mutex
	for range opts.Workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for b := range jobs {
				if ctx.Err() != nil {
					free <- b
					continue
				}
				if err := prepare(src, w, b, cs, chunkSize, compress, opts.SparseSize > 0); err != nil {
					fail(err)
					free <- b
					continue
				}
				readMu.Lock()
				stats.Read += int64(b.n)
				readMu.Unlock()
				results <- b
			}
		}()
	}

	// Writer: hands the batches to w in order.
	writerDone := make(chan struct{})
	go func() {
		defer close(writerDone)
		pending := map[int64]*batch{}
		next := int64(0)
		for b := range results {
			pending[b.seq] = b
			for {
				b, ok := pending[next]
				if !ok {
					break
				}
				delete(pending, next)
				next++
				if ctx.Err() == nil {
					n, err := store(w, b, cs)
					stats.Written += n
					if err != nil {
						fail(err)
					} else {
						progress(b.progress)
					}
				}
				free <- b
			}
		}
		for _, b := range pending {
			free <- b
		}
	}()

	// Dispatch: the data ranges of the map, widened to whole clusters,
	// in chunks aligned to chunkSize.
	var seq int64
	cursor := int64(0)   // end of the last chunk dispatched
	reported := int64(0) // progress reported or accounted for up to here
	walkErr := disk.Extents(src, 0, size, func(e disk.Extent) error {
		end := e.Offset + e.Length
		if e.Status&disk.StatusZero != 0 {
			if end > reported {
				progress(end - max(e.Offset, reported))
				reported = end
			}
			return ctx.Err()
		}
		stop := min(size, (end+cs-1)/cs*cs)
		for off := max(e.Offset/cs*cs, cursor); off < stop; {
			next := min(stop, (off/chunkSize+1)*chunkSize)
			var b *batch
			select {
			case b = <-free:
			case <-ctx.Done():
				return ctx.Err()
			}
			b.seq, b.off, b.n = seq, off, int(next-off)
			b.progress = next - max(off, reported)
			seq++
			reported, cursor = next, next
			jobs <- b // never blocks: at most inflight batches exist
			off = next
		}
		return nil
	})
	close(jobs)
	wg.Wait()
	close(results)
	<-writerDone

	if ctx.Err() != nil {
		return stats, context.Cause(ctx)
	}
	if walkErr != nil {
		return stats, fmt.Errorf("convert: mapping: %w", walkErr)
	}
	return stats, nil
}

// prepare reads batch b from src and decides how each of its clusters is
// stored.
func prepare(src disk.Image, w ClusterWriter, b *batch, cs, chunkSize int64, compress, sparse bool) error {
	if b.buf == nil {
		b.buf = make([]byte, chunkSize)
	}
	rounded := int((int64(b.n) + cs - 1) / cs * cs)
	buf := b.buf[:rounded]
	n, err := src.ReadAt(buf[:b.n], b.off)
	if err == io.EOF && n == b.n {
		err = nil
	}
	if err == nil && n != b.n {
		err = io.ErrUnexpectedEOF
	}
	if err != nil {
		return fmt.Errorf("convert: reading %d bytes at offset %d: %w", b.n, b.off, err)
	}
	clear(buf[b.n:]) // the end of the last cluster of a disk not a multiple of it
	b.comp = b.comp[:0]
	b.clusters = b.clusters[:0]
	for i := 0; i < rounded; i += int(cs) {
		c := buf[i : i+int(cs)]
		var part clusterPart
		switch {
		case sparse && isZero(c):
			part.skip = true
		case compress:
			start := len(b.comp)
			var ok bool
			if b.comp, ok = w.Compress(b.comp, c); ok {
				part = clusterPart{compressed: true, start: start, end: len(b.comp)}
			}
		}
		b.clusters = append(b.clusters, part)
	}
	return nil
}

// store writes batch b to w and returns the bytes stored.
func store(w ClusterWriter, b *batch, cs int64) (int64, error) {
	var written int64
	first := b.off / cs
	for i, part := range b.clusters {
		index := first + int64(i)
		var err error
		switch {
		case part.skip:
			continue
		case part.compressed:
			err = w.WriteCompressed(index, b.comp[part.start:part.end])
			written += int64(part.end - part.start)
		default:
			err = w.WriteCluster(index, b.buf[int64(i)*cs:int64(i+1)*cs])
			written += cs
		}
		if err != nil {
			return written, fmt.Errorf("convert: writing cluster %d: %w", index, err)
		}
	}
	return written, nil
}
