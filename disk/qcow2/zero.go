package qcow2

import (
	"fmt"

	"github.com/imgloop/imgloop/disk"
)

// Discard and write-zeroes change L2 entries of whole clusters (with
// extended L2 entries, of whole subclusters) without writing data, as
// QEMU does:
//
//   - discard: the cluster becomes unallocated, or, in a version 3 image
//     with a backing file or where the cluster was allocated, a zero
//     cluster (so that the backing file does not show through); a
//     version 2 image with a backing file shows the backing file's data
//     there afterwards;
//   - write-zeroes: in a version 3 image the cluster becomes a zero
//     cluster; with disk.ZeroNoUnmap an allocated cluster keeps its host
//     cluster (a preallocated zero cluster). Version 2 has no zero
//     clusters: zeros are written as data, except where the cluster
//     already reads as zeros.
//
// Host clusters no longer used are released after the next metadata
// flush; a discard punches them out of the file once free. A discard
// leaves the partial units (clusters or subclusters) at the ends of its
// range as they are (disk.Discarder); write-zeroes writes them with zero
// bytes, unless they already read as zeros, or, with disk.ZeroFast,
// fails with disk.ErrSlowZero before changing anything when they do not.

// zeroChunk is the size of zeroBuf.
const zeroChunk = 1 << 20

// zeroBuf is what partial units are zeroed from; it is never written.
var zeroBuf [zeroChunk]byte

var _ disk.Limiter = (*Image)(nil)

// Discard deallocates the whole clusters (with extended L2 entries, the
// whole subclusters) of [off, off+n): afterwards they read as zeros, or,
// in a version 2 image with a backing file, as the backing file's data.
// The rest of the range is left as it is, and no data is written.
func (img *Image) Discard(off, n int64) error {
	t, err := img.enter()
	if err != nil {
		return err
	}
	defer img.exit(t)
	if err := img.writable("discard"); err != nil {
		return err
	}
	if err := disk.CheckRange(off, n, img.size.Load()); err != nil {
		return fmt.Errorf("qcow2: discard: %w", err)
	}
	a, b := img.wholeUnits(off, n)
	if a >= b {
		return nil
	}
	return img.zeroUnits(a, b, true, false)
}

// WriteZeroes makes [off, off+n) read as zeros, with zero clusters where
// the image version allows; flags may hold disk.ZeroNoUnmap (allocated
// clusters stay allocated), disk.ZeroFast (fail with disk.ErrSlowZero,
// changing nothing, when zero bytes would have to be written: unaligned
// parts that do not read as zeros, parts of compressed clusters with
// extended L2 entries, anything in a version 2 image that does not read
// as zeros) and disk.ZeroFUA (flush before returning).
func (img *Image) WriteZeroes(off, n int64, flags disk.ZeroFlags) error {
	t, err := img.enter()
	if err != nil {
		return err
	}
	defer img.exit(t)
	if err := img.writable("write zeroes"); err != nil {
		return err
	}
	if err := disk.CheckRange(off, n, img.size.Load()); err != nil {
		return fmt.Errorf("qcow2: write zeroes: %w", err)
	}
	if flags&disk.ZeroFast != 0 {
		if err := img.checkFastZero(off, n); err != nil {
			return err
		}
	}
	if err := img.zeroRange(off, n, flags&disk.ZeroNoUnmap != 0); err != nil {
		return err
	}
	if flags&disk.ZeroFUA != 0 {
		return img.flush()
	}
	return nil
}

// Limits returns the image's block limits: any byte range can be read or
// written, clusters (subclusters with extended L2 entries) are the
// preferred size and the unit of discard and write-zeroes.
func (img *Image) Limits() disk.Limits {
	u := img.zeroUnit()
	return disk.Limits{
		MinTransfer:       1,
		PreferredTransfer: max(u, 512),
		MaxTransfer:       disk.DefaultMaxTransfer,
		DiscardAlignment:  u,
		ZeroAlignment:     u,
	}
}

// zeroUnit is the unit discard and write-zeroes change without writing
// data: a cluster, or a subcluster with extended L2 entries.
func (img *Image) zeroUnit() int64 {
	if img.geo.extended {
		return int64(1) << img.geo.subclusterBits()
	}
	return img.geo.clusterSize()
}

// wholeUnits returns [a, b), the whole units of [off, off+n). The disk's
// last unit may be partial: reaching the end of the disk covers it.
func (img *Image) wholeUnits(off, n int64) (a, b int64) {
	unit := img.zeroUnit()
	end := off + n
	a, b = alignUp(off, unit), end&^(unit-1)
	if end == img.size.Load() {
		b = alignUp(end, unit)
	}
	return a, b
}

