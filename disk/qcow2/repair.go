package qcow2

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
)

// markClean clears the dirty and corrupt bits of the header, once what
// was repaired is on disk (qcow2_mark_clean, qcow2_mark_consistent).
func (c *checker) markClean() error {
	bits := c.h.IncompatibleFeatures & (IncompatDirty | IncompatCorrupt)
	if c.h.Version < 3 || bits == 0 {
		return nil
	}
	if err := c.f.Sync(); err != nil {
		return fmt.Errorf("syncing before clearing the dirty bit: %w", err)
	}
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], c.h.IncompatibleFeatures&^bits)
	if _, err := c.f.WriteAt(b[:], offIncompatibleFeatures); err != nil {
		return fmt.Errorf("clearing the dirty bit: %w", err)
	}
	return c.f.Sync()
}

// writeEntry writes a table entry (8 bytes, big endian) at off.
func (c *checker) writeEntry(off, v uint64) error {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], v)
	if _, err := c.f.WriteAt(b[:], int64(off)); err != nil {
		return fmt.Errorf("writing the table entry at %#x: %w", off, err)
	}
	return nil
}

// checkCopied checks the OFLAG_COPIED flags of the active L1 table and its
// L2 tables against the stored refcounts (check_oflag_copied), and with
// fix sets them right. An L2 table that several L1 entries point to is
// read once, its findings counted once per entry.
func (c *checker) checkCopied(fix bool) error {
	h := c.h
	if h.L1Size == 0 {
		return nil
	}
	l1, err := c.readL1(h.L1TableOffset, h.L1Size)
	if err != nil {
		return err
	}
	res := c.res
	var order []uint64
	count := make(map[uint64]int64)
	for i, e := range l1 {
		l2off := e & offsetMask
		if l2off == 0 {
			continue
		}
		rc, ok := c.storedRefcount(l2off >> c.cb)
		if !ok {
			continue
		}
		if (rc == 1) != (e&entryCopied != 0) {
			if fix {
				c.msg("Repairing OFLAG_COPIED L2 cluster: l1_index=%d l1_entry=%x refcount=%d", i, e, rc)
				if err := c.guardWrite(olActiveL1, h.L1TableOffset+uint64(i)*8, 8); err != nil {
					res.CheckErrors++
					res.Corruptions++
					return countedError{err}
				}
				if err := c.writeEntry(h.L1TableOffset+uint64(i)*8, e^entryCopied); err != nil {
					res.CheckErrors++
					res.Corruptions++
					return err
				}
				res.CorruptionsFixed++
			} else {
				res.Corruptions++
				c.msg("ERROR OFLAG_COPIED L2 cluster: l1_index=%d l1_entry=%x refcount=%d", i, e, rc)
			}
		}
		if count[l2off] == 0 {
			order = append(order, l2off)
		}
		count[l2off]++
	}
	entries := int(c.cs) / c.g.entryBytes()
	for _, l2off := range order {
		var dirty int64
		if err := c.readL2(l2off); err != nil {
			c.msg("ERROR: Could not read L2 table: %v", err)
			return err
		}
		for j := range entries {
			word, _ := c.l2At(j)
			if t := c.typeOf(word); t != l2Normal && t != l2ZeroAlloc {
				continue
			}
			rc := uint64(1)
			if !c.g.dataFile {
				var ok bool
				if rc, ok = c.storedRefcount((word & offsetMask) >> c.cb); !ok {
					continue
				}
			}
			if (rc == 1) != (word&entryCopied != 0) {
				if fix {
					c.msg("Repairing OFLAG_COPIED data cluster: l2_entry=%x refcount=%d", word, rc)
					binary.BigEndian.PutUint64(c.l2buf[j*c.g.entryBytes():], word^entryCopied)
					dirty++
					continue
				}
				res.Corruptions += count[l2off]
				c.msg("ERROR OFLAG_COPIED data cluster: l2_entry=%x refcount=%d", word, rc)
			}
		}
		if dirty == 0 {
			continue
		}
		// The table is written whole, as QEMU writes it, once the
		// overlap check allows.
		if err := c.guardWrite(olActiveL2, l2off, c.cs); err != nil {
			c.msg("ERROR: Could not write L2 table; metadata overlap check failed: %v", err)
			res.CheckErrors++
			res.Corruptions += dirty
			return countedError{err}
		}
		if _, err := c.f.WriteAt(c.l2buf, int64(l2off)); err != nil {
			c.msg("ERROR: Could not write L2 table: %v", err)
			res.CheckErrors++
			res.Corruptions += dirty
			return countedError{err}
		}
		res.CorruptionsFixed += dirty
	}
	return nil
}

// errMetadataOverlap: a repair would have written over metadata.
var errMetadataOverlap = errors.New("metadata overlap check failed")

// Metadata kinds for overlaps (QEMU's QCow2MetadataOverlap).
type olKind uint16

const (
	olHeader olKind = 1 << iota
	olActiveL1
	olActiveL2
	olRefcountTable
	olRefcountBlock
	olSnapshotTable
	olInactiveL1
	olInactiveL2 // not checked: QEMU's default overlap-check=cached leaves it out
	olBitmapDirectory
)

