// Package qcow2 implements the QCOW2 image format (QEMU copy-on-write,
// versions 2 and 3, as described by QEMU's docs/interop/qcow2.txt) as a
// disk.Driver named "qcow2".
//
// It reads and writes standard and extended (subcluster) L2 entries,
// zero clusters, compressed clusters (zlib, that is raw deflate, and
// zstd; a compressed cluster that is written becomes a normal one),
// backing files and chains of them, external data files (raw or not),
// internal snapshots (their clusters are copied before they are
// written; a snapshot can also be opened read-only by ID or name with
// disk.OpenOptions.Snapshot) and lazy refcounts. Encrypted images are
// refused. Writes allocate free clusters (else at the end of the file),
// copy partial clusters from the backing chain, and keep refcounts and
// OFLAG_COPIED flags exact; Discard and WriteZeroes use zero clusters
// where the version allows (see zero.go); Resize grows or shrinks the
// disk. Metadata is written back at Flush in a crash-safe order (see
// meta.go). An image found inconsistent while writing is marked corrupt
// and its writes then fail; an image left dirty (lazy refcounts) has its
// refcounts repaired when opened read-write. StreamWriter writes a new
// image front to back, for conversions. Check is qemu-img check.
//
// Guest offsets map to host offsets through the L1 table (read whole at
// Open and validated there) and L2 tables, which are read in 4 KiB slices
// (whole tables for smaller clusters) through an LRU cache bounded by
// disk.OpenOptions.CacheSize. The default size covers the whole disk, up
// to 32 MiB (QEMU's default l2-cache-size rule: 32 MiB maps 256 GiB with
// 64 KiB clusters); the cache fills only as the disk is read.
//
// # Concurrency
//
// An Image is safe for concurrent use. Reads take no image-wide lock: the
// L2 slice cache locks one shard only while it looks up or inserts a slice
// (never during file I/O), so reads of different slices, and the
// decompression of compressed clusters, run in parallel. Writes to
// clusters already allocated with refcount 1 take no image-wide lock
// either (only the shared side of a read-write lock that freeing
// clusters takes); writes that allocate clusters, Discard, WriteZeroes
// and Flush take one allocation mutex, and publish new L1 entries
// atomically and changed L2 slices by replacing them in the cache, so
// that a concurrent read sees the old or the new mapping. Close and
// Resize must not race with other calls on the same Image: calls that
// start after Close return disk.ErrClosed.
//
// # Errors
//
// Open returns a *disk.FormatError (matching disk.ErrFormat) for a
// malformed image, a *disk.UnsupportedError (disk.ErrNotSupported) for
// features this package does not implement, a *disk.UnsupportedFormatError
// (disk.ErrNotSupported) for a header version other than 2 and 3, and the
// host file's error (wrapped with context) when a backing or data file
// cannot be opened. A snapshot table entry whose L1 table is invalid
// (unaligned, over 32 MiB, at offset 0 or past the end of the file) is
// reported (a corruption, naming the snapshot) only when that snapshot
// is used: opened with disk.OpenOptions.Snapshot, or by a read-write
// open, whose allocator keeps off every snapshot's tables; the active
// image still opens read-only, as in QEMU, and Check reports the entry as
// qemu-img check does.
// ReadAt returns a *disk.FormatError with Corrupt set (matching
// disk.ErrCorrupt) when a table entry it follows is invalid (reserved bits
// set, misaligned, pointing past the end of the file) or a compressed
// cluster does not inflate to a whole cluster (deflate streams may go on
// past it, as QEMU allows; a zstd frame must hold exactly one cluster, as
// QEMU requires); disk.ErrOutOfRange for a request outside the virtual
// disk; disk.ErrClosed after Close. Errors of a backing image are wrapped
// with the backing file's name. Writes return disk.ErrReadOnly on an image
// opened read-only or on a snapshot, and a *disk.FormatError with Corrupt
// set when an entry they would write through or release points into
// metadata (QEMU's metadata overlap check) or past the allocated end of
// the file, or a refcount would drop below zero: the image is then
// marked corrupt, and later writes return a *disk.UnsupportedError.
//
// # Security
//
// Images are untrusted input. Every offset and size read from the image is
// checked against the spec's limits and the file size before it is used
// to read or allocate: L1 and L2 tables must lie inside the file, data
// clusters must start inside it, compressed data is read only up to what
// the descriptor spans and the file holds, and inflating stops after one
// cluster. In an image opened read-write, data cluster offsets are
// checked against the end of the file's allocated area instead of the
// file size at Open (clusters past it read as zeros). Backing and data
// file names come from the image: they are
// resolved relative to the image's folder, opened read-only, and backing
// chains that loop or exceed disk.MaxChainDepth are refused by disk.Open.
package qcow2

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/disk/internal/gate"
)

