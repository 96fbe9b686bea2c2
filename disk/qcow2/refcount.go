package qcow2

import (
	"encoding/binary"
	"fmt"
	"io"

	"github.com/imgloop/imgloop/disk"
)

// Refcounts (docs/interop/qcow2.txt, "Host cluster management"): a
// refcount table of 64-bit entries points to refcount blocks, each one
// cluster of refcount_bits-wide entries, one per host cluster.

const (
	// reftOffsetMask selects bits 9-63 of a refcount table entry, the
	// offset of a refcount block.
	reftOffsetMask = ^uint64(0x1ff)
	// reftReservedMask: bits 0-8 of a refcount table entry must be zero.
	reftReservedMask = uint64(0x1ff)
)

// refcountTable is an image's refcount table, read whole (at most 8 MiB,
// QEMU's limit, enforced by readHeader), with what is needed to find and
// decode refcount blocks. Entries are kept raw; each use validates them.
type refcountTable struct {
	f           io.ReaderAt
	fileSize    int64
	clusterBits uint
	order       uint     // refcount_order, 0..6
	entries     []uint64 // raw table entries
	offset      uint64   // file offset of the table

	// The last refcount block read, kept for sequential lookups.
	blockOff uint64
	block    []byte
}

// refblockProblem says why a refcount table entry cannot be followed.
type refblockProblem uint8

const (
	refblockOK        refblockProblem = iota
	refblockNone                      // entry 0 (or past the table): refcounts are 0
	refblockReserved                  // reserved bits set
	refblockUnaligned                 // offset not cluster aligned
	refblockPastEOF                   // block starts at or past the end of the file
)

// readRefcountTable reads the refcount table of h from f, a file of
// fileSize bytes. readHeader has checked that the table lies inside the
// file and within QEMU's size limit.
func readRefcountTable(f io.ReaderAt, h *Header, fileSize int64) (*refcountTable, error) {
	n := int64(h.RefcountTableClusters) << h.ClusterBits
	if n > maxRefcountTableBytes || h.RefcountOrder > maxRefcountOrder {
		return nil, formatErr(offRefcountTableClusters, "refcount table of %d bytes exceeds the limit of %d", n, maxRefcountTableBytes)
	}
	buf := make([]byte, n)
	// Past the end of the file the table reads as zeros, as in QEMU: only
	// Check meets such a table (readHeader refuses it, readHeaderToCheck
	// lets it through for diagnosis).
	if err := readAtZero(f, buf, int64(h.RefcountTableOffset), fileSize); err != nil {
		return nil, fmt.Errorf("qcow2: reading the refcount table: %w", err)
	}
	t := &refcountTable{
		f:           f,
		fileSize:    fileSize,
		clusterBits: uint(h.ClusterBits),
		order:       uint(h.RefcountOrder),
		entries:     make([]uint64, n/8),
		offset:      h.RefcountTableOffset,
	}
	for i := range t.entries {
		t.entries[i] = binary.BigEndian.Uint64(buf[i*8:])
	}
	return t, nil
}

// blockBits is log2 of the number of refcount entries in one block.
func (t *refcountTable) blockBits() uint { return t.clusterBits + 3 - t.order }

// maxRefcount is the largest refcount an entry can hold.
func (t *refcountTable) maxRefcount() uint64 {
	if t.order == 6 {
		return ^uint64(0)
	}
	return 1<<(1<<t.order) - 1
}

// blockFor returns the offset of refcount block i of the table (the one
// covering clusters [i<<blockBits, (i+1)<<blockBits)) and whether it can
// be read.
func (t *refcountTable) blockFor(i uint64) (uint64, refblockProblem) {
	if i >= uint64(len(t.entries)) {
		return 0, refblockNone
	}
	e := t.entries[i]
	off := e & reftOffsetMask
	switch {
	case e&reftReservedMask != 0:
		return off, refblockReserved
	case off == 0:
		return 0, refblockNone
	case off&(1<<t.clusterBits-1) != 0:
		return off, refblockUnaligned
	case off >= uint64(t.fileSize):
		return off, refblockPastEOF
	}
	return off, refblockOK
}

// readBlock returns the refcount block at off (a valid, in-file offset);
// the part of it past the end of the file reads as zeros, as QEMU reads
// it. The slice is valid until the next call.
func (t *refcountTable) readBlock(off uint64) ([]byte, error) {
	if t.block != nil && t.blockOff == off {
		return t.block, nil
	}
	cs := 1 << t.clusterBits
	if t.block == nil {
		t.block = make([]byte, cs)
	}
	if err := readAtZero(t.f, t.block, int64(off), t.fileSize); err != nil {
		t.block = nil
		return nil, fmt.Errorf("qcow2: reading refcount block at %#x: %w", off, err)
	}
	t.blockOff = off
	return t.block, nil
}

