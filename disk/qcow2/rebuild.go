package qcow2

import (
	"encoding/binary"
	"fmt"
	"math"
)

// Rebuilding the refcount structures (QEMU's rebuild_refcount_structure,
// qemu-img check -r all): when a refcount block is missing or broken (a
// referenced cluster has refcount 0, a refcount table entry is invalid or
// points into other metadata), adjusting single refcounts cannot repair
// the image. A whole new refcount table and new refcount blocks are made
// from the references counted in memory, placed in clusters no metadata
// references (free space inside the file, else past its end), with the
// clusters they take themselves counted. The header is switched to the
// new table last:
//
//  1. write every new refcount block, then the new refcount table;
//  2. sync;
//  3. write refcount_table_offset and refcount_table_clusters;
//  4. sync.
//
// Until step 3 is durable, the header names the old structures, which
// were not written to (the new ones take clusters nothing references), so
// a crash leaves the image as it was; after it, the new structures are
// complete. The old structures are then leaked clusters, which the
// recount that follows frees, as QEMU does. The placement follows QEMU's
// algorithm, so that both lay the new structures out alike.

// rebuildAndRecount rebuilds the refcount structures, counts the
// references again against them while repairing the leaks (the old
// structures), and sets the counts as qcow2_check_refcounts does after a
// rebuild. It returns the highest cluster in use.
func (c *checker) rebuildAndRecount() (uint64, error) {
	res := c.res
	old := *res
	c.msg("Rebuilding refcount structure")
	if err := c.rebuildRefcounts(); err != nil {
		res.CheckErrors++
		return 0, fmt.Errorf("rebuilding the refcount structures: %w", err)
	}
	res.Corruptions, res.Leaks = 0, 0
	// The references are counted again, against the new structures.
	c.rebuild = false
	size, err := c.f.Size()
	if err != nil {
		res.CheckErrors++
		return 0, err
	}
	if err := c.resetRefs(size); err != nil {
		res.CheckErrors++
		return 0, err
	}
	c.l2Order, c.l2Weights = nil, make(map[uint64]*l2Weight)
	c.activeL1 = nil
	c.budget = 2*uint64(size) + metadataReadSlack
	if err := c.calculate(); err != nil {
		return 0, err
	}
	// The old structures are leaked now: repair that. Only the leaks
	// that could not be repaired count.
	saved := *res
	*res = CheckResult{Filename: res.Filename, Format: res.Format, Messages: res.Messages, MessagesDropped: res.MessagesDropped}
	c.fixLeaks = true
	highest, err := c.compare()
	c.fixLeaks = false
	if err != nil {
		return 0, err
	}
	if c.rebuild {
		c.msg("ERROR rebuilt refcount structure is still broken")
	}
	fresh := res.Leaks
	msgs, dropped := res.Messages, res.MessagesDropped
	*res = saved
	res.Messages, res.MessagesDropped = msgs, dropped
	if res.Corruptions < old.Corruptions {
		res.CorruptionsFixed += old.Corruptions - res.Corruptions
	}
	if res.Leaks < old.Leaks {
		res.LeaksFixed += old.Leaks - res.Leaks
	}
	res.Leaks += fresh
	return highest, nil
}

// rebuildRefcounts writes new refcount structures made from the counted
// references and switches the header to them; c.rt and c.h then describe
// the new ones.
func (c *checker) rebuildRefcounts() error {
	// The references past the end of the file join the array, which
	// then is QEMU's in-memory refcount table: one refcount per cluster,
	// growing as clusters are allocated past its end.
	if err := c.growRefs(c.nb); err != nil {
		return err
	}
	c.avoid = c.uncountedRefblocks()
	c.used.from, c.used.to = 0, 0
	var table []uint64
	grown, err := c.writeRefblocks(0, c.nbFile, &table)
	if err != nil {
		return err
	}
	if !grown {
		// Nothing is referenced: impossible, the header is.
		return fmt.Errorf("no cluster is in use")
	}
	var tableOff, tableClusters uint64
	for grown {
		tableClusters = (uint64(len(table))*8 + c.cs - 1) >> c.cb
		if tableClusters<<c.cb > maxRefcountTableBytes {
			return fmt.Errorf("the new refcount table would take %d bytes, more than the limit of %d", tableClusters<<c.cb, maxRefcountTableBytes)
		}
		var first uint64
		if tableOff, err = c.allocClusters(tableClusters, &first); err != nil {
			return err
		}
		// The table's clusters change refcounts in blocks that may be
		// written already: write them again (which may grow the table).
		start := tableOff >> c.cb
		if grown, err = c.writeRefblocks(start, start+tableClusters, &table); err != nil {
			return err
		}
	}
	buf := make([]byte, tableClusters<<c.cb)
	for i, e := range table {
		binary.BigEndian.PutUint64(buf[i*8:], e)
	}
	if err := c.guardWrite(0, tableOff, uint64(len(buf))); err != nil {
		return err
	}
	if _, err := c.f.WriteAt(buf, int64(tableOff)); err != nil {
		return fmt.Errorf("writing the refcount table at %#x: %w", tableOff, err)
	}
	if err := c.f.Sync(); err != nil {
		return fmt.Errorf("syncing the new refcount structures: %w", err)
	}
	var hdr [12]byte
	binary.BigEndian.PutUint64(hdr[:8], tableOff)
	binary.BigEndian.PutUint32(hdr[8:], uint32(tableClusters))
	if _, err := c.f.WriteAt(hdr[:], offRefcountTableOffset); err != nil {
		return fmt.Errorf("switching the header to the new refcount table: %w", err)
	}
	if err := c.f.Sync(); err != nil {
		return fmt.Errorf("syncing the header: %w", err)
	}
	c.h.RefcountTableOffset, c.h.RefcountTableClusters = tableOff, uint32(tableClusters)
	size, err := c.f.Size()
	if err != nil {
		return err
	}
	c.rt = &refcountTable{
		f: c.f, fileSize: size, clusterBits: c.cb, order: uint(c.h.RefcountOrder),
		entries: append(table, make([]uint64, (tableClusters<<c.cb)/8-uint64(len(table)))...),
		offset:  tableOff,
	}
	return nil
}

