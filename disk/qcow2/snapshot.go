package qcow2

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/imgloop/imgloop/disk"
)

// ErrSnapshotNotFound is returned (wrapped) when no internal snapshot has
// the requested ID or name.
var ErrSnapshotNotFound = errors.New("snapshot not found")

// Snapshot table limits. They are QEMU's (block/qcow2.h): QEMU refuses
// tables beyond them, and they bound what a hostile table makes us read.
const (
	// maxSnapshots is QCOW_MAX_SNAPSHOTS.
	maxSnapshots = 65536
	// maxSnapshotTableBytes is QCOW_MAX_SNAPSHOTS_SIZE (64 MiB).
	maxSnapshotTableBytes = 1024 * maxSnapshots
	// maxSnapshotExtraData is QCOW_MAX_SNAPSHOT_EXTRA_DATA.
	maxSnapshotExtraData = 1024
	// snapshotHeaderSize is the fixed part of a snapshot table entry.
	snapshotHeaderSize = 40
)

// Ends of the fields of a snapshot entry's extra data.
const (
	extraVMStateSizeEnd = 8  // vm_state_size_large
	extraDiskSizeEnd    = 16 // disk_size
	extraICountEnd      = 24 // icount
)

// SnapshotEntry is one entry of the snapshot table (docs/interop/qcow2.txt,
// "Snapshots").
type SnapshotEntry struct {
	// Offset is the file offset of the entry.
	Offset int64
	// L1TableOffset is the file offset of the snapshot's L1 table.
	L1TableOffset uint64
	// L1Size is the number of entries of the snapshot's L1 table.
	L1Size uint32
	// ID is the snapshot's unique ID string.
	ID string
	// Name is the snapshot's name.
	Name string
	// DateSec and DateNsec are when the snapshot was taken (seconds since
	// the Epoch and nanoseconds).
	DateSec  uint32
	DateNsec uint32
	// VMClockNsec is how long the guest had run, in nanoseconds.
	VMClockNsec uint64
	// VMStateSize is the size of the saved VM state in bytes (0 for a
	// disk-only snapshot); the 64-bit field of the extra data when present.
	VMStateSize uint64
	// DiskSize is the virtual disk size when the snapshot was taken, 0 if
	// the entry does not record it.
	DiskSize uint64
	// ICount is the guest instruction count, nil when not recorded (QEMU
	// writes all ones for "none").
	ICount *uint64
	// ExtraDataSize is the size of the entry's extra data.
	ExtraDataSize uint32
}

