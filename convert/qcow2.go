package convert

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/imgloop/imgloop/disk"
)

// ClusterWriter is the destination of Clusters: an image written one
// cluster at a time in increasing order, such as a qcow2.StreamWriter.
// Clusters never written read as zeros, or through the image's backing
// file if it has one.
type ClusterWriter interface {
	// ClusterSize returns the size of a cluster, a power of two.
	ClusterSize() int
	// WriteCluster stores guest cluster index (data: one cluster).
	WriteCluster(index int64, data []byte) error
	// WriteCompressed stores guest cluster index as compressed, the
	// output of Compress.
	WriteCompressed(index int64, compressed []byte) error
	// WriteZero makes guest cluster index read as zeros without storing
	// data (a qcow2 zero cluster). It returns an error matching
	// disk.ErrNotSupported if the image cannot (qcow2 version 2):
	// Clusters then stores a cluster of zeros.
	WriteZero(index int64) error
	// Compress appends data (one cluster) compressed to dst, or reports
	// false when compressing does not pay (store it uncompressed then).
	// It must be safe for concurrent use.
	Compress(dst, data []byte) ([]byte, bool)
}

// SubclusterWriter is implemented by ClusterWriters whose clusters are
// made of subclusters that can be allocated on their own (qcow2 extended
// L2 entries). Clusters then, unless it compresses, follows the source at
// subcluster granularity, as QEMU does.
type SubclusterWriter interface {
	// Subclusters returns the number of subclusters of a cluster, at
	// most 32 (1: none).
	Subclusters() int
	// WriteSubclusters stores guest cluster index (data: one cluster)
	// with the subclusters of alloc allocated and those of zero reading
	// as zeros; the others are left unallocated.
	WriteSubclusters(index int64, data []byte, alloc, zero uint32) error
}

// batch is one run of clusters on its way from a worker to the writer.
type batch struct {
	seq      int64
	off      int64    // virtual offset, cluster aligned
	n        int      // bytes of the disk it covers
	zero     bool     // zero clusters: nothing to read
	skip     []uint32 // with subclusters: per cluster, those left unallocated; nil: none
	buf      []byte
	comp     []byte        // compressed clusters, back to back
	clusters []clusterPart // what to do with each cluster of buf
}

// clusterPart says how a cluster of a batch is stored.
type clusterPart struct {
	skip       bool // left unallocated
	zero       bool // stored as a zero cluster
	compressed bool // comp[start:end] holds it
	sub        bool // stored with the subclusters of alloc and zero only
	start, end int
	alloc      uint32 // with sub: the allocated subclusters
	zeros      uint32 // with sub: the subclusters reading as zeros
}

// prepOpts say how workers prepare batches.
type prepOpts struct {
	cs, chunkSize int64
	compress      bool
	sparse        int  // zero detection granularity; <= 0: none
	backed        bool // Options.Backed
	sub           int  // subclusters per cluster (1: none)
}

// Clusters copies the virtual disk of src into w, cluster by cluster in
// order. Clusters the source maps as zeros and (unless opts.SparseSize
// is negative) clusters that read as all zeros are not written; with
// compress, the other clusters are compressed where that pays. With
// opts.Backed (qemu-img convert -B) the clusters the source's top layer
// does not define are not written, and the others that read as zeros
// become zero clusters (see Options.Backed). Without compress, a
// SubclusterWriter with subclusters gets all this per subcluster, as QEMU
// writes images with extended L2 entries. Reading, zero detection and
// compression run on opts.Workers goroutines; one goroutine hands the
// clusters to w in order, through a reorder buffer of 2*Workers chunks of
// opts.ChunkSize (rounded to whole clusters) at most. Clusters does not
// close w.
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
	po := prepOpts{cs: cs, chunkSize: chunkSize, compress: compress, sparse: opts.SparseSize, backed: opts.Backed, sub: 1}
	if sw, ok := w.(SubclusterWriter); ok && !compress && sw.Subclusters() > 1 {
		po.sub = sw.Subclusters()
		if po.sub > 32 || cs%int64(po.sub) != 0 || cs/int64(po.sub) < 512 {
			return Stats{}, fmt.Errorf("convert: %d subclusters in a cluster of %d bytes", po.sub, cs)
		}
	}
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
				if err := prepare(src, w, b, po); err != nil {
					fail(err)
					free <- b
					continue
				}
				if !b.zero {
					readMu.Lock()
					stats.Read += int64(b.n)
					readMu.Unlock()
				}
				results <- b
			}
		}()
	}

	// Writer: hands the batches to w in order.
	writerDone := make(chan struct{})
	go func() {
		defer close(writerDone)
		st := &storer{w: w, cs: cs, compress: compress}
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
					n, err := st.store(b)
					stats.Written += n
					if err != nil {
						fail(err)
					} else {
						progress(int64(b.n))
					}
				}
				free <- b
			}
		}
		for _, b := range pending {
			free <- b
		}
	}()

	// Dispatch: the map, classified cluster by cluster, in runs cut into
	// batches aligned to chunkSize.
	var seq int64
	var pl *planner
	dispatch := func(first, n int64, c class) error {
		if c == classSkip {
			progress(min(size, (first+n)*cs) - first*cs)
			return ctx.Err()
		}
		for i, end := first, first+n; i < end; {
			next := min(end, (i*cs/chunkSize+1)*chunkSize/cs)
			var b *batch
			select {
			case b = <-free:
			case <-ctx.Done():
				return ctx.Err()
			}
			b.seq, b.off, b.n, b.zero = seq, i*cs, int(min(size, next*cs)-i*cs), c == classZero
			b.skip = pl.takeMasks(b.skip[:0], i, next)
			seq++
			jobs <- b // never blocks: at most inflight batches exist
			i = next
		}
		return nil
	}
	pl = newPlanner(cs, size, chunkSize/cs, po.sub, opts, dispatch)
	walkErr := disk.Extents(src, 0, size, pl.extent)
	if walkErr == nil {
		walkErr = pl.flush()
	}
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

