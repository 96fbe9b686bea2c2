package qcow2

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// The snapshot table as the check reads and repairs it (QEMU's
// qcow2_check_read_snapshot_table, qcow2_do_read_snapshots in repair
// mode, qcow2_check_fix_snapshot_table and qcow2_write_snapshots). Unlike
// readSnapshots, which refuses a table it cannot use, the check reads
// what QEMU reads and counts the rest: entries whose L1 table is not
// aligned or too large are corruptions (calculate skips them), v3 entries
// with less than 16 bytes of extra data are corruptions, and extra data
// beyond 1024 bytes fails the check unless RepairAll drops it. RepairAll
// then writes the table anew, as qemu-img does.

// snapRepairs counts the snapshot table findings (QEMU's separate
// snapshot_res, added to the result at the end).
type snapRepairs struct {
	corruptions int64
	fixed       int64
	checkErrors int64
}

// errSnapshotTable: the snapshot table could not be read; the check
// fails, as QEMU's.
var errSnapshotTable = errors.New("failed to read the snapshot table")

// checkSnapshot is what the check keeps of a snapshot table entry besides
// its SnapshotEntry: the extra data (at most maxSnapshotExtraData bytes,
// for rewriting the table).
type checkSnapshot struct {
	extra []byte
}

// readSnapshotTable reads the snapshot table into c.snaps (and
// c.snapExtra, c.snapsEnd). With fix (RepairAll), extra data beyond
// QEMU's limit is dropped (a corruption to repair) and snapshots past the
// table size limit are discarded from the header at once, as QEMU does;
// without, either fails the check.
func (c *checker) readSnapshotTable(fix bool) error {
	h := c.h
	c.snaps, c.snapExtra, c.snapsEnd = nil, nil, h.SnapshotsOffset
	if h.NbSnapshots == 0 {
		return nil
	}
	// readHeader has checked the table's offset and its fixed parts.
	start := int64(h.SnapshotsOffset)
	r := &tableReader{f: c.f, name: "snapshot table", limit: start + 2*maxSnapshotTableBytes + 2*maxSnapshotExtraData, fileSize: c.fileSize}
	be := binary.BigEndian
	off := start
	var tableLength int64
	fail := func(format string, args ...any) error {
		c.snapRes.checkErrors++
		c.msg("ERROR failed to read the snapshot table: "+format, args...)
		c.snaps, c.snapExtra = nil, nil
		return fmt.Errorf("%w: "+format, append([]any{errSnapshotTable}, args...)...)
	}
	var dropped, reduced int64
	for i := uint32(0); i < h.NbSnapshots; i++ {
		preOff := off
		tableLength = (tableLength + 7) &^ 7
		off = (off + 7) &^ 7
		hdr, err := r.bytes(off, snapshotHeaderSize)
		if err != nil {
			return fail("Failed to read snapshot table: %v", err)
		}
		s, idSize, nameSize := decodeSnapshotHeader(hdr, off)
		s.DiskSize = h.Size
		off += snapshotHeaderSize
		truncate := false
		if s.ExtraDataSize > maxSnapshotExtraData {
			if !fix {
				err := fail("Too much extra metadata in snapshot table entry %d", i)
				c.msg("You can force-remove this extra metadata with qemu-img check -r all")
				return err
			}
			c.msg("Discarding too much extra metadata in snapshot table entry %d (%d > %d)", i, s.ExtraDataSize, maxSnapshotExtraData)
			dropped++
			truncate = true
		}
		extraEnd := off + int64(s.ExtraDataSize)
		if truncate {
			s.ExtraDataSize = maxSnapshotExtraData
		}
		extra, err := r.bytes(off, int64(s.ExtraDataSize))
		if err != nil {
			return fail("Failed to read snapshot table: %v", err)
		}
		extra = append([]byte(nil), extra...)
		if len(extra) >= extraVMStateSizeEnd {
			s.VMStateSize = be.Uint64(extra[0:])
		}
		if len(extra) >= extraDiskSizeEnd {
			s.DiskSize = be.Uint64(extra[8:])
		}
		if len(extra) >= extraICountEnd {
			if v := be.Uint64(extra[16:]); v != ^uint64(0) {
				s.ICount = &v
			}
		}
		off = extraEnd
		id, err := r.bytes(off, idSize)
		if err != nil {
			return fail("Failed to read snapshot table: %v", err)
		}
		s.ID = cString(id)
		off += idSize
		name, err := r.bytes(off, nameSize)
		if err != nil {
			return fail("Failed to read snapshot table: %v", err)
		}
		s.Name = cString(name)
		off += nameSize
		tableLength += snapshotHeaderSize + int64(s.ExtraDataSize) + idSize + nameSize
		if tableLength > maxSnapshotTableBytes {
			if !fix {
				err := fail("Snapshot table is too big")
				c.msg("You can force-remove all %d overhanging snapshots with qemu-img check -r all", h.NbSnapshots-i)
				return err
			}
			c.msg("Discarding %d overhanging snapshots (snapshot table is too big)", h.NbSnapshots-i)
			reduced += int64(h.NbSnapshots - i)
			off = preOff
			break
		}
		c.snaps = append(c.snaps, s)
		c.snapExtra = append(c.snapExtra, checkSnapshot{extra: extra})
	}
	c.snapsEnd = uint64(off)
	c.snapRes.corruptions += dropped + reduced
	if reduced > 0 {
		// The header must name only the snapshots read before the
		// refcounts are checked; what the others held is then leaked,
		// which the refcount repair frees.
		var b [4]byte
		binary.BigEndian.PutUint32(b[:], uint32(len(c.snaps)))
		_, err := c.f.WriteAt(b[:], offNbSnapshots)
		if err == nil {
			err = c.f.Sync()
		}
		if err != nil {
			c.snapRes.checkErrors++
			c.msg("ERROR failed to update the snapshot count in the image header: %v", err)
			return fmt.Errorf("updating the snapshot count: %w", err)
		}
		h.NbSnapshots = uint32(len(c.snaps))
		c.snapRes.fixed += reduced
		c.snapRes.corruptions -= reduced
	}
	// Every v3 entry needs the 16 bytes of extra data up to disk_size.
	if h.Version >= 3 {
		for i, s := range c.snaps {
			if s.ExtraDataSize < extraDiskSizeEnd {
				c.snapRes.corruptions++
				word := "ERROR"
				if fix {
					word = "Repairing"
				}
				c.msg("%s snapshot table entry %d is incomplete", word, i)
			}
		}
	}
	return nil
}