// readSnapshots reads the snapshot table of h from f, a file of fileSize
// bytes. Every entry must lie inside the file and the table within QEMU's
// limits (65536 entries, 64 MiB, 1 KiB of extra data per entry). A
// snapshot's own tables are not checked here but when the snapshot is
// used (checkL1), as QEMU does: a damaged entry must not keep the active
// image, which does not use it, from being read.
//
// Errors: *disk.FormatError (disk.ErrFormat) for a malformed table; the read
// error of f, wrapped.
func readSnapshots(f io.ReaderAt, h *Header, fileSize int64) ([]SnapshotEntry, error) {
	if h.NbSnapshots == 0 {
		return nil, nil
	}
	if h.NbSnapshots > maxSnapshots {
		return nil, formatErr(offNbSnapshots, "nb_snapshots %d exceeds the limit of %d", h.NbSnapshots, maxSnapshots)
	}
	cs := uint64(h.ClusterSize())
	if h.SnapshotsOffset%cs != 0 || h.SnapshotsOffset == 0 {
		return nil, formatErr(offSnapshotsOffset, "snapshot table offset %#x is not a cluster aligned offset past the header", h.SnapshotsOffset)
	}
	if h.SnapshotsOffset > uint64(fileSize) {
		return nil, formatErr(offSnapshotsOffset, "snapshot table at %#x lies past the end of the file (%d bytes)", h.SnapshotsOffset, fileSize)
	}
	start := int64(h.SnapshotsOffset)
	// The table is read in chunks of at most 64 KiB, the size of a
	// QEMU-written table of ~1000 snapshots, so that a hostile nb_snapshots
	// costs reads, not memory.
	r := &tableReader{f: f, name: fmt.Sprintf("snapshot table (at most %d bytes)", maxSnapshotTableBytes), limit: start + maxSnapshotTableBytes, fileSize: fileSize}
	list := make([]SnapshotEntry, 0, min(h.NbSnapshots, 1024))
	be := binary.BigEndian
	off := start
	for i := uint32(0); i < h.NbSnapshots; i++ {
		off = (off + 7) &^ 7
		entryErr := func(at int64, format string, args ...any) error {
			return formatErr(at, "snapshot %d: %s", i, fmt.Sprintf(format, args...))
		}
		readErr := func(at int64, what string, err error) error {
			return &disk.FormatError{Format: formatName, Offset: at, What: fmt.Sprintf("snapshot %d: %s", i, what), Err: err}
		}
		hdr, err := r.bytes(off, snapshotHeaderSize)
		if err != nil {
			return nil, readErr(off, "entry header", err)
		}
		s, idSize, nameSize := decodeSnapshotHeader(hdr, off)
		if s.ExtraDataSize > maxSnapshotExtraData {
			return nil, entryErr(off+36, "%d bytes of extra data exceed the limit of %d", s.ExtraDataSize, maxSnapshotExtraData)
		}
		p := off + snapshotHeaderSize
		extra, err := r.bytes(p, int64(s.ExtraDataSize))
		if err != nil {
			return nil, readErr(p, "extra data", err)
		}
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
		p += int64(s.ExtraDataSize)
		id, err := r.bytes(p, idSize)
		if err != nil {
			return nil, readErr(p, "ID", err)
		}
		s.ID = string(id)
		p += idSize
		name, err := r.bytes(p, nameSize)
		if err != nil {
			return nil, readErr(p, "name", err)
		}
		s.Name = string(name)
		off = p + nameSize
		list = append(list, s)
	}
	return list, nil
}

// checkL1 validates the snapshot's L1 table, for an image whose clusters
// are cs bytes, in a file of fileSize bytes: at most 32 MiB, cluster
// aligned, past the header and inside the file (QEMU's
// qcow2_validate_table, plus the end of the file, past which QEMU would
// read zeros). Callers check a snapshot before they use its tables:
// Open on the snapshot it opens, and on all of them for writing, whose
// allocator must keep off every snapshot's L1 table.
//
// Errors: *disk.FormatError (disk.ErrFormat, disk.ErrCorrupt) naming
// the snapshot.
func (s *SnapshotEntry) checkL1(cs uint64, fileSize int64) error {
	bad := func(at int64, format string, args ...any) error {
		return &disk.FormatError{Format: formatName, Offset: at, Corrupt: true,
			What: fmt.Sprintf("snapshot %s (%q): %s; snapshot table entry corrupted", s.ID, s.Name, fmt.Sprintf(format, args...))}
	}
	if s.L1Size > maxL1Entries {
		return bad(s.Offset+8, "L1 table of %d entries exceeds the limit of %d (32 MiB)", s.L1Size, maxL1Entries)
	}
	if s.L1TableOffset%cs != 0 {
		return bad(s.Offset, "L1 table offset %#x is not aligned to the cluster size %d", s.L1TableOffset, cs)
	}
	if n := uint64(s.L1Size) * 8; n != 0 {
		if s.L1TableOffset == 0 {
			return bad(s.Offset, "L1 table at offset 0 overlaps the header")
		}
		if s.L1TableOffset > uint64(fileSize) || n > uint64(fileSize)-s.L1TableOffset {
			return bad(s.Offset, "L1 table (%d bytes at %#x) extends past the end of the file (%d bytes)", n, s.L1TableOffset, fileSize)
		}
	}
	return nil
}

