package qcow2

import (
	"errors"
	"fmt"
	"math"

	"encoding/binary"
)

// calculate counts every reference to a host cluster.
func (c *checker) calculate() error {
	h := c.h
	// The header cluster.
	if err := c.inc(0, c.cs); err != nil {
		return err
	}
	// The active L1 table, with fragmentation statistics, then each
	// snapshot's.
	if err := c.walkL1(h.L1TableOffset, h.L1Size, true); err != nil {
		return err
	}
	if c.g.dataFile && len(c.snaps) > 0 {
		c.msg("ERROR %d snapshots in image with data file", len(c.snaps))
		c.res.Corruptions++
	}
	for i := range c.snaps {
		if !c.checkSnapshotL1(&c.snaps[i]) {
			continue
		}
		if err := c.walkL1(c.snaps[i].L1TableOffset, c.snaps[i].L1Size, false); err != nil {
			return err
		}
	}
	// Each distinct L2 table is read once, its findings and references
	// counted as many times as L1 entries point to it (snapshots share
	// most of their L2 tables).
	for _, off := range c.l2Order {
		w := c.l2Weights[off]
		if err := c.walkL2(off, w.active, w.total); err != nil {
			return err
		}
	}
	if err := c.inc(h.SnapshotsOffset, c.snapshotsSize()); err != nil {
		return err
	}
	// The refcount table.
	if err := c.inc(h.RefcountTableOffset, uint64(len(c.rt.entries))*8); err != nil {
		return err
	}
	// Encryption is refused by readHeader, so there is no encryption
	// header to count here.
	if err := c.countBitmaps(); err != nil {
		return err
	}
	return c.checkRefblocks()
}

// inc adds one reference to each cluster of [off, off+size)
// (qcow2_inc_refcounts_imrt).
func (c *checker) inc(off, size uint64) error { return c.incN(off, size, 1) }

// incN adds w references to each cluster of [off, off+size), as w calls
// of inc would: a region reaching a whole cluster or more past the end of
// the file is w corruptions, and each reference past the largest refcount
// an entry can hold is a corruption (an overflow).
func (c *checker) incN(off, size, w uint64) error {
	if size == 0 || w == 0 {
		return nil
	}
	// The last cluster of an image may be partly past the end of the
	// file; a region reaching a whole cluster past it is an error, and
	// its clusters are not counted.
	if end := off + size; end > uint64(c.fileSize) && end-uint64(c.fileSize) >= c.cs {
		c.msg("ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x%x size 0x%x", off, size)
		c.res.Corruptions += int64(w)
		return nil
	}
	first := off >> c.cb
	last := (off + size - 1) >> c.cb
	for k := first; k <= last; k++ {
		var n uint64
		if k < c.nbFile {
			n = c.fileRefs(k)
		} else {
			n = uint64(c.extra[k])
		}
		add := w
		if n+add > c.refMax || n+add < n {
			over := add - (c.refMax - n)
			c.msg("ERROR: overflow cluster offset=0x%x", k<<c.cb)
			c.res.Corruptions += int64(over)
			add -= over
		}
		if add == 0 {
			continue
		}
		if k < c.nbFile {
			if c.refs16 != nil {
				c.refs16[k] = uint16(n + add)
			} else {
				c.refs32[k] = uint32(n + add)
			}
			continue
		}
		if c.extra == nil {
			c.extra = make(map[uint64]uint32)
		}
		if n == 0 && len(c.extra) >= maxExtraClusters {
			return fmt.Errorf("more than %d clusters past the end of the file are referenced: %w", maxExtraClusters, errCheckAborted)
		}
		c.extra[k] = uint32(n + add)
		c.nb = max(c.nb, k+1)
	}
	return nil
}

// spend takes n bytes of table reads from the budget.
func (c *checker) spend(n uint64) error {
	if n > c.budget {
		return fmt.Errorf("the L1, L2 and bitmap tables read exceed twice the file size: tables overlap each other (%w)", errCheckAborted)
	}
	c.budget -= n
	return nil
}

// fileRefs returns the references counted for cluster k < c.nbFile.
func (c *checker) fileRefs(k uint64) uint64 {
	if c.refs16 != nil {
		return uint64(c.refs16[k])
	}
	return uint64(c.refs32[k])
}

// refsOf returns the references counted for cluster k.
func (c *checker) refsOf(k uint64) uint64 {
	if k < c.nbFile {
		return c.fileRefs(k)
	}
	return uint64(c.extra[k])
}

