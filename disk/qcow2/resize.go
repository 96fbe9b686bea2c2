package qcow2

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/imgloop/imgloop/disk"
)

// Resizing (qemu-img resize; QEMU's qcow2_co_truncate). Resize first
// flushes the metadata writes keep in memory, so that the tables in the
// file are current. Growing writes the new size into the header, first
// making the L1 table long enough: entries are added in place when the
// clusters of the current table have room for them, else the table
// moves to new clusters. Shrinking is allowed only when no guest cluster
// past the new end is allocated in this image, so that it never loses
// data; it then only writes the new size. As in QEMU, l1_size is left as
// it is when shrinking (a larger L1 table than the disk needs is valid),
// and an external data file is truncated to the new size.
//
// Crash safety: each step leaves a consistent image. A moved L1 table is
// written and synced before the header points to it (l1_size and
// l1_table_offset change in one 12-byte write), and the old table's
// clusters are released only after that write is synced: a crash in
// between leaks them at worst. The size is written last when growing,
// and before the data file is truncated when shrinking.

var _ disk.Resizer = (*Image)(nil)

// ErrShrinkAllocated is matched by the error Resize returns for a shrink
// that would drop allocated clusters.
var ErrShrinkAllocated = errors.New("clusters past the new end are allocated")

// Resize sets the virtual disk size to size bytes, a multiple of 512 (as
// QEMU requires for qcow2).
//
// Growing: the new area reads as zeros. When the backing file is longer
// than the old size, its data would show through there, so (as QEMU
// does) the area up to the backing file's end is made zero: zero
// clusters in a version 3 image; version 2 images are refused, as QEMU
// refuses them. Shrinking succeeds only when no cluster starting at or
// past the new end is allocated (data, zero or compressed clusters
// alike); the cluster holding the new end keeps its content past it, as
// in QEMU.
//
// Resize may be called while other calls are in flight: it waits for
// them (it replaces the L1 table that they use without locks), and calls
// made meanwhile wait for it. After a successful resize the functions
// registered with NotifyResize are called with the new size.
//
// Errors: disk.ErrClosed; disk.ErrReadOnly when img was opened read-only
// or shows a snapshot; an error wrapping ErrShrinkAllocated; a
// *disk.UnsupportedError (disk.ErrNotSupported) for images whose
// features prevent it: a version 2 image with internal snapshots (QEMU's
// refusal), persistent bitmaps, growing a raw external data file, or an
// image this driver cannot write; a *disk.FormatError with Corrupt set
// for an image marked corrupt or with a bad table entry; the host
// files' errors, wrapped.
func (img *Image) Resize(size int64) error {
	if img.closed.Load() {
		return disk.ErrClosed
	}
	img.ops.Lock()
	err := img.resize(size)
	img.ops.Unlock()
	if err != nil {
		return err
	}
	img.resized.Notify(size)
	return nil
}

var _ disk.ResizeNotifier = (*Image)(nil)

// NotifyResize registers fn to be called after each successful Resize
// (disk.ResizeNotifier).
func (img *Image) NotifyResize(fn func(size int64)) (stop func()) { return img.resized.Add(fn) }

// resize is Resize under the exclusive side of img.ops.
func (img *Image) resize(size int64) error {
	if img.closed.Load() {
		return disk.ErrClosed
	}
	h := img.header()
	switch {
	case size < 0:
		return fmt.Errorf("qcow2: resize: negative size %d", size)
	case size%512 != 0:
		return fmt.Errorf("qcow2: resize: the new size %d is not a multiple of 512", size)
	case h.Corrupt():
		return fmt.Errorf("qcow2: resize: %w", img.corrupt(offIncompatibleFeatures, "the image is marked corrupt"))
	case h.NbSnapshots > 0 && h.Version < 3:
		// QEMU: snapshot sizes were optional in version 2.
		return img.unsupported("resizing a version 2 image that has internal snapshots")
	case h.AutoclearFeatures&AutoclearBitmaps != 0 && h.NbBitmaps > 0:
		return img.unsupported("resizing an image with persistent bitmaps")
	case h.DataFileRaw() && size > img.size.Load():
		return img.unsupported("growing an image with a raw external data file (its new L2 entries would have to be preallocated)")
	}
	need := h.l1EntriesFor(uint64(size))
	if need > maxL1Entries {
		return fmt.Errorf("qcow2: resize to %d bytes: the L1 table would need %d entries, over QEMU's limit of %d (32 MiB): %w",
			size, need, maxL1Entries, disk.ErrOutOfRange)
	}
	if err := img.writable("resize"); err != nil {
		return err
	}
	if size == img.size.Load() {
		return nil
	}
	// The tables in the file must be current: they are read, copied and
	// extended below.
	if err := img.flush(); err != nil {
		return err
	}
	var err error
	if size > img.size.Load() {
		err = img.grow(size, need)
	} else {
		err = img.shrink(size)
	}
	if err != nil {
		return err
	}
	// References dropped by a moved L1 table reach the file.
	return img.flush()
}