// formatName is the driver's name.
const formatName = "qcow2"

// maxL1Bytes bounds an L1 table read from the image (QEMU's
// QCOW_MAX_L1_SIZE, 32 MiB).
const maxL1Bytes = 32 << 20

// Driver is the qcow2 disk.Driver; it is registered under "qcow2".
type Driver struct{}

func init() { disk.MustRegister(Driver{}) }

// Name returns "qcow2".
func (Driver) Name() string { return formatName }

// Probe returns 100 for a header with the qcow2 magic and any version
// but 1 (qcow, which disk.Probe names), else 0. QEMU's qcow2_probe
// claims versions 2 and up, and Open then refuses the versions it does
// not read; imgloop claims version 0 too, so that no header with the
// magic is ever read as raw.
func (Driver) Probe(header []byte) int {
	if len(header) < 8 || string(header[:4]) != "QFI\xfb" {
		return 0
	}
	if binary.BigEndian.Uint32(header[4:8]) == 1 {
		return 0
	}
	return 100
}

// Open opens the qcow2 image in f (see the package Open).
func (Driver) Open(f disk.File, opts disk.OpenOptions) (disk.Image, error) {
	img, err := Open(f, opts)
	if err != nil {
		return nil, err
	}
	return img, nil
}

// Image is an open qcow2 image. It implements disk.Image, disk.Mapper,
// disk.Describer and disk.Backinger.
type Image struct {
	f disk.File
	// hdr is the header as the file holds it now. A Header is never
	// changed once published: updateHeader stores a changed copy.
	hdr      atomic.Pointer[Header]
	hdrMu    sync.Mutex // serialises updateHeader
	geo      geometry
	size     atomic.Int64 // virtual disk size
	l1       []uint64
	cache    *l2Cache
	inflate  inflater
	snaps    []SnapshotEntry
	snapshot *SnapshotEntry // the snapshot opened, nil for the active view

	data disk.File // where guest clusters live: f, or the external data file

	preallocOnce sync.Once // metadataPreallocated's decision
	prealloc     bool
	dataName     string // data file path, "" without one

	backing       disk.Image
	backingSize   int64
	backingFull   string // resolved backing file path
	backingFormat string // as stored, or as probed

	compressedPool sync.Pool // *[]byte of the largest compressed span
	clusterPool    sync.Pool // *[]byte of one cluster, for partial-cluster writes

	// inflated caches inflated clusters for reads of parts of them,
	// keyed by the compressed data's host offset; made on first use.
	inflated     *l2Cache
	inflatedOnce sync.Once

	w *writer // nil unless opened read-write (see write.go)

	// ops admits every call (shared) and is taken exclusively by Close
	// and Resize, which so wait for the calls in flight and keep new
	// ones waiting until they are done.
	ops gate.Gate
	// reuse is held shared by whatever maps a guest range to host
	// clusters and then uses them (reads, writes in place, Map), and
	// exclusively while host clusters are freed, so that a cluster is
	// never given to other data while a request still uses it (QEMU
	// makes such reuse wait for in-flight requests too).
	reuse gate.Gate
	// resized tells the resize watchers.
	resized disk.SizeWatchers

	closed atomic.Bool
}

// enter admits a call (see Image.ops): after Close it returns
// disk.ErrClosed. Calls made by an admitted call use internal methods
// that do not enter again.
func (img *Image) enter() (gate.Token, error) {
	if img.closed.Load() {
		return 0, disk.ErrClosed
	}
	t := img.ops.Enter()
	if img.closed.Load() {
		img.ops.Exit(t)
		return 0, disk.ErrClosed
	}
	return t, nil
}

// exit ends a call admitted by enter.
func (img *Image) exit(t gate.Token) { img.ops.Exit(t) }

var (
	_ disk.Image      = (*Image)(nil)
	_ disk.Mapper     = (*Image)(nil)
	_ disk.Describer  = (*Image)(nil)
	_ disk.Backinger  = (*Image)(nil)
	_ disk.Discarder  = (*Image)(nil)
	_ disk.ZeroWriter = (*Image)(nil)
)