// writeRefblocks writes the refcount blocks covering the clusters in use
// among [first, end), allocating those table does not have yet, and
// returns whether table had to grow (rebuild_refcounts_write_refblocks).
// Each block written is the slice of the in-memory counts it covers, so
// it also holds the refcounts of the clusters allocated for the new
// structures so far.
func (c *checker) writeRefblocks(first, end uint64, table *[]uint64) (bool, error) {
	bb := c.rt.blockBits()
	per := uint64(1) << bb
	block := make([]byte, c.cs)
	order := uint(c.h.RefcountOrder)
	var firstFree uint64
	grown := false
	for k := first; k < end; k++ {
		if k >= c.nbFile || c.fileRefs(k) == 0 {
			continue
		}
		idx := k >> bb
		start := idx << bb
		var off uint64
		if idx < uint64(len(*table)) && (*table)[idx] != 0 {
			off = (*table)[idx]
		} else {
			// Never allocate in a block already written.
			firstFree = max(firstFree, start)
			var err error
			if off, err = c.allocClusters(1, &firstFree); err != nil {
				return false, err
			}
			if off>>c.cb >= end {
				// The block holding this block's refcount must be
				// written too.
				end = off>>c.cb + 1
			}
			if idx >= uint64(len(*table)) {
				n := ((idx+1)*8 + c.cs - 1) &^ (c.cs - 1) / 8
				*table = append(*table, make([]uint64, n-uint64(len(*table)))...)
				grown = true
			}
			(*table)[idx] = off
		}
		clear(block)
		for j := range per {
			if start+j >= c.nbFile {
				break
			}
			if v := c.fileRefs(start + j); v != 0 {
				putRefcountEntry(block, order, j, v)
			}
		}
		if err := c.guardWrite(0, off, c.cs); err != nil {
			return false, err
		}
		if _, err := c.f.WriteAt(block, int64(off)); err != nil {
			return false, fmt.Errorf("writing a refcount block at %#x: %w", off, err)
		}
		k = start + per - 1
	}
	return grown, nil
}

// allocClusters allocates n contiguous clusters in the in-memory counts,
// at or after *firstFree, past the end if no gap is large enough, and
// returns the offset of the first (alloc_clusters_imrt). *firstFree is
// left at the first free cluster met.
func (c *checker) allocClusters(n uint64, firstFree *uint64) (uint64, error) {
	k := *firstFree
	// Clusters only ever become used during a rebuild, so a range found
	// all used stays so: skip it (the scan finds what QEMU's finds, in
	// linear time over the whole rebuild instead of quadratic).
	from := k
	if c.used.from <= k && k <= c.used.to {
		from, k = c.used.from, max(k, c.used.to)
	}
	firstGap := true
	var run uint64
	for ; k < c.nbFile && run < n; k++ {
		if c.fileRefs(k) != 0 || c.avoid[k] {
			run = 0
			continue
		}
		run++
		if firstGap {
			*firstFree = k
			firstGap = false
			c.used.from, c.used.to = from, k
		}
	}
	if firstGap {
		c.used.from, c.used.to = from, k
	}
	for run < n {
		// Past the end of the counts: free, except where an invalid
		// refcount table entry points.
		if c.avoid[k] {
			run = 0
		} else {
			run++
		}
		k++
	}
	if err := c.growRefs(k); err != nil {
		return 0, err
	}
	k -= run
	for i := range n {
		c.setRefs(k+i, 1)
	}
	return k << c.cb, nil
}

// uncountedRefblocks returns the clusters that refcount table entries
// point to without the check counting them (entries with reserved bits
// set or unaligned offsets, blocks past the end of the file that could
// not be repaired). They hold no valid metadata, but QEMU's overlap check
// refuses writes over them, which fails its rebuild: the new structures
// are placed elsewhere instead.
func (c *checker) uncountedRefblocks() map[uint64]bool {
	var avoid map[uint64]bool
	for _, e := range c.rt.entries {
		off := e & reftOffsetMask
		if off == 0 || off > math.MaxUint64-c.cs || e&reftReservedMask == 0 && off&(c.cs-1) == 0 && off>>c.cb < c.nb {
			continue
		}
		if avoid == nil {
			avoid = make(map[uint64]bool)
		}
		for k := off >> c.cb; k <= (off+c.cs-1)>>c.cb; k++ {
			avoid[k] = true
		}
	}
	return avoid
}