// unsupported returns the *disk.UnsupportedError for a resize that cannot
// be done.
func (img *Image) unsupported(feature string) error {
	return &disk.UnsupportedError{Format: formatName, Feature: feature}
}

// grow resizes to size (> img.size.Load()), which needs need L1 entries.
func (img *Image) grow(size int64, need uint64) error {
	old := img.size.Load()
	// Past the old end the backing file must not show through.
	var zeroEnd int64
	if b := img.Backing(); b != nil && b.Size() > old {
		zeroEnd = min(size, b.Size())
		if img.header().Version < 3 {
			return img.unsupported(fmt.Sprintf("growing a version 2 image whose backing file is longer than it (%d > %d bytes): "+
				"the new area would need zero clusters", b.Size(), old))
		}
	}
	if err := img.growL1(need); err != nil {
		return err
	}
	if img.data != img.f {
		if err := img.truncateData(size); err != nil {
			return err
		}
	}
	img.size.Store(size)
	if zeroEnd > old {
		err := img.zeroRange(old, zeroEnd-old, false)
		if err == nil {
			err = img.flush()
		}
		if err != nil {
			img.size.Store(old)
			return fmt.Errorf("qcow2: resize: zeroing the new area over the backing file: %w", err)
		}
	}
	if err := img.writeSize(size); err != nil {
		img.size.Store(old)
		return err
	}
	return nil
}

// truncateData sets the external data file's length to size and syncs
// it, as QEMU does on a resize.
func (img *Image) truncateData(size int64) error {
	if err := img.data.Truncate(size); err != nil {
		return img.fail(fmt.Errorf("qcow2: resize: data file %s: %w", img.dataName, err))
	}
	if err := img.data.Sync(); err != nil {
		return img.fail(fmt.Errorf("qcow2: resize: data file %s: %w", img.dataName, err))
	}
	return nil
}

// shrink resizes to size (< img.size.Load()) if no cluster past it is
// allocated.
func (img *Image) shrink(size int64) error {
	if err := img.checkTailFree(size); err != nil {
		return err
	}
	if err := img.writeSize(size); err != nil {
		return err
	}
	if img.data != img.f {
		if err := img.truncateData(size); err != nil {
			return err
		}
	}
	n := img.header().l1EntriesFor(uint64(size))
	l1 := make([]uint64, n)
	copy(l1, img.l1)
	img.l1 = l1
	img.size.Store(size)
	return nil
}

// writeSize writes size into the header and syncs.
func (img *Image) writeSize(size int64) error {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], uint64(size))
	if _, err := img.f.WriteAt(b[:], offSize); err != nil {
		return img.fail(fmt.Errorf("qcow2: resize: writing the size to the header: %w", err))
	}
	if err := img.syncFiles(); err != nil {
		return img.fail(err)
	}
	img.updateHeader(func(h *Header) { h.Size = uint64(size) })
	return nil
}