// prepare reads batch b from src and decides how each of its clusters
// (with subclusters: each of their subclusters) is stored. A cluster that
// reads as zeros is left out (or, with backed, made a zero cluster) if
// sparse > 0 and, for clusters smaller than sparse, the whole block of
// sparse bytes around it (within the batch) reads as zeros: as qemu-img
// convert -S, shorter runs of zeros are written.
func prepare(src disk.Image, w ClusterWriter, b *batch, o prepOpts) error {
	cs := o.cs
	b.comp = b.comp[:0]
	b.clusters = b.clusters[:0]
	if b.zero {
		for range (int64(b.n) + cs - 1) / cs {
			b.clusters = append(b.clusters, clusterPart{zero: true})
		}
		return nil
	}
	if b.buf == nil {
		b.buf = make([]byte, o.chunkSize)
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
	unit := int(cs) / o.sub
	z := zeroScan{buf: buf, base: b.off, block: max(unit, o.sparse)}
	full := uint32(1)<<o.sub - 1
	if o.sub == 32 {
		full = ^uint32(0)
	}
	for k, i := 0, 0; i < rounded; k, i = k+1, i+int(cs) {
		c := buf[i : i+int(cs)]
		var part clusterPart
		if o.sub > 1 {
			var skip uint32
			if b.skip != nil {
				skip = b.skip[k]
			}
			for u := range o.sub {
				bit := uint32(1) << u
				switch {
				case skip&bit != 0:
				case o.sparse > 0 && z.at(i+u*unit):
					if o.backed {
						part.zeros |= bit
					}
				default:
					part.alloc |= bit
				}
			}
			switch {
			case part.alloc == full:
				part = clusterPart{}
			case part.alloc == 0 && part.zeros == 0:
				part = clusterPart{skip: true}
			case part.alloc == 0 && part.zeros == full:
				part = clusterPart{zero: true}
			default:
				part.sub = true
			}
			b.clusters = append(b.clusters, part)
			continue
		}
		switch {
		case o.sparse > 0 && z.at(i):
			// With a backing file, an unallocated cluster would read
			// the backing file's data.
			part.skip, part.zero = !o.backed, o.backed
		case o.compress:
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

// zeroScan tells whether the blocks of a buffer read as zeros.
type zeroScan struct {
	buf   []byte
	base  int64 // disk offset of buf
	block int   // block size, a power of two; blocks are aligned on the disk
	end   int   // end in buf of the block last scanned
	zero  bool  // whether it reads as zeros
}

// at reports whether the block holding buf[i] (clipped to buf) reads as
// zeros. Calls must come with increasing i.
func (z *zeroScan) at(i int) bool {
	if i >= z.end {
		start := max(0, int((z.base+int64(i))/int64(z.block)*int64(z.block)-z.base))
		z.end = min(len(z.buf), start+z.block)
		z.zero = isZero(z.buf[i:z.end]) && isZero(z.buf[start:i])
	}
	return z.zero
}

// storer hands batches to a ClusterWriter.
type storer struct {
	w        ClusterWriter
	cs       int64
	compress bool
	zeros    []byte // a cluster of zeros, once needed
	zeroComp []byte // it compressed, if that pays
}

// store writes batch b to w and returns the bytes stored.
func (s *storer) store(b *batch) (int64, error) {
	var written int64
	first := b.off / s.cs
	for i, part := range b.clusters {
		index := first + int64(i)
		var err error
		switch {
		case part.skip:
			continue
		case part.zero:
			var n int64
			n, err = s.zero(index)
			written += n
		case part.sub:
			err = s.w.(SubclusterWriter).WriteSubclusters(index, b.buf[int64(i)*s.cs:int64(i+1)*s.cs], part.alloc, part.zeros)
			if part.alloc != 0 {
				written += s.cs
			}
		case part.compressed:
			err = s.w.WriteCompressed(index, b.comp[part.start:part.end])
			written += int64(part.end - part.start)
		default:
			err = s.w.WriteCluster(index, b.buf[int64(i)*s.cs:int64(i+1)*s.cs])
			written += s.cs
		}
		if err != nil {
			return written, fmt.Errorf("convert: writing cluster %d: %w", index, err)
		}
	}
	return written, nil
}

// zero makes guest cluster index read as zeros: a zero cluster, or where
// the image has none a cluster of zeros (compressed with compress, as
// that always pays).
func (s *storer) zero(index int64) (int64, error) {
	err := s.w.WriteZero(index)
	if !errors.Is(err, disk.ErrNotSupported) {
		return 0, err
	}
	if s.zeros == nil {
		s.zeros = make([]byte, s.cs)
		if s.compress {
			s.zeroComp, _ = s.w.Compress(nil, s.zeros)
		}
	}
	if len(s.zeroComp) > 0 {
		return int64(len(s.zeroComp)), s.w.WriteCompressed(index, s.zeroComp)
	}
	return s.cs, s.w.WriteCluster(index, s.zeros)
}