// walkL1 counts the L1 table of l1Size entries at l1Offset and its L2
// tables, and notes which L2 tables it references for walkL2
// (check_refcounts_l1). active: the active table, whose mappings make
// the allocation statistics.
func (c *checker) walkL1(l1Offset uint64, l1Size uint32, active bool) error {
	if l1Size == 0 {
		return nil
	}
	n := uint64(l1Size) * 8
	if err := c.inc(l1Offset, n); err != nil {
		return err
	}
	l1, err := c.readL1(l1Offset, l1Size)
	if err != nil {
		return err
	}
	if active {
		c.activeL1 = l1
	}
	for _, e := range l1 {
		if e == 0 {
			continue
		}
		if e&l1ReservedMask != 0 {
			c.msg("ERROR found L1 entry with reserved bits set: %x", e)
			c.res.Corruptions++
		}
		l2off := e & offsetMask
		if err := c.inc(l2off, c.cs); err != nil {
			return err
		}
		if l2off&(c.cs-1) != 0 {
			c.msg("ERROR l2_offset=%x: Table is not cluster aligned; L1 entry corrupted", l2off)
			c.res.Corruptions++
		}
		w := c.l2Weights[l2off]
		if w == nil {
			if len(c.l2Order) >= maxL2Tables {
				return fmt.Errorf("more than %d distinct L2 tables: %w", maxL2Tables, errCheckAborted)
			}
			w = &l2Weight{}
			c.l2Weights[l2off] = w
			c.l2Order = append(c.l2Order, l2off)
		}
		w.total++
		if active {
			w.active++
		}
	}
	return nil
}

// l2Weight counts the L1 entries that point to one L2 table.
type l2Weight struct {
	active uint64 // entries of the active L1 table
	total  uint64 // entries of all L1 tables, the active one included
}

// readL1 reads an L1 table (readHeader and readSnapshots bound it to 32
// MiB inside the file).
func (c *checker) readL1(off uint64, size uint32) ([]uint64, error) {
	if err := c.spend(uint64(size) * 8); err != nil {
		return nil, err
	}
	buf := make([]byte, uint64(size)*8)
	if err := readAtZero(c.f, buf, int64(off), c.fileSize); err != nil {
		return nil, fmt.Errorf("reading L1 table at %#x: %w", off, err)
	}
	l1 := make([]uint64, size)
	for i := range l1 {
		l1[i] = binary.BigEndian.Uint64(buf[i*8:])
	}
	return l1, nil
}

// l2Type is QEMU's QCow2ClusterType.
type l2Type uint8

const (
	l2Unallocated l2Type = iota
	l2ZeroPlain
	l2ZeroAlloc
	l2Normal
	l2Compressed
)

// typeOf classifies an L2 entry as qcow2_get_cluster_type does.
func (c *checker) typeOf(word uint64) l2Type {
	switch {
	case word&entryCompressed != 0:
		return l2Compressed
	case word&entryZero != 0 && !c.g.extended:
		if word&offsetMask != 0 {
			return l2ZeroAlloc
		}
		return l2ZeroPlain
	case word&offsetMask == 0:
		if c.g.dataFile && word&entryCopied != 0 {
			return l2Normal
		}
		return l2Unallocated
	}
	return l2Normal
}

// readL2 reads the L2 table at off into c.l2buf; what lies past the end
// of the file reads as zeros.
func (c *checker) readL2(off uint64) error {
	if err := c.spend(c.cs); err != nil {
		return err
	}
	if err := readAtZero(c.f, c.l2buf, int64(off), c.fileSize); err != nil {
		return fmt.Errorf("reading L2 table at %#x: %w", off, err)
	}
	return nil
}

// l2At returns entry i of the L2 table in c.l2buf and its subcluster
// bitmap (0 without extended L2 entries).
func (c *checker) l2At(i int) (word, bitmap uint64) {
	if c.g.extended {
		return binary.BigEndian.Uint64(c.l2buf[i*16:]), binary.BigEndian.Uint64(c.l2buf[i*16+8:])
	}
	return binary.BigEndian.Uint64(c.l2buf[i*8:]), 0
}