// checkTailFree returns an error wrapping ErrShrinkAllocated if a guest
// cluster at or past the one holding byte size (rounded up to a cluster)
// is allocated, up to the current size. Any non-zero L2 entry counts
// (with extended L2 entries, either half).
func (img *Image) checkTailFree(size int64) error {
	g := &img.geo
	cb := g.clusterBits
	l2Bits := g.l2Bits()
	eb := uint64(g.entryBytes())
	first := (uint64(size) + uint64(g.clusterSize()) - 1) >> cb
	end := (uint64(img.size.Load()) + uint64(g.clusterSize()) - 1) >> cb // clusters of the current disk
	var table []byte
	for ci := first; ci < end; {
		l1i := ci >> l2Bits
		tableEnd := min(end, (l1i+1)<<l2Bits)
		off := img.l1[l1i]
		if off == 0 {
			ci = tableEnd
			continue
		}
		if table == nil {
			table = make([]byte, g.clusterSize())
		}
		if err := readAt(img.f, table, int64(off)); err != nil {
			return fmt.Errorf("qcow2: resize: reading L2 table at %#x: %w", off, err)
		}
		for ; ci < tableEnd; ci++ {
			i := (ci & (1<<l2Bits - 1)) * eb
			word := binary.BigEndian.Uint64(table[i:])
			var bitmap uint64
			if g.extended {
				bitmap = binary.BigEndian.Uint64(table[i+8:])
			}
			if word == 0 && bitmap == 0 {
				continue
			}
			what := "allocated"
			if e, bad := g.decodeL2(word, bitmap); bad == "" {
				what = e.kind.String() + " cluster"
			}
			return fmt.Errorf("qcow2: resize: cannot shrink to %d bytes: %w: the first, at guest offset %#x, holds a %s (L2 entry %#016x at %#x)",
				size, ErrShrinkAllocated, int64(ci)<<cb, what, word, off+i)
		}
	}
	return nil
}

// growL1 makes img.l1 hold need entries, growing the L1 table in the file
// when l1_size is smaller than that.
func (img *Image) growL1(need uint64) error {
	h := img.header()
	have := uint64(len(img.l1))
	if need <= have {
		return nil
	}
	l1 := make([]uint64, need)
	copy(l1, img.l1)
	// Entries the table holds past the old disk's end (left there by a
	// shrink, or by another tool) become part of the disk again, as in
	// QEMU, which keeps the whole table.
	if kept := min(need, uint64(h.L1Size)); kept > have {
		if err := img.readL1Entries(l1[have:kept], have); err != nil {
			return err
		}
	}
	if need > uint64(h.L1Size) {
		cs := uint64(img.geo.clusterSize())
		clusters := (uint64(h.L1Size)*8 + cs - 1) / cs
		var err error
		if h.L1Size > 0 && h.L1TableOffset != 0 && need*8 <= clusters*cs {
			err = img.extendL1(need, l1)
		} else {
			err = img.moveL1(need)
		}
		if err != nil {
			return err
		}
	}
	img.l1 = l1
	return nil
}

// readL1Entries reads the L1 entries from index first into dst, decoding
// and validating them against the file's current size.
func (img *Image) readL1Entries(dst []uint64, first uint64) error {
	at := int64(img.header().L1TableOffset) + int64(first)*8
	buf := make([]byte, len(dst)*8)
	if err := readAt(img.f, buf, at); err != nil {
		return fmt.Errorf("qcow2: resize: reading the L1 table: %w", err)
	}
	fileSize, err := img.f.Size()
	if err != nil {
		return fmt.Errorf("qcow2: resize: %w", err)
	}
	g := img.geo
	g.fileSize = fileSize
	for i := range dst {
		off, bad := g.decodeL1(binary.BigEndian.Uint64(buf[i*8:]))
		if bad != "" {
			return fmt.Errorf("qcow2: resize: %w", img.corrupt(at+int64(i)*8, fmt.Sprintf("L1 index %d: %s", first+uint64(i), bad)))
		}
		dst[i] = off
	}
	return nil
}