// String names the metadata as QEMU's metadata_ol_names does.
func (k olKind) String() string {
	switch k {
	case olHeader:
		return "qcow2_header"
	case olActiveL1:
		return "active L1 table"
	case olActiveL2:
		return "active L2 table"
	case olRefcountTable:
		return "refcount table"
	case olRefcountBlock:
		return "refcount block"
	case olSnapshotTable:
		return "snapshot table"
	case olInactiveL1:
		return "inactive L1 table"
	case olInactiveL2:
		return "inactive L2 table"
	case olBitmapDirectory:
		return "bitmap directory"
	}
	return fmt.Sprintf("olKind(%#x)", uint16(k))
}

// overlap returns the metadata that a write of n bytes at off would
// overwrite, ignoring the kinds in ign, or 0
// (qcow2_check_metadata_overlap with QEMU's default checks, which leave
// out inactive L2 tables). The check uses the structures as they were
// when the check started (the old refcount table during a rebuild, as in
// QEMU).
func (c *checker) overlap(ign olKind, off, n uint64) olKind {
	if n == 0 {
		return 0
	}
	chk := ^ign
	if chk&olHeader != 0 && off < c.cs {
		return olHeader
	}
	n = (off&(c.cs-1) + n + c.cs - 1) &^ (c.cs - 1)
	off &^= c.cs - 1
	hits := func(o, size uint64) bool { return size > 0 && off < o+size && o < off+n }
	h := c.h
	if chk&olActiveL1 != 0 && hits(h.L1TableOffset, uint64(h.L1Size)*8) {
		return olActiveL1
	}
	if chk&olRefcountTable != 0 && hits(h.RefcountTableOffset, uint64(len(c.rt.entries))*8) {
		return olRefcountTable
	}
	if chk&olSnapshotTable != 0 && hits(h.SnapshotsOffset, c.snapshotsSize()) {
		return olSnapshotTable
	}
	if chk&olInactiveL1 != 0 {
		for _, s := range c.snaps {
			if hits(s.L1TableOffset, uint64(s.L1Size)*8) {
				return olInactiveL1
			}
		}
	}
	if chk&olActiveL2 != 0 {
		for _, e := range c.activeL1 {
			if l2 := e & offsetMask; l2 != 0 && hits(l2, c.cs) {
				return olActiveL2
			}
		}
	}
	if chk&olRefcountBlock != 0 {
		for _, e := range c.rt.entries {
			if b := e & reftOffsetMask; b != 0 && hits(b, c.cs) {
				return olRefcountBlock
			}
		}
	}
	if chk&olBitmapDirectory != 0 && len(h.Bitmaps) > 0 && hits(h.BitmapDirectoryOffset, h.BitmapDirectorySize) {
		return olBitmapDirectory
	}
	return 0
}

// guardWrite refuses a repair's write of n bytes at off that would
// overwrite metadata (qcow2_pre_write_overlap_check), with QEMU's words.
func (c *checker) guardWrite(ign olKind, off, n uint64) error {
	if k := c.overlap(ign, off, n); k != 0 {
		c.msg("ERROR: Preventing invalid write on metadata (overlaps with %s)", k)
		return fmt.Errorf("writing %d bytes at %#x (overlaps with %s): %w", n, off, k, errMetadataOverlap)
	}
	return nil
}

// fixByZero turns entry i of the L2 table at l2off (word, bitmap as
// read), an unaligned preallocated cluster, into a zero cluster that
// references no host cluster (fix_l2_entry_by_zero), and counts the
// repair. It returns false when the entry could not be written (a check
// error), and an error when the write would overwrite other metadata,
// which ends the check as in QEMU.
func (c *checker) fixByZero(l2off uint64, i int, word, bitmap uint64, active bool) (bool, error) {
	eb := uint64(c.g.entryBytes())
	at := l2off + uint64(i)*eb
	b := make([]byte, eb)
	if c.g.extended {
		bitmap |= bitmap << 32
		bitmap &^= bitmapAllocMask
		binary.BigEndian.PutUint64(b[8:], bitmap)
	} else {
		binary.BigEndian.PutUint64(b, entryZero)
	}
	ign := olActiveL2
	if !active {
		ign = olInactiveL2
	}
	if err := c.guardWrite(ign, at, eb); err != nil {
		c.msg("ERROR: Overlap check failed")
		c.res.CheckErrors++
		return false, err
	}
	_, err := c.f.WriteAt(b, int64(at))
	if err == nil {
		err = c.f.Sync()
	}
	if err != nil {
		c.msg("ERROR: Failed to overwrite L2 table entry: %v", err)
		c.res.CheckErrors++
		return false, nil
	}
	c.res.CorruptionsFixed++
	return true, nil
}

// growFile grows the file to end with the refcount block at off, which
// lies past its end, and counts the new clusters (the repair of a
// refcount block outside the image in check_refblocks).
func (c *checker) growFile(off uint64) error {
	if off > math.MaxInt64-c.cs {
		return fmt.Errorf("offset %#x: invalid argument", off)
	}
	size := off + c.cs
	if err := c.growRefs((size + c.cs - 1) >> c.cb); err != nil {
		return err
	}
	if err := c.f.Truncate(int64(size)); err != nil {
		return err
	}
	c.setFileSize(int64(size))
	return nil
}