// checkSnapshotL1 says whether the L1 table of snapshot s can be walked,
// counting a corruption when it cannot (calculate_refcounts).
func (c *checker) checkSnapshotL1(s *SnapshotEntry) bool {
	switch {
	case s.L1TableOffset&(c.cs-1) != 0:
		c.msg("ERROR snapshot %s (%s) l1_offset=%#x: L1 table is not cluster aligned; snapshot table entry corrupted", s.ID, s.Name, s.L1TableOffset)
	case s.L1Size > maxL1Entries:
		c.msg("ERROR snapshot %s (%s) l1_size=%#x: L1 table is too large; snapshot table entry corrupted", s.ID, s.Name, s.L1Size)
	default:
		return true
	}
	c.res.Corruptions++
	return false
}

// snapshotsSize returns the size of the snapshot table: up to the end of
// its last entry as read (QEMU's snapshots_size).
func (c *checker) snapshotsSize() uint64 {
	if len(c.snaps) == 0 {
		return 0
	}
	return c.snapsEnd - c.h.SnapshotsOffset
}

// fixSnapshotTable writes the snapshot table anew when reading it found
// corruptions (qcow2_check_fix_snapshot_table): each entry with its
// extra data completed to 24 bytes or cut to the limit, in clusters
// allocated first-fit by the refcounts (as qcow2_alloc_clusters), synced
// before the header is switched to it; the old table's clusters are
// freed then.
func (c *checker) fixSnapshotTable() error {
	if c.snapRes.corruptions == 0 {
		return nil
	}
	if err := c.writeSnapshotTable(); err != nil {
		c.snapRes.checkErrors++
		c.msg("ERROR failed to update the snapshot table: %v", err)
		return fmt.Errorf("rewriting the snapshot table: %w", err)
	}
	c.snapRes.fixed += c.snapRes.corruptions
	c.snapRes.corruptions = 0
	return nil
}