// extendL1 raises l1_size to need where the table's clusters have room:
// the new entries are zeroed and synced, then l1_size written and synced.
func (img *Image) extendL1(need uint64, l1 []uint64) error {
	h := img.header()
	zero := make([]byte, (need-uint64(h.L1Size))*8)
	at := int64(h.L1TableOffset) + int64(h.L1Size)*8
	if what := img.metadataAt(at, int64(len(zero)), l1); what != "" {
		return fmt.Errorf("qcow2: resize: %w", img.corrupt(int64(h.L1TableOffset),
			fmt.Sprintf("the L1 table's last cluster overlaps the %s", what)))
	}
	if _, err := img.f.WriteAt(zero, at); err != nil {
		return img.fail(fmt.Errorf("qcow2: resize: zeroing new L1 entries at %#x: %w", at, err))
	}
	if err := img.syncFiles(); err != nil {
		return img.fail(err)
	}
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], uint32(need))
	if _, err := img.f.WriteAt(b[:], offL1Size); err != nil {
		return img.fail(fmt.Errorf("qcow2: resize: writing l1_size to the header: %w", err))
	}
	if err := img.syncFiles(); err != nil {
		return img.fail(err)
	}
	img.updateHeader(func(h *Header) { h.L1Size = uint32(need) })
	return nil
}

// moveL1 writes an L1 table of need entries (the current table's raw
// entries, then zeros) to newly allocated clusters, points the header at
// it and releases the old table.
func (img *Image) moveL1(need uint64) error {
	h := img.header()
	cs := img.geo.clusterSize()
	n := (int64(need)*8 + cs - 1) / cs
	buf := make([]byte, n*cs)
	oldBytes := int64(h.L1Size) * 8
	if oldBytes > 0 {
		// The file holds the entries with their flags (COPIED): Resize
		// flushed the writer's metadata first.
		if err := readAt(img.f, buf[:oldBytes], int64(h.L1TableOffset)); err != nil {
			return fmt.Errorf("qcow2: resize: reading the L1 table: %w", err)
		}
	}
	w := img.w
	w.mu.Lock()
	defer w.mu.Unlock()
	off, _, err := w.alloc.allocate(n, 0)
	if err != nil {
		return img.fail(fmt.Errorf("qcow2: resize: allocating %d clusters for the L1 table: %w", n, err))
	}
	if _, err := img.f.WriteAt(buf, off); err != nil {
		return img.fail(fmt.Errorf("qcow2: resize: writing the L1 table at %#x: %w", off, err))
	}
	if err := img.syncFiles(); err != nil {
		return img.fail(err)
	}
	var b [12]byte // l1_size and l1_table_offset, adjacent in the header
	binary.BigEndian.PutUint32(b[:4], uint32(need))
	binary.BigEndian.PutUint64(b[4:], uint64(off))
	if _, err := img.f.WriteAt(b[:], offL1Size); err != nil {
		return img.fail(fmt.Errorf("qcow2: resize: writing the L1 table's place to the header: %w", err))
	}
	if err := img.syncFiles(); err != nil {
		return img.fail(err)
	}
	oldOff := h.L1TableOffset
	img.updateHeader(func(h *Header) { h.L1Size, h.L1TableOffset = uint32(need), uint64(off) })
	if oldBytes > 0 && oldOff != 0 {
		if err := w.alloc.release(int64(oldOff), oldBytes); err != nil {
			return img.fail(fmt.Errorf("qcow2: resize: releasing the old L1 table at %#x: %w", oldOff, err))
		}
	}
	return nil
}

// metadataAt names the metadata other than the active L1 table that
// [off, off+n) overlaps, "" if none: the header cluster, the refcount
// table, the snapshot table, a snapshot's L1 table or an L2 table of l1
// (the active L1 entries).
// An image that passes qemu-img check has no such overlap; a crafted one
// could, and extending the L1 table in place must not write over it.
func (img *Image) metadataAt(off, n int64, l1 []uint64) string {
	h := img.header()
	cs := img.geo.clusterSize()
	over := func(start, size int64) bool { return size > 0 && off < start+size && start < off+n }
	if over(0, cs) {
		return "header"
	}
	if over(int64(h.RefcountTableOffset), int64(h.RefcountTableClusters)*cs) {
		return "refcount table"
	}
	for _, sn := range img.snaps {
		if over(sn.Offset, snapshotHeaderSize) {
			return "snapshot table"
		}
		if over(int64(sn.L1TableOffset), int64(sn.L1Size)*8) {
			return fmt.Sprintf("L1 table of snapshot %q", sn.ID)
		}
	}
	for i, t := range l1 {
		if t != 0 && over(int64(t), cs) {
			return fmt.Sprintf("L2 table of L1 index %d", i)
		}
	}
	return ""
}