// Open opens the qcow2 image held in f. On success the Image owns f (and
// closes it on Close); on error the caller still owns f, and everything
// Open opened besides (backing and data files) is closed.
//
// opts.Snapshot selects an internal snapshot by ID or name: the image then
// shows that snapshot's disk, read-only. opts.CacheSize bounds the L2
// slice cache (0: enough to cover the whole disk, at most 32 MiB).
// opts.Parents is passed on, with this image's path appended, when the
// backing file is opened.
//
// Errors: *disk.FormatError, *disk.UnsupportedError,
// *disk.UnsupportedFormatError, and wrapped errors of the host, backing
// and data files.
func Open(f disk.File, opts disk.OpenOptions) (_ *Image, err error) {
	fileSize, err := f.Size()
	if err != nil {
		return nil, fmt.Errorf("qcow2: %s: %w", f.Name(), err)
	}
	h, err := readHeader(f, fileSize)
	if err != nil {
		return nil, err
	}
	if h.Dirty() && !opts.ReadOnly && opts.Snapshot == "" && h.CryptMethod == 0 {
		// Left dirty by a writer that did not close it (lazy refcounts):
		// rebuild the refcounts before writing. If that fails the image
		// still opens, and its writes say why not.
		if repairDirty(f) == nil {
			if fileSize, err = f.Size(); err != nil {
				return nil, fmt.Errorf("qcow2: %s: %w", f.Name(), err)
			}
			if h, err = readHeader(f, fileSize); err != nil {
				return nil, err
			}
		}
	}
	img := &Image{f: f, data: f}
	img.hdr.Store(h)
	img.size.Store(int64(h.Size))
	defer func() {
		if err != nil {
			img.closeOwned()
		}
	}()
	img.geo = geometry{
		clusterBits: uint(h.ClusterBits),
		version:     h.Version,
		extended:    h.ExtendedL2(),
		dataFile:    h.HasDataFile(),
		fileSize:    fileSize,
		dataSize:    fileSize,
	}
	if img.inflate, err = inflaterFor(h.CompressionType); err != nil {
		return nil, &disk.UnsupportedError{Format: formatName, Feature: err.Error()}
	}
	if img.snaps, err = readSnapshots(f, h, fileSize); err != nil {
		return nil, err
	}
	writable := !opts.ReadOnly && opts.Snapshot == ""
	if writable {
		// The allocator keeps off every snapshot's L1 table (as QEMU's
		// overlap check does, which fails writes otherwise): all must
		// be sound. Read-only, the active image opens whatever the
		// snapshots' state; check reports them.
		for i := range img.snaps {
			if err = img.snaps[i].checkL1(uint64(h.ClusterSize()), fileSize); err != nil {
				return nil, fmt.Errorf("%w (the image opens read-only; imgloop check reports it)", err)
			}
		}
	}
	if err = img.openDataFile(opts); err != nil {
		return nil, err
	}
	l1Offset, l1Size := h.L1TableOffset, h.L1Size
	if opts.Snapshot != "" {
		if img.snapshot, err = findSnapshot(img.snaps, opts.Snapshot); err != nil {
			return nil, err
		}
		if err = img.snapshot.checkL1(uint64(h.ClusterSize()), fileSize); err != nil {
			return nil, err
		}
		l1Offset, l1Size = img.snapshot.L1TableOffset, img.snapshot.L1Size
		if img.snapshot.DiskSize != 0 {
			img.size.Store(int64(img.snapshot.DiskSize))
		}
	}
	if img.size.Load() < 0 {
		return nil, img.formatError(24, fmt.Sprintf("virtual size %d is too large", uint64(img.size.Load())))
	}
	if err = img.readL1(l1Offset, l1Size, opts.Snapshot == ""); err != nil {
		return nil, err
	}
	img.initCache(opts.CacheSize)
	cs := int(img.geo.clusterSize())
	img.compressedPool.New = func() any { b := make([]byte, 2*cs); return &b }
	img.clusterPool.New = func() any { b := make([]byte, cs); return &b }
	if err = img.openBacking(opts); err != nil {
		return nil, err
	}
	if writable {
		img.initWriter(fileSize)
	}
	return img, nil
}