// writeSnapshotTable is qcow2_write_snapshots.
func (c *checker) writeSnapshotTable() error {
	const extraSize = extraICountEnd
	var size uint64
	for i, s := range c.snaps {
		size = (size+7)&^7 + snapshotHeaderSize + uint64(max(extraSize, len(c.snapExtra[i].extra))) + uint64(len(s.ID)) + uint64(len(s.Name))
	}
	if size > maxSnapshotTableBytes {
		return fmt.Errorf("the snapshot table would take %d bytes, more than the limit of %d", size, maxSnapshotTableBytes)
	}
	buf := make([]byte, size)
	be := binary.BigEndian
	var p uint64
	for i, s := range c.snaps {
		p = (p + 7) &^ 7
		e := buf[p:]
		be.PutUint64(e[0:], s.L1TableOffset)
		be.PutUint32(e[8:], s.L1Size)
		be.PutUint16(e[12:], uint16(len(s.ID)))
		be.PutUint16(e[14:], uint16(len(s.Name)))
		be.PutUint32(e[16:], s.DateSec)
		be.PutUint32(e[20:], s.DateNsec)
		be.PutUint64(e[24:], s.VMClockNsec)
		if s.VMStateSize <= 0xffffffff {
			be.PutUint32(e[32:], uint32(s.VMStateSize))
		}
		extra := c.snapExtra[i].extra
		be.PutUint32(e[36:], uint32(max(extraSize, len(extra))))
		x := e[snapshotHeaderSize:]
		be.PutUint64(x[0:], s.VMStateSize)
		be.PutUint64(x[8:], s.DiskSize)
		icount := ^uint64(0)
		if s.ICount != nil {
			icount = *s.ICount
		}
		be.PutUint64(x[16:], icount)
		if len(extra) > extraSize {
			copy(x[extraSize:], extra[extraSize:])
		}
		p += snapshotHeaderSize + uint64(max(extraSize, len(extra)))
		p += uint64(copy(buf[p:], s.ID))
		p += uint64(copy(buf[p:], s.Name))
	}
	// Allocate, first fit, and take the clusters' refcounts.
	n := (size + c.cs - 1) >> c.cb
	var k, run uint64
	for run < n {
		rc, ok := c.storedRefcount(k)
		if !ok {
			return fmt.Errorf("cannot read the refcount of cluster %d", k)
		}
		if rc != 0 {
			run = 0
		} else {
			run++
		}
		k++
	}
	first := k - n
	for j := first; j < k; j++ {
		if err := c.rt.writeRefcount(c.f, j, 1); err != nil {
			return fmt.Errorf("allocating cluster %d for the snapshot table: %w", j, err)
		}
	}
	if err := c.f.Sync(); err != nil {
		return err
	}
	off := first << c.cb
	if err := c.guardWrite(0, off, size); err != nil {
		return err
	}
	if _, err := c.f.WriteAt(buf, int64(off)); err != nil {
		return err
	}
	if err := c.f.Sync(); err != nil {
		return err
	}
	var hdr [12]byte
	be.PutUint32(hdr[0:], uint32(len(c.snaps)))
	be.PutUint64(hdr[4:], off)
	if _, err := c.f.WriteAt(hdr[:], offNbSnapshots); err != nil {
		return err
	}
	if err := c.f.Sync(); err != nil {
		return err
	}
	// Free the old table.
	oldOff, oldSize := c.h.SnapshotsOffset, c.snapshotsSize()
	c.h.SnapshotsOffset, c.snapsEnd = off, off+size
	if oldSize == 0 {
		return nil
	}
	for j := oldOff >> c.cb; j <= (oldOff+oldSize-1)>>c.cb; j++ {
		rc, ok := c.storedRefcount(j)
		if !ok || rc == 0 {
			continue
		}
		if err := c.rt.writeRefcount(c.f, j, rc-1); err != nil {
			return fmt.Errorf("freeing the old snapshot table: %w", err)
		}
		if rc == 1 {
			c.discard(j)
		}
	}
	return nil
}

// cString returns b up to its first NUL byte: QEMU keeps snapshot IDs and
// names as C strings, and writes them back as such.
func cString(b []byte) string {
	for i, x := range b {
		if x == 0 {
			return string(b[:i])
		}
	}
	return string(b)
}
