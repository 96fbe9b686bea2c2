package qcow2

import (
	"github.com/imgloop/imgloop/internal/report"
)

// metadataPreallocated reports whether the image looks made with
// preallocation=metadata: many more host clusters in use (by refcount)
// than the host file really stores. Only then does Map look for holes of
// the host file under allocated clusters, as QEMU does
// (qcow2_detect_metadata_preallocation in block/qcow2-refcount.c, and
// BDRV_BLOCK_RECURSE in qcow2_co_block_status): the decision and its
// threshold are QEMU's, so that map reports what qemu-img map does. It is
// decided once, at the first Map. Errors make it false.
func (img *Image) metadataPreallocated() bool {
	img.preallocOnce.Do(func() {
		size, err := img.f.Size()
		if err != nil {
			return
		}
		used, err := report.DiskUsage(img.f.Name())
		if err != nil {
			return
		}
		h := img.header()
		cs := int64(h.ClusterSize())
		stored := used / cs
		threshold := max(stored*10/9, stored+2)
		t, err := readRefcountTable(img.f, h, size)
		if err != nil {
			return
		}
		end := uint64((size + cs - 1) / cs)
		bb := t.blockBits()
		var count int64
		for i := uint64(0); i < end && count < threshold; {
			blk := i >> bb
			off, p := t.blockFor(blk)
			next := min((blk+1)<<bb, end)
			if p != refblockOK {
				i = next // no block (refcounts 0) or a broken one
				continue
			}
			b, err := t.readBlock(off)
			if err != nil {
				return
			}
			for ; i < next && count < threshold; i++ {
				if refcountEntry(b, t.order, i&(1<<bb-1)) != 0 {
					count++
				}
			}
		}
		img.prealloc = count >= threshold
	})
	return img.prealloc
}