// walkL2 counts the clusters the L2 table at l2off references and checks
// its entries (check_refcounts_l2), as if it were walked total times,
// active of them for the active L1 table (which makes the allocation
// statistics). Each finding is listed once and counted total times.
func (c *checker) walkL2(l2off, active, total uint64) error {
	if err := c.readL2(l2off); err != nil {
		c.msg("ERROR: I/O error in check_refcounts_l2")
		return err
	}
	// Findings and statistics of one walk, scaled at the end.
	var corruptions, allocated, compressed, fragmented int64
	defer func() {
		c.res.Corruptions += corruptions * int64(total)
		c.res.AllocatedClusters += allocated * int64(active)
		c.res.CompressedClusters += compressed * int64(active)
		c.res.FragmentedClusters += fragmented * int64(active)
	}()
	var nextContiguous uint64
	entries := int(c.cs) / c.g.entryBytes()
	for i := range entries {
		word, bitmap := c.l2At(i)
		typ := c.typeOf(word)
		if typ != l2Compressed && word&l2ReservedMask != 0 {
			c.msg("ERROR found l2 entry with reserved bits set: %x", word)
			corruptions++
		}
		switch typ {
		case l2Compressed:
			x := 62 - (c.cb - 8)
			if word&entryCopied != 0 {
				c.msg("ERROR: coffset=0x%x: copied flag must never be set for compressed clusters", word&(1<<x-1))
				word &^= entryCopied
				corruptions++
			}
			if c.g.dataFile {
				c.msg("ERROR compressed cluster %d with data file, entry=0x%x", i, word)
				corruptions++
				continue
			}
			if bitmap != 0 {
				c.msg("ERROR compressed cluster %d with non-zero subcluster allocation bitmap, entry=0x%x", i, word)
				corruptions++
				continue
			}
			coff := word & (1<<x - 1)
			sectors := (word>>x)&(1<<(c.cb-8)-1) + 1
			csize := sectors*512 - coff&511
			if err := c.incN(coff, csize, total); err != nil {
				return err
			}
			allocated++
			compressed++
			fragmented++
		case l2ZeroAlloc, l2Normal:
			off := word & offsetMask
			if bitmap>>32&bitmap != 0 {
				corruptions++
				c.msg("ERROR offset=%x: Allocated cluster has corrupted subcluster allocation bitmap", off)
			}
			if off&(c.cs-1) != 0 {
				corruptions++
				containsData := word&entryZero == 0
				if c.g.extended {
					containsData = bitmap&bitmapAllocMask != 0
				}
				switch {
				case containsData:
					c.msg("ERROR offset=%x: Data cluster is not properly aligned; L2 entry corrupted.", off)
				case !c.calcFix:
					c.msg("ERROR offset=%x: Preallocated cluster is not properly aligned; L2 entry corrupted.", off)
				default:
					c.msg("Repairing offset=%x: Preallocated cluster is not properly aligned; L2 entry corrupted.", off)
					fixed, err := c.fixByZero(l2off, i, word, bitmap, active > 0)
					if err != nil {
						return err
					}
					if fixed {
						// The entry no longer references the cluster; the
						// walks through other L1 entries see a zero cluster.
						corruptions--
						continue
					}
				}
			}
			allocated++
			if nextContiguous != 0 && off != nextContiguous {
				fragmented++
			}
			nextContiguous = off + c.cs
			if !c.g.dataFile {
				if err := c.incN(off, c.cs, total); err != nil {
					return err
				}
			}
		case l2Unallocated:
			if bitmap&bitmapAllocMask != 0 {
				corruptions++
				c.msg("ERROR: Unallocated cluster has non-zero subcluster allocation map")
			}
		}
	}
	return nil
}

// countBitmaps counts the bitmap directory, the bitmap tables and the
// bitmap data clusters (qcow2_check_bitmaps_refcounts).
func (c *checker) countBitmaps() error {
	h := c.h
	if len(h.Bitmaps) == 0 {
		return nil
	}
	if err := c.inc(h.BitmapDirectoryOffset, h.BitmapDirectorySize); err != nil {
		return err
	}
	buf := make([]byte, tableChunk)
	for _, bm := range h.Bitmaps {
		c.res.Bitmaps++
		if err := c.inc(bm.TableOffset, uint64(bm.TableSize)*8); err != nil {
			return err
		}
		if bm.TableSize > maxBitmapTableEntries || bm.TableOffset&(c.cs-1) != 0 {
			c.msg("ERROR bitmap %q: invalid bitmap table (%d entries at %#x)", bm.Name, bm.TableSize, bm.TableOffset)
			c.res.Corruptions++
			continue
		}
		// Read in chunks; entries past the end of the file read as zeros.
		for done := uint64(0); done < uint64(bm.TableSize); {
			n := min(uint64(len(buf))/8, uint64(bm.TableSize)-done)
			if bm.TableOffset+done*8 >= uint64(c.fileSize) {
				break
			}
			if err := c.spend(n * 8); err != nil {
				return err
			}
			if err := readAtZero(c.f, buf[:n*8], int64(bm.TableOffset+done*8), c.fileSize); err != nil {
				return fmt.Errorf("reading bitmap table of %q: %w", bm.Name, err)
			}
			for i := range n {
				e := binary.BigEndian.Uint64(buf[i*8:])
				off := e & offsetMask
				if e&bitmapEntryReserved != 0 || (off != 0 && (e&1 != 0 || off&(c.cs-1) != 0)) {
					c.msg("ERROR bitmap %q: invalid bitmap table entry %#x", bm.Name, e)
					c.res.Corruptions++
					continue
				}
				if off == 0 {
					continue
				}
				if err := c.inc(off, c.cs); err != nil {
					return err
				}
			}
			done += n
		}
	}
	return nil
}