// readL1 reads and validates the L1 table of l1Size entries at l1Offset.
// The active table must cover the virtual disk (QEMU refuses it
// otherwise); a snapshot's may be shorter, the rest reading as
// unallocated.
func (img *Image) readL1(l1Offset uint64, l1Size uint32, active bool) error {
	g := &img.geo
	tableSpan := uint64(1) << (g.l2Bits() + g.clusterBits) // guest bytes one L2 table maps
	need := (uint64(img.size.Load()) + tableSpan - 1) / tableSpan
	if active && uint64(l1Size) < need {
		return img.formatError(36, fmt.Sprintf("L1 table has %d entries, the disk needs %d", l1Size, need))
	}
	n := uint64(l1Size)
	if n*8 > maxL1Bytes {
		return img.formatError(int64(l1Offset), fmt.Sprintf("L1 table of %d entries exceeds the %d MiB limit", l1Size, maxL1Bytes>>20))
	}
	if n == 0 {
		return nil
	}
	if l1Offset&uint64(g.clusterSize()-1) != 0 {
		return img.formatError(int64(l1Offset), "L1 table offset is not cluster aligned")
	}
	if l1Offset > uint64(g.fileSize) || uint64(g.fileSize)-l1Offset < n*8 {
		return img.formatError(int64(l1Offset), fmt.Sprintf("L1 table of %d entries lies past the end of the file (size %#x)", n, g.fileSize))
	}
	// Entries past what the disk needs are never used; only the used ones
	// are kept and validated.
	n = min(n, need)
	buf := make([]byte, n*8)
	if _, err := img.f.ReadAt(buf, int64(l1Offset)); err != nil {
		return fmt.Errorf("qcow2: reading L1 table at %#x: %w", l1Offset, err)
	}
	img.l1 = make([]uint64, n)
	for i := range img.l1 {
		off, bad := g.decodeL1(binary.BigEndian.Uint64(buf[i*8:]))
		if bad != "" {
			return img.corrupt(int64(l1Offset)+int64(i)*8, fmt.Sprintf("L1 index %d: %s", i, bad))
		}
		img.l1[i] = off
	}
	return nil
}

// initCache sizes the L2 slice cache.
func (img *Image) initCache(size int64) {
	g := &img.geo
	slice := int(min(g.clusterSize(), maxSliceSize))
	if size <= 0 {
		size = defaultCacheSize(img.size.Load(), g.clusterBits, g.entryBytes())
	}
	img.cache = newL2Cache(size, slice)
}

// formatError returns a *disk.FormatError at a file offset.
func (img *Image) formatError(off int64, what string) error {
	return &disk.FormatError{Format: formatName, Offset: off, What: what}
}

// corrupt returns a *disk.FormatError marking inconsistent metadata.
func (img *Image) corrupt(off int64, what string) error {
	return &disk.FormatError{Format: formatName, Offset: off, What: what, Corrupt: true}
}

// Size returns the virtual disk size in bytes.
func (img *Image) Size() int64 { return img.size.Load() }

// SectorSize returns 512.
func (img *Image) SectorSize() int { return 512 }

// Close waits for the calls in flight, writes the metadata back, and
// closes the backing image, the data file and the image file. Calls that
// start after it return disk.ErrClosed, as does a second Close.
func (img *Image) Close() error {
	if !img.closed.CompareAndSwap(false, true) {
		return disk.ErrClosed
	}
	img.ops.Lock()
	defer img.ops.Unlock()
	return errors.Join(img.flushOnClose(), img.closeOwned(), img.f.Close())
}

// closeOwned closes what Open opened besides f: the backing image and the
// data file.
func (img *Image) closeOwned() error {
	var errs []error
	if img.backing != nil {
		errs = append(errs, img.backing.Close())
		img.backing = nil
	}
	if img.data != nil && img.data != img.f {
		errs = append(errs, img.data.Close())
		img.data = nil
	}
	return errors.Join(errs...)
}

// Header returns the decoded header as the file holds it now. The caller
// must not modify it; later changes (feature bits, a moved table, a new
// size) are made to a copy, so the returned value stays as it was.
func (img *Image) Header() *Header { return img.header() }

// header returns the current header (see Header).
func (img *Image) header() *Header { return img.hdr.Load() }

// updateHeader publishes a copy of the header changed by fn, once the
// change is in the file.
func (img *Image) updateHeader(fn func(h *Header)) {
	img.hdrMu.Lock()
	defer img.hdrMu.Unlock()
	h := *img.hdr.Load()
	fn(&h)
	img.hdr.Store(&h)
}

// Snapshots returns the image's internal snapshots. The caller must not
// modify the slice.
func (img *Image) Snapshots() []SnapshotEntry { return img.snaps }

// Backing returns the backing image, or nil if there is none. It is owned
// by img and closed by img.Close.
func (img *Image) Backing() disk.Image {
	if img.backing == nil {
		return nil
	}
	return img.backing
}

// Info describes the image as `qemu-img info` does.
func (img *Image) Info() disk.Info {
	h := img.header()
	info := disk.Info{
		Format:              formatName,
		VirtualSize:         img.size.Load(),
		ClusterSize:         img.geo.clusterSize(),
		BackingFilename:     h.BackingFile,
		FullBackingFilename: img.backingFull,
		BackingFormat:       img.backingFormat,
		DirtyFlag:           h.Dirty(),
		FormatSpecific:      h.FormatSpecific(),
	}
	for _, s := range img.snaps {
		info.Snapshots = append(info.Snapshots, s.Info())
	}
	return info
}