// refcountEntry decodes entry i of a refcount block of refcount_order
// order. Entries narrower than a byte are packed from the least
// significant bit (as QEMU stores them); wider ones are big endian.
func refcountEntry(block []byte, order uint, i uint64) uint64 {
	switch order {
	case 0, 1, 2:
		bits := uint64(1) << order
		perByte := 8 / bits
		b := block[i/perByte]
		return uint64(b>>((i%perByte)*bits)) & (1<<bits - 1)
	case 3:
		return uint64(block[i])
	case 4:
		return uint64(binary.BigEndian.Uint16(block[i*2:]))
	case 5:
		return uint64(binary.BigEndian.Uint32(block[i*4:]))
	default:
		return binary.BigEndian.Uint64(block[i*8:])
	}
}

// putRefcountEntry stores v (which must fit) in entry i of a refcount
// block of refcount_order order, packed as refcountEntry reads it, and
// returns the bytes [pos, pos+n) of block it changed.
func putRefcountEntry(block []byte, order uint, i, v uint64) (pos, n uint64) {
	if order < 3 {
		bits := uint64(1) << order
		perByte := 8 / bits
		pos = i / perByte
		shift := (i % perByte) * bits
		mask := byte((1<<bits - 1) << shift)
		block[pos] = block[pos]&^mask | byte(v<<shift)&mask
		return pos, 1
	}
	width := uint64(1) << (order - 3)
	pos = i * width
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], v)
	copy(block[pos:pos+width], b[8-width:])
	return pos, width
}

// Refcount returns the stored refcount of host cluster (index) cluster.
// A cluster past the refcount table, or whose table entry is 0, has
// refcount 0.
//
// Errors: a *disk.FormatError with Corrupt set when the refcount table
// entry has reserved bits set, is not cluster aligned or points past the
// end of the file; the read error of the file, wrapped.
func (t *refcountTable) Refcount(cluster uint64) (uint64, error) {
	bb := t.blockBits()
	i := cluster >> bb
	off, p := t.blockFor(i)
	switch p {
	case refblockNone:
		return 0, nil
	case refblockOK:
	default:
		return 0, &disk.FormatError{Format: formatName, Offset: int64(t.offset + i*8), Corrupt: true,
			What: fmt.Sprintf("refcount table entry %d (%#x): %s", i, t.entries[i], p)}
	}
	block, err := t.readBlock(off)
	if err != nil {
		return 0, err
	}
	return refcountEntry(block, t.order, cluster&(1<<bb-1)), nil
}

// writeRefcount sets the stored refcount of host cluster (index) cluster
// to v, writing its refcount block through w, and keeps the cached block
// in step. The block must exist and be valid; entries narrower than a
// byte are read, modified and written back with their neighbours.
//
// Errors: those of Refcount; a *disk.FormatError when the cluster has no
// refcount block or v does not fit; the write error, wrapped.
func (t *refcountTable) writeRefcount(w io.WriterAt, cluster, v uint64) error {
	bb := t.blockBits()
	i := cluster >> bb
	off, p := t.blockFor(i)
	if p != refblockOK {
		return &disk.FormatError{Format: formatName, Offset: int64(t.offset + i*8), Corrupt: p != refblockNone,
			What: fmt.Sprintf("cannot set the refcount of cluster %d: refcount table entry %d: %s", cluster, i, p)}
	}
	if v > t.maxRefcount() {
		return &disk.FormatError{Format: formatName, Offset: -1, What: fmt.Sprintf("refcount %d exceeds the %d-bit entries", v, 1<<t.order)}
	}
	block, err := t.readBlock(off)
	if err != nil {
		return err
	}
	pos, n := putRefcountEntry(block, t.order, cluster&(1<<bb-1), v)
	if _, err := w.WriteAt(block[pos:pos+n], int64(off+pos)); err != nil {
		t.block = nil // the cached copy may no longer match the file
		return fmt.Errorf("qcow2: writing refcount block at %#x: %w", off, err)
	}
	return nil
}

// String describes the problem.
func (p refblockProblem) String() string {
	switch p {
	case refblockOK:
		return "ok"
	case refblockNone:
		return "no refcount block"
	case refblockReserved:
		return "reserved bits set"
	case refblockUnaligned:
		return "refcount block offset not cluster aligned"
	case refblockPastEOF:
		return "refcount block lies past the end of the file"
	}
	return fmt.Sprintf("refblockProblem(%d)", uint8(p))
}

// readAtZero fills p from f at off, reading as zeros whatever lies at or
// past fileSize (QEMU reads metadata past the end of the file as zeros).
func readAtZero(f io.ReaderAt, p []byte, off, fileSize int64) error {
	n := int64(len(p))
	if off < 0 {
		return fmt.Errorf("qcow2: offset %#x is out of range", uint64(off))
	}
	if off >= fileSize {
		clear(p)
		return nil
	}
	if fileSize-off < n {
		clear(p[fileSize-off:])
		p = p[:fileSize-off]
	}
	return readAt(f, p, off)
}