// checkRefblocks checks the refcount table entries and counts the
// refcount blocks (check_refblocks).
func (c *checker) checkRefblocks() error {
	for i, e := range c.rt.entries {
		off := e & reftOffsetMask
		cluster := off >> c.cb
		if e&reftReservedMask != 0 {
			c.msg("ERROR refcount table entry %d has reserved bits set", i)
			c.res.Corruptions++
			c.rebuild = true
			continue
		}
		if off&(c.cs-1) != 0 {
			c.msg("ERROR refcount block %d is not cluster aligned; refcount table entry corrupted", i)
			c.res.Corruptions++
			c.rebuild = true
			continue
		}
		if cluster >= c.nb {
			c.res.Corruptions++
			if !c.calcFix {
				c.msg("ERROR refcount block %d is outside image", i)
				continue
			}
			c.msg("Repairing refcount block %d is outside image", i)
			if err := c.growFile(off); err != nil {
				c.msg("ERROR could not resize image: %v", err)
				c.rebuild = true
				continue
			}
			c.res.Corruptions--
			c.res.CorruptionsFixed++
			if err := c.inc(off, c.cs); err != nil {
				return err
			}
			continue
		}
		if off == 0 {
			continue
		}
		if err := c.inc(off, c.cs); err != nil {
			return err
		}
		if n := c.refsOf(cluster); n != 1 {
			c.msg("ERROR refcount block %d refcount=%d", i, n)
			c.res.Corruptions++
			c.rebuild = true
		}
	}
	return nil
}

// errCheckMemory: the file has more clusters than the memory limit allows
// counting.
var errCheckMemory = errors.New("more than the check's memory limit allows")

// refsBytes returns the bytes of reference counts n clusters take.
func (c *checker) refsBytes(n uint64) int64 {
	if c.h.RefcountOrder > 4 {
		return int64(n) * 4
	}
	return int64(n) * 2
}

// resetRefs sets the file size to fileSize and zeroes every reference
// count, for a (new) count over a file of that size. c.nb keeps covering
// the clusters counted before, as QEMU's in-memory refcount table keeps
// its size.
func (c *checker) resetRefs(fileSize int64) error {
	nbFile := (uint64(fileSize) + c.cs - 1) >> c.cb
	if nbFile > math.MaxInt32 || c.refsBytes(nbFile) > c.maxMem {
		return fmt.Errorf("the file has %d clusters, %w of %d MiB", nbFile, errCheckMemory, c.maxMem>>20)
	}
	c.setFileSize(fileSize)
	c.nbFile = nbFile
	if c.h.RefcountOrder <= 4 {
		if uint64(cap(c.refs16)) >= nbFile {
			c.refs16 = c.refs16[:nbFile]
			clear(c.refs16)
		} else {
			c.refs16 = make([]uint16, nbFile)
		}
	} else {
		if uint64(cap(c.refs32)) >= nbFile {
			c.refs32 = c.refs32[:nbFile]
			clear(c.refs32)
		} else {
			c.refs32 = make([]uint32, nbFile)
		}
	}
	c.extra = nil
	c.nb = max(c.nb, nbFile)
	return nil
}

// setFileSize records a new size of the file.
func (c *checker) setFileSize(fileSize int64) {
	c.fileSize = fileSize
	c.g.fileSize, c.g.dataSize = fileSize, fileSize
	c.rt.fileSize = fileSize
}

// growRefs makes the per-cluster reference counts cover n clusters,
// keeping the counts made so far (those past the end of the file move
// from c.extra into the array).
func (c *checker) growRefs(n uint64) error {
	if n <= c.nbFile {
		return nil
	}
	if n > math.MaxInt32 || c.refsBytes(n) > c.maxMem {
		return fmt.Errorf("%d clusters are %w of %d MiB", n, errCheckMemory, c.maxMem>>20)
	}
	if c.refs16 != nil {
		c.refs16 = append(c.refs16, make([]uint16, n-c.nbFile)...)
	} else {
		c.refs32 = append(c.refs32, make([]uint32, n-c.nbFile)...)
	}
	c.nbFile = n
	for k, v := range c.extra {
		if k < n {
			c.setRefs(k, uint64(v))
			delete(c.extra, k)
		}
	}
	c.nb = max(c.nb, n)
	return nil
}

// setRefs sets the references counted for cluster k < c.nbFile.
func (c *checker) setRefs(k, v uint64) {
	if c.refs16 != nil {
		c.refs16[k] = uint16(v)
	} else {
		c.refs32[k] = uint32(v)
	}
}
