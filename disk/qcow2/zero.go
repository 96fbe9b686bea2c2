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
// flush; a discard punches them out of the file once free. The partial
// clusters (subclusters) at the ends of a request are written with zero
// bytes, unless they already read as zeros.

// zeroChunk is the size of the zero buffer partial requests write from.
const zeroChunk = 1 << 20

// Discard drops the data of [off, off+n): afterwards the range reads as
// zeros, or, in a version 2 image with a backing file, as the backing
// file's data where whole clusters were discarded.
func (img *Image) Discard(off, n int64) error {
	if err := img.writable("discard"); err != nil {
		return err
	}
	if err := disk.CheckRange(off, n, img.size); err != nil {
		return fmt.Errorf("qcow2: discard: %w", err)
	}
	return img.zeroRange(off, n, true, false)
}

// WriteZeroes makes [off, off+n) read as zeros, with zero clusters where
// the image version allows; flags may hold disk.ZeroNoUnmap.
func (img *Image) WriteZeroes(off, n int64, flags disk.ZeroFlags) error {
	if err := img.writable("write zeroes"); err != nil {
		return err
	}
	if err := disk.CheckRange(off, n, img.size); err != nil {
		return fmt.Errorf("qcow2: write zeroes: %w", err)
	}
	return img.zeroRange(off, n, false, flags&disk.ZeroNoUnmap != 0)
}

// zeroRange implements Discard (discard set) and WriteZeroes.
func (img *Image) zeroRange(off, n int64, discard, noUnmap bool) error {
	g := &img.geo
	unit := g.clusterSize()
	if g.extended {
		unit = int64(1) << g.subclusterBits()
	}
	end := off + n
	// The disk's last unit may be partial: it counts as whole.
	a, b := alignUp(off, unit), end&^(unit-1)
	if end == img.size {
		b = alignUp(end, unit)
	}
	metaOK := g.version >= 3 || discard
	if !metaOK || a >= b {
		return img.zeroData(off, n)
	}
	if err := img.zeroData(off, min(a, end)-off); err != nil {
		return err
	}
	if err := img.zeroUnits(a, b, discard, noUnmap); err != nil {
		return err
	}
	if b < end {
		return img.zeroData(b, end-b)
	}
	return nil
}

// zeroData writes zeros over the parts of [off, off+n) that do not read
// as zeros already.
func (img *Image) zeroData(off, n int64) error {
	var zero []byte
	for n > 0 {
		r, err := img.lookup(off, n)
		if err != nil {
			return err
		}
		reads0 := r.kind == kindZero || r.kind == kindZeroAlloc ||
			(r.kind == kindUnallocated && (img.backing == nil || off >= img.backingSize))
		if !reads0 {
			if zero == nil {
				zero = make([]byte, min(n, zeroChunk))
			}
			for k := int64(0); k < r.length; {
				m := min(r.length-k, int64(len(zero)))
				if _, err := img.WriteAt(zero[:m], off+k); err != nil {
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
			data = append(data, span{cStart + lo, min(hi, img.size-cStart) - lo})
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