// tableReader reads a variable-length table from f in bounded chunks.
type tableReader struct {
	f        io.ReaderAt
	name     string // the table's name, for errors
	limit    int64  // the table may not extend past limit...
	fileSize int64  // ...nor past the end of the file
	buf      []byte // file bytes [bufOff, bufOff+len(buf))
	bufOff   int64
}

// tableChunk is how much tableReader reads at a time.
const tableChunk = 64 << 10

// bytes returns n bytes at off (valid until the next call), or an error if
// they extend past the table's limit or the end of the file.
func (r *tableReader) bytes(off, n int64) ([]byte, error) {
	end := min(r.limit, r.fileSize)
	if n > end-off {
		if off+n > r.limit {
			return nil, fmt.Errorf("the %s would extend past %#x", r.name, r.limit)
		}
		return nil, fmt.Errorf("%d bytes at %#x run past the end of the file (%d bytes)", n, off, r.fileSize)
	}
	if off >= r.bufOff && off+n <= r.bufOff+int64(len(r.buf)) {
		return r.buf[off-r.bufOff : off-r.bufOff+n], nil
	}
	size := min(max(n, tableChunk), end-off)
	if int64(cap(r.buf)) < size {
		r.buf = make([]byte, size)
	}
	r.buf = r.buf[:size]
	r.bufOff = off
	if err := readAt(r.f, r.buf, off); err != nil {
		r.buf = r.buf[:0]
		return nil, err
	}
	return r.buf[:n], nil
}

// findSnapshot returns the snapshot whose ID is idOrName or, failing that,
// the first whose name is, as qemu-img does.
//
// Errors: ErrSnapshotNotFound, wrapped with the name asked for.
func findSnapshot(list []SnapshotEntry, idOrName string) (*SnapshotEntry, error) {
	for i := range list {
		if list[i].ID == idOrName {
			return &list[i], nil
		}
	}
	for i := range list {
		if list[i].Name == idOrName {
			return &list[i], nil
		}
	}
	return nil, fmt.Errorf("qcow2: no snapshot with ID or name %q (%d snapshots): %w", idOrName, len(list), ErrSnapshotNotFound)
}

// Info returns the snapshot as qemu-img info lists it.
func (s SnapshotEntry) Info() disk.Snapshot {
	const nsec = 1_000_000_000
	info := disk.Snapshot{
		ID:          s.ID,
		Name:        s.Name,
		VMStateSize: s.VMStateSize,
		DateSec:     int64(s.DateSec),
		DateNsec:    int64(s.DateNsec),
		VMClockSec:  int64(s.VMClockNsec / nsec),
		VMClockNsec: int64(s.VMClockNsec % nsec),
		VirtualSize: int64(min(s.DiskSize, 1<<63-1)),
	}
	if s.ICount != nil {
		v := *s.ICount
		info.ICount = &v
	}
	return info
}

// decodeSnapshotHeader decodes the fixed part of the snapshot table entry
// at file offset off (hdr holds its snapshotHeaderSize bytes), and returns
// the lengths of the ID and name that follow the extra data.
func decodeSnapshotHeader(hdr []byte, off int64) (s SnapshotEntry, idSize, nameSize int64) {
	be := binary.BigEndian
	s = SnapshotEntry{
		Offset:        off,
		L1TableOffset: be.Uint64(hdr[0:]),
		L1Size:        be.Uint32(hdr[8:]),
		DateSec:       be.Uint32(hdr[16:]),
		DateNsec:      be.Uint32(hdr[20:]),
		VMClockNsec:   be.Uint64(hdr[24:]),
		VMStateSize:   uint64(be.Uint32(hdr[32:])),
		ExtraDataSize: be.Uint32(hdr[36:]),
	}
	return s, int64(be.Uint16(hdr[12:])), int64(be.Uint16(hdr[14:]))
}