// zeroRange implements WriteZeroes: whole units through their L2
// entries (version 3), the rest through zeroData.
func (img *Image) zeroRange(off, n int64, noUnmap bool) error {
	end := off + n
	a, b := img.wholeUnits(off, n)
	if img.geo.version < 3 || a >= b {
		return img.zeroData(off, n)
	}
	if err := img.zeroData(off, min(a, end)-off); err != nil {
		return err
	}
	if err := img.zeroUnits(a, b, false, noUnmap); err != nil {
		return err
	}
	if b < end {
		return img.zeroData(b, end-b)
	}
	return nil
}

// checkFastZero returns disk.ErrSlowZero if zeroing [off, off+n) would
// write zero bytes (see WriteZeroes).
func (img *Image) checkFastZero(off, n int64) error {
	end := off + n
	a, b := img.wholeUnits(off, n)
	var slow []span
	if img.geo.version < 3 || a >= b {
		slow = []span{{off, n}}
	} else {
		slow = []span{{off, min(a, end) - off}, {b, max(0, end-b)}}
		if cs := img.geo.clusterSize(); img.geo.extended {
			// A compressed cluster only partly covered by [a, b) would be
			// rewritten uncompressed.
			for _, c := range []int64{a &^ (cs - 1), (b - 1) &^ (cs - 1)} {
				if a <= c && c+cs <= b {
					continue // covered whole
				}
				compressed, err := img.compressedAt(c)
				if err != nil {
					return err
				}
				if compressed {
					return fmt.Errorf("qcow2: write zeroes at %d: part of a compressed cluster: %w", c, disk.ErrSlowZero)
				}
			}
		}
	}
	for _, s := range slow {
		zero, err := img.readsZeros(s.off, s.n)
		if err != nil {
			return err
		}
		if !zero {
			return fmt.Errorf("qcow2: write zeroes at %d (%d bytes): %w", s.off, s.n, disk.ErrSlowZero)
		}
	}
	return nil
}

// compressedAt reports whether guest offset off lies in a compressed
// cluster.
func (img *Image) compressedAt(off int64) (bool, error) {
	rt := img.reuse.Enter()
	defer img.reuse.Exit(rt)
	r, err := img.lookup(off, 1)
	return r.kind == kindCompressed, err
}

// readsZeros reports whether [off, off+n) is mapped to read as zeros
// (zero or unallocated clusters without backing data), without reading
// data.
func (img *Image) readsZeros(off, n int64) (bool, error) {
	rt := img.reuse.Enter()
	defer img.reuse.Exit(rt)
	for n > 0 {
		r, err := img.lookup(off, n)
		if err != nil {
			return false, err
		}
		if !img.runReadsZero(r, off) {
			return false, nil
		}
		off += r.length
		n -= r.length
	}
	return true, nil
}

// runReadsZero reports whether run r, at guest offset off, reads as
// zeros without reading data.
func (img *Image) runReadsZero(r run, off int64) bool {
	return r.kind == kindZero || r.kind == kindZeroAlloc ||
		(r.kind == kindUnallocated && (img.backing == nil || off >= img.backingSize))
}

// zeroData writes zeros over the parts of [off, off+n) that do not read
// as zeros already.
func (img *Image) zeroData(off, n int64) error {
	for n > 0 {
		rt := img.reuse.Enter()
		r, err := img.lookup(off, n)
		img.reuse.Exit(rt)
		if err != nil {
			return err
		}
		if !img.runReadsZero(r, off) {
			for k := int64(0); k < r.length; {
				m := min(r.length-k, zeroChunk)
				if _, err := img.writeAt(zeroBuf[:m], off+k, false); err != nil {
					return err
				}
				k += m
			}
		}
		off += r.length
		n -= r.length
	}
	return nil
}

// zeroUnits discards or zeroes the whole units (clusters or subclusters)
// of [a, b), one L2 slice at a time, under the allocation mutex.
func (img *Image) zeroUnits(a, b int64, discard, noUnmap bool) error {
	g := &img.geo
	cb := g.clusterBits
	perSlice := uint64(img.cache.sliceSize / g.entryBytes())
	for a < b {
		ci0 := uint64(a) >> cb
		sliceEnd := int64((ci0/perSlice+1)*perSlice) << cb
		segEnd := min(b, sliceEnd)
		data, err := img.zeroSlice(a, segEnd, discard, noUnmap)
		if err != nil {
			return err
		}
		if discard {
			data = nil // parts of compressed clusters: left as they are
		}
		for _, r := range data {
			if err := img.zeroData(r.off, r.n); err != nil {
				return err
			}
		}
		a = segEnd
	}
	return nil
}

