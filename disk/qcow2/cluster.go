package qcow2

import (
	"encoding/binary"
	"fmt"
	"io"
	"sync/atomic"
)

// run is a stretch of the virtual disk served the same way: one kind of
// cluster (or subcluster), and for data at contiguous host offsets.
type run struct {
	kind   clusterKind
	length int64
	// host is the host offset of the run's first byte (kindNormal,
	// kindZeroAlloc), the offset of the compressed data (kindCompressed),
	// or -1.
	host int64
	// cluster is the host cluster offset of the run's first cluster
	// (kindNormal, kindZeroAlloc), the compressed data offset
	// (kindCompressed), or -1.
	cluster int64
	// csize is how many bytes the compressed descriptor spans.
	csize int64
	// inCluster is the offset of the run's start in its guest cluster.
	inCluster int64
}

// add extends r by a piece of length bytes if it continues r (same kind,
// and for host-backed kinds the next host byte); it reports whether it did.
// Compressed clusters never merge: each is inflated on its own.
func (r *run) add(kind clusterKind, length, host int64) bool {
	if r.length == 0 {
		r.kind, r.length, r.host = kind, length, host
		return true
	}
	if kind != r.kind || kind == kindCompressed {
		return false
	}
	if (r.host >= 0 || host >= 0) && (r.host < 0 || host < 0 || r.host+r.length != host) {
		return false
	}
	r.length += length
	return true
}

// lookup maps the guest range [off, off+n) (inside the disk, n > 0) and
// returns its first run, which starts at off and is at most n bytes long.
func (img *Image) lookup(off, n int64) (run, error) {
	g := &img.geo
	cb := g.clusterBits
	l2Bits := g.l2Bits()
	scBits := g.subclusterBits()
	eb := g.entryBytes()
	perSlice := uint64(img.cache.sliceSize / eb)
	r := run{host: -1, cluster: -1}
	pos, end := off, off+n
	for pos < end {
		ci := uint64(pos) >> cb
		l1i := ci >> l2Bits
		var l2off uint64
		if l1i < uint64(len(img.l1)) {
			l2off = atomic.LoadUint64(&img.l1[l1i]) // a writer may set it
		}
		if l2off == 0 {
			// The whole L2 table is unallocated.
			tableEnd := (l1i + 1) << (l2Bits + cb)
			segEnd := end
			if tableEnd < uint64(end) {
				segEnd = int64(tableEnd)
			}
			if !r.add(kindUnallocated, segEnd-pos, -1) {
				return r, nil
			}
			pos = segEnd
			continue
		}
		l2i := ci & (1<<l2Bits - 1)
		sliceOff := l2off + l2i/perSlice*uint64(img.cache.sliceSize)
		slice, err := img.l2Slice(sliceOff)
		if err != nil {
			return r, err
		}
		for i := l2i % perSlice; i < perSlice && pos < end; i++ {
			word := binary.BigEndian.Uint64(slice[i*uint64(eb):])
			var bitmap uint64
			if g.extended {
				bitmap = binary.BigEndian.Uint64(slice[i*uint64(eb)+8:])
			}
			e, bad := g.decodeL2(word, bitmap)
			clusterStart := int64(ci) << cb
			if bad == "" && g.dataFile && e.kind != kindUnallocated && e.kind != kindZero && e.host != uint64(clusterStart) {
				bad = fmt.Sprintf("data cluster offset %#x differs from the guest offset %#x, as an external data file requires", e.host, clusterStart)
			}
			if bad != "" {
				return r, img.corrupt(int64(sliceOff+i*uint64(eb)),
					fmt.Sprintf("L2 table at %#x index %d: %s", l2off, l2i-l2i%perSlice+i, bad))
			}
			clusterEnd := clusterStart + 1<<cb
			for pos < end && pos < clusterEnd {
				in := pos - clusterStart
				kind, count := g.subcluster(e, uint(in>>scBits))
				segEnd := min(end, clusterStart+int64((uint(in>>scBits)+count)<<scBits))
				host := int64(-1)
				switch kind {
				case kindNormal, kindZeroAlloc:
					host = int64(e.host) + in
				case kindUnallocated:
					// An unallocated subcluster of an allocated cluster
					// keeps its host offset, which qemu-img map shows.
					if e.kind == kindNormal {
						host = int64(e.host) + in
					}
				case kindCompressed:
					if r.length > 0 {
						return r, nil
					}
					return run{kind: kindCompressed, length: segEnd - pos, host: int64(e.host),
						cluster: int64(e.host), csize: e.csize, inCluster: in}, nil
				}
				if r.length == 0 {
					r.inCluster = in
					if host >= 0 {
						r.cluster = int64(e.host)
					}
				}
				if !r.add(kind, segEnd-pos, host) {
					return r, nil
				}
				pos = segEnd
			}
			ci++
		}
	}
	return r, nil
}

// l2Slice returns the L2 slice at host offset off through the cache.
func (img *Image) l2Slice(off uint64) ([]byte, error) {
	return img.cache.get(off, func(buf []byte) error {
		n, err := img.f.ReadAt(buf, int64(off))
		if n == len(buf) {
			return nil
		}
		if err == nil || err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return fmt.Errorf("qcow2: reading L2 table slice at %#x: %w", off, err)
	})
}
