package qcow2

import (
	"math"
	"sort"

	"github.com/imgloop/imgloop/disk"
)

// storedBlock returns the refcount block covering refcount table index i
// as QEMU's qcow2_get_refcount reads it: nil for refcounts of 0 (no
// block, or a table entry past the table), the block's bytes (zeros past
// the end of the file), or ok false when the block cannot be read
// (unaligned offset: every refcount it holds is a check error).
func (c *checker) storedBlock(i uint64) (block []byte, ok bool, err error) {
	if i >= uint64(len(c.rt.entries)) {
		return nil, true, nil
	}
	off := c.rt.entries[i] & reftOffsetMask
	if off == 0 {
		return nil, true, nil
	}
	if off&(c.cs-1) != 0 || off > math.MaxInt64-c.cs {
		// Unaligned, or beyond any offset a file can have (QEMU fails
		// to read it).
		return nil, false, nil
	}
	b, err := c.rt.readBlock(off)
	return b, err == nil, err
}

// storedRefcount returns the refcount of cluster k as stored, and false
// when it cannot be read.
func (c *checker) storedRefcount(k uint64) (uint64, bool) {
	bb := c.rt.blockBits()
	b, ok, err := c.storedBlock(k >> bb)
	if !ok || err != nil {
		return 0, false
	}
	if b == nil {
		return 0, true
	}
	return refcountEntry(b, c.rt.order, k&(1<<bb-1)), true
}

// compare compares the stored refcounts with the references counted
// (compare_refcounts) and returns the highest cluster in use.
func (c *checker) compare() (uint64, error) {
	var highest uint64
	res := c.res
	bb := c.rt.blockBits()
	per := uint64(1) << bb
	one := func(k, stored uint64) {
		refs := c.refsOf(k)
		if stored > 0 || refs > 0 {
			highest = k
		}
		switch {
		case stored < refs && c.fixErrors:
			c.msg("Repairing cluster %d refcount=%d reference=%d", k, stored, refs)
			if err := c.rt.writeRefcount(c.f, k, refs); err != nil {
				c.msg("ERROR could not repair cluster %d: %v", k, err)
				res.Corruptions++
				return
			}
			res.CorruptionsFixed++
		case stored < refs:
			if stored == 0 {
				c.rebuild = true
			}
			c.msg("ERROR cluster %d refcount=%d reference=%d", k, stored, refs)
			res.Corruptions++
		case stored > refs && c.fixLeaks:
			c.msg("Repairing cluster %d refcount=%d reference=%d", k, stored, refs)
			if err := c.rt.writeRefcount(c.f, k, refs); err != nil {
				c.msg("ERROR could not repair cluster %d: %v", k, err)
				res.Leaks++
				return
			}
			res.LeaksFixed++
			if refs == 0 {
				c.discard(k)
			}
		case stored > refs:
			c.msg("Leaked cluster %d refcount=%d reference=%d", k, stored, refs)
			res.Leaks++
		}
	}
	unreadable := func(k uint64) {
		c.msg("Can't get refcount for cluster %d: Input/output error", k)
		res.CheckErrors++
	}
	// Clusters of the file, one refcount block at a time.
	for start := uint64(0); start < c.nbFile; start += per {
		end := min(start+per, c.nbFile)
		b, ok, err := c.storedBlock(start >> bb)
		if err != nil {
			return highest, err
		}
		for k := start; k < end; k++ {
			switch {
			case !ok:
				unreadable(k)
			case b == nil:
				one(k, 0)
			default:
				one(k, refcountEntry(b, c.rt.order, k-start))
			}
		}
	}
	if c.nb == c.nbFile {
		return highest, nil
	}
	// Past the end of the file, up to the highest reference: the
	// referenced clusters, and those the refcount blocks give a refcount.
	keys := make([]uint64, 0, len(c.extra))
	for k := range c.extra {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool { return keys[i] < keys[j] })
	ki := 0
	for blk := c.nbFile >> bb; blk <= (c.nb-1)>>bb; blk++ {
		start, end := max(blk<<bb, c.nbFile), min((blk+1)<<bb, c.nb)
		b, ok, err := c.storedBlock(blk)
		if err != nil {
			return highest, err
		}
		if !ok {
			for k := start; k < end; k++ {
				unreadable(k)
			}
			continue
		}
		if b == nil {
			// Only referenced clusters can differ.
			for ki < len(keys) && keys[ki] < end {
				one(keys[ki], 0)
				ki++
			}
			// The next block with an entry: skip empty table entries.
			if ki < len(keys) {
				next := keys[ki] >> bb
				for n := blk + 1; n < next; n++ {
					if _, p := c.rt.blockFor(n); p != refblockNone {
						next = n
						break
					}
				}
				blk = next - 1
			}
			continue
		}
		for k := start; k < end; k++ {
			one(k, refcountEntry(b, c.rt.order, k-blk<<bb))
		}
		for ki < len(keys) && keys[ki] < end {
			ki++
		}
	}
	return highest, nil
}

// discard deallocates cluster k, whose refcount a repair took to 0, as
// QEMU does (update_refcount with QCOW2_DISCARD_ALWAYS): it then reads as
// zeros. Files that cannot punch holes keep their bytes; errors are
// ignored, as QEMU ignores them.
func (c *checker) discard(k uint64) {
	hp, ok := c.f.(disk.HolePuncher)
	off := k << c.cb
	if !ok || off >= uint64(c.fileSize) {
		return
	}
	_ = hp.PunchHole(int64(off), int64(min(c.cs, uint64(c.fileSize)-off)))
}