// zeroSlice discards or zeroes the whole units of [a, b), which lies in
// the clusters of one L2 slice. It returns the ranges that must be
// written with zero bytes instead (parts of compressed clusters).
func (img *Image) zeroSlice(a, b int64, discard, noUnmap bool) ([]span, error) {
	w := img.w
	w.mu.Lock()
	defer w.mu.Unlock()
	if err := w.failed.Load(); err != nil {
		return nil, fmt.Errorf("qcow2: write zeroes: the image's write side stopped: %w", *err)
	}
	g := &img.geo
	cb := g.clusterBits
	cs := g.clusterSize()
	ci0 := uint64(a) >> cb
	ciEnd := uint64(b-1)>>cb + 1
	words := make([]uint64, ciEnd-ci0)
	var bitmaps []uint64
	if g.extended {
		bitmaps = make([]uint64, len(words))
	}
	var frees []l2Entry
	var data []span
	changed := false
	for j := range words {
		ci := ci0 + uint64(j)
		word, bitmap, err := img.entry(ci)
		if err != nil {
			return nil, err
		}
		e, bad := g.decodeL2(word, bitmap)
		if bad != "" {
			return nil, img.fail(img.corrupt(-1, fmt.Sprintf("L2 entry of guest cluster %d: %s", ci, bad)))
		}
		cStart := int64(ci) << cb
		lo, hi := max(a, cStart)-cStart, min(b, cStart+cs)-cStart
		nw, nb, drop := img.zeroEntry(word, bitmap, e, lo, hi, discard, noUnmap)
		if g.extended && e.kind == kindCompressed && !drop {
			data = append(data, span{cStart + lo, min(hi, img.size.Load()-cStart) - lo})
		}
		words[j] = nw
		if g.extended {
			bitmaps[j] = nb
		}
		if nw != word || nb != bitmap {
			changed = true
		}
		if drop {
			if !g.dataFile {
				if err := img.checkOld(ci, e); err != nil {
					return nil, img.fail(err)
				}
			}
			frees = append(frees, e)
		}
	}
	if !changed {
		return data, nil
	}
	if err := img.setEntries(ci0, words, bitmaps); err != nil {
		return nil, img.fail(err)
	}
	if !g.dataFile {
		for _, e := range frees {
			img.queueFree(e, cs, discard)
		}
	}
	return data, img.limitDirty()
}

// span is a range of bytes.
type span struct{ off, n int64 }

// zeroEntry returns the new L2 entry of a cluster whose units [lo, hi)
// (bytes inside the cluster, unit aligned) are discarded or zeroed, and
// whether its host cluster (or compressed data) is dropped.
func (img *Image) zeroEntry(word, bitmap uint64, e l2Entry, lo, hi int64, discard, noUnmap bool) (uint64, uint64, bool) {
	g := &img.geo
	cs := g.clusterSize()
	allocated := e.kind == kindNormal || e.kind == kindZeroAlloc || e.kind == kindCompressed
	keep := noUnmap && !discard && (e.kind == kindNormal || e.kind == kindZeroAlloc) &&
		(word&entryCopied != 0 || g.dataFile)
	whole := lo == 0 && hi == cs
	if !g.extended {
		switch {
		case discard && g.version < 3, discard && img.backing == nil && !allocated:
			return 0, 0, allocated
		case keep:
			return word&^entryZero | entryZero, 0, false
		}
		return entryZero, 0, allocated
	}
	scb := g.subclusterBits()
	mask := subclusterMask(uint(lo>>scb), uint((hi-1)>>scb))
	alloc, zero := uint32(bitmap), uint32(bitmap>>32)
	if discard && img.backing == nil && !allocated {
		// Already reads as zeros and has nothing to free.
		return word, bitmap, false
	}
	switch {
	case whole && !keep:
		return 0, uint64(^uint32(0)) << 32, allocated
	case e.kind == kindCompressed:
		// A compressed cluster cannot be partly zeroed in place: its
		// data has to be written uncompressed, which the caller does
		// through zeroData.
		return word, bitmap, false
	}
	return word, uint64(zero|mask)<<32 | uint64(alloc&^mask), false
}
