package qcow2

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"sort"

	"github.com/imgloop/imgloop/disk"
)

// The consistency checker: the equivalent of `qemu-img check` (QEMU's
// block/qcow2-refcount.c, qcow2_check_refcounts). It counts the references
// to every host cluster made by the image's metadata (header, L1 and L2
// tables of the active image and of every snapshot, data and compressed
// clusters, the refcount structures, the snapshot table and the bitmaps)
// in memory, compares them with the stored refcounts, and checks the
// OFLAG_COPIED flags of the active tables. Findings are counted and
// reported in QEMU's words and numbers.

// CheckOptions tune Check.
type CheckOptions struct {
	// Filename is the name reported in CheckResult.Filename; the file's
	// Name() when empty.
	Filename string
	// MaxMemory bounds the in-memory reference count array, in bytes (2
	// per host cluster of the file, 4 with refcounts wider than 16 bits).
	// 0 means DefaultCheckMaxMemory.
	MaxMemory int64
	// Repair selects what to repair (RepairNone: check only). Repairing
	// writes to f, which must be open for writing, and must not be in use
	// by anyone else: the caller locks it.
	Repair RepairMode
	// MaxMessages bounds how many finding lines are kept in
	// CheckResult.Messages (the counts are always complete). 0 means
	// DefaultCheckMaxMessages; negative keeps none.
	MaxMessages int
}

// RepairMode selects what Check repairs (qemu-img check -r).
type RepairMode uint8

const (
	// RepairNone only checks.
	RepairNone RepairMode = iota
	// RepairLeaks lowers the refcounts of leaked clusters to their
	// references (qemu-img check -r leaks). When nothing else is wrong it
	// also fixes OFLAG_COPIED flags, and clears the dirty and corrupt
	// bits. Images whose refcount structures need rebuilding are not
	// touched: the check fails instead.
	RepairLeaks
	// RepairAll also raises refcounts that are below the references and
	// always fixes OFLAG_COPIED flags (qemu-img check -r all), when that
	// is all the image needs besides findings QEMU does not repair
	// either. Images that QEMU would repair otherwise (by rebuilding the
	// refcount structures, zeroing an unaligned preallocated cluster or
	// growing the file to a refcount block past its end) are not touched:
	// the check fails instead.
	RepairAll
)

// Check limits.
const (
	// DefaultCheckMaxMemory is the default CheckOptions.MaxMemory: 1 GiB
	// covers a file of 512 Mi clusters (32 TiB with 64 KiB clusters).
	DefaultCheckMaxMemory = 1 << 30
	// DefaultCheckMaxMessages is the default CheckOptions.MaxMessages.
	DefaultCheckMaxMessages = 10000
	// maxExtraClusters bounds how many distinct clusters past the end of
	// the file the checker tracks (each is one reference found in a
	// table); past it the check fails.
	maxExtraClusters = 1 << 20
	// maxL2Tables bounds how many distinct L2 tables the L1 tables may
	// reference (32 MiB of L1 entries).
	maxL2Tables = maxL1Entries
	// metadataReadSlack is added to the metadata read budget (twice the
	// file size), for small files.
	metadataReadSlack = 256 << 20
	// maxBitmapTableEntries is QEMU's BME_MAX_TABLE_SIZE.
	maxBitmapTableEntries = 0x8000000
	// bitmapEntryReserved: bits 1-8 and 56-63 of a bitmap table entry.
	bitmapEntryReserved = uint64(0xff000000000001fe)
)

// CheckResult is what Check found, with the numbers `qemu-img check
// --output=json` reports (its JSON encoding uses the same keys, leaving
// out zero optional counts as QEMU does).
type CheckResult struct {
	Filename string
	Format   string
	// CheckErrors counts internal errors: parts of the check that could
	// not be done (unreadable refcounts, I/O errors).
	CheckErrors int64
	// Corruptions counts errors in the metadata: refcounts lower than the
	// references, invalid entries, wrong OFLAG_COPIED flags.
	Corruptions int64
	// Leaks counts clusters whose refcount exceeds their references.
	Leaks            int64
	CorruptionsFixed int64
	LeaksFixed       int64
	// ImageEndOffset is the end of the highest cluster that is referenced
	// or has a refcount.
	ImageEndOffset int64
	// TotalClusters is the virtual disk size in clusters; the other
	// cluster counts are about the active L1 table's mappings.
	TotalClusters      int64
	AllocatedClusters  int64
	FragmentedClusters int64
	CompressedClusters int64
	// Bitmaps is the number of persistent bitmaps whose clusters were
	// counted.
	Bitmaps int
	// Messages are the findings, one line each, in QEMU's wording (what
	// qemu-img check prints on standard error), in the order found.
	Messages []string
	// MessagesDropped counts the lines left out of Messages.
	MessagesDropped int
	// Failure says why the check stopped before the end ("" if it did
	// not): an I/O error, a limit, or refcount structures that -r leaks
	// cannot repair. The counts are then incomplete, CheckErrors is not
	// 0, and qemu-img prints "Check failed" instead of a report.
	Failure string
}

// Exit statuses of qemu-img check (ExitCode).
const (
	CheckExitClean       = 0
	CheckExitFailed      = 1
	CheckExitCorruptions = 2
	CheckExitLeaks       = 3
	// CheckExitNotSupported is qemu-img's status for a format that has no
	// check (raw).
	CheckExitNotSupported = 63
)

// ExitCode returns qemu-img check's exit status for r: 1 if the check
// could not complete (check errors), 2 for corruptions, 3 for leaks only,
// 0 for a clean image.
func (r *CheckResult) ExitCode() int {
	switch {
	case r.CheckErrors > 0:
		return CheckExitFailed
	case r.Corruptions > 0:
		return CheckExitCorruptions
	case r.Leaks > 0:
		return CheckExitLeaks
	}
	return CheckExitClean
}

// checkJSON is the JSON form of a CheckResult: QAPI's ImageCheck.
type checkJSON struct {
	Filename           string `json:"filename"`
	Format             string `json:"format"`
	CheckErrors        int64  `json:"check-errors"`
	ImageEndOffset     int64  `json:"image-end-offset,omitempty"`
	Corruptions        int64  `json:"corruptions,omitempty"`
	Leaks              int64  `json:"leaks,omitempty"`
	CorruptionsFixed   int64  `json:"corruptions-fixed,omitempty"`
	LeaksFixed         int64  `json:"leaks-fixed,omitempty"`
	TotalClusters      int64  `json:"total-clusters,omitempty"`
	AllocatedClusters  int64  `json:"allocated-clusters,omitempty"`
	FragmentedClusters int64  `json:"fragmented-clusters,omitempty"`
	CompressedClusters int64  `json:"compressed-clusters,omitempty"`
}

// MarshalJSON encodes r as qemu-img check --output=json does (QAPI
// ImageCheck): optional counts are left out when zero.
func (r *CheckResult) MarshalJSON() ([]byte, error) {
	return json.Marshal(checkJSON{
		Filename: r.Filename, Format: r.Format, CheckErrors: r.CheckErrors,
		ImageEndOffset: r.ImageEndOffset, Corruptions: r.Corruptions, Leaks: r.Leaks,
		CorruptionsFixed: r.CorruptionsFixed, LeaksFixed: r.LeaksFixed,
		TotalClusters: r.TotalClusters, AllocatedClusters: r.AllocatedClusters,
		FragmentedClusters: r.FragmentedClusters, CompressedClusters: r.CompressedClusters,
	})
}

// Check checks the consistency of the qcow2 image in f as `qemu-img
// check` does. It needs only a readable header (and snapshot table):
// images with the dirty or corrupt bit set, wrong refcounts or damaged
// tables are checked, and what is wrong is counted in the result.
// Metadata tables reaching past the end of the file read as zeros, as
// QEMU reads them. f is not closed.
//
// Without opts.Repair, f is only read. With RepairLeaks, Check repairs as
// `qemu-img check -r leaks` does (see RepairLeaks), syncs f, checks the
// image again and returns that result, with LeaksFixed and
// CorruptionsFixed set and the messages of both passes.
//
// Memory: 2 bytes per host cluster of the file (4 with refcounts wider
// than 16 bits), bounded by opts.MaxMemory; one cluster of table buffers;
// the largest L1 table (at most 32 MiB). Work: each L1 table and each
// distinct L2 table is read once (twice for the active ones); tables read
// beyond twice the file size (tables overlapping each other) end the
// check with a check error.
//
// Errors: the header's errors (*disk.FormatError, *disk.UnsupportedError,
// as Open returns them) when the image cannot be checked at all; an error
// for a file too large for opts.MaxMemory. I/O errors and limits met
// during the check are counted as check errors in the result instead, and
// CheckResult.Failure says why the result is incomplete (ExitCode 1).
func Check(f disk.File, opts CheckOptions) (*CheckResult, error) {
	fileSize, err := f.Size()
	if err != nil {
		return nil, fmt.Errorf("qcow2: check %s: %w", f.Name(), err)
	}
	h, err := readHeader(f, fileSize)
	if err != nil {
		return nil, err
	}
	snaps, err := readSnapshots(f, h, fileSize)
	if err != nil {
		return nil, err
	}
	rt, err := readRefcountTable(f, h, fileSize)
	if err != nil {
		return nil, err
	}
	c := &checker{
		f:        f,
		h:        h,
		snaps:    snaps,
		rt:       rt,
		fileSize: fileSize,
		cb:       uint(h.ClusterBits),
		cs:       uint64(1) << h.ClusterBits,
		g: geometry{
			clusterBits: uint(h.ClusterBits), version: h.Version, extended: h.ExtendedL2(),
			dataFile: h.HasDataFile(), fileSize: fileSize, dataSize: fileSize,
		},
		maxMessages: opts.MaxMessages,
		res:         &CheckResult{Filename: opts.Filename, Format: formatName},
	}
	if c.res.Filename == "" {
		c.res.Filename = f.Name()
	}
	if c.maxMessages == 0 {
		c.maxMessages = DefaultCheckMaxMessages
	}
	maxMem := opts.MaxMemory
	if maxMem <= 0 {
		maxMem = DefaultCheckMaxMemory
	}
	c.nbFile = (uint64(fileSize) + c.cs - 1) >> c.cb
	perCluster := int64(2)
	if h.RefcountOrder > 4 {
		perCluster = 4
	}
	if c.nbFile > math.MaxInt32 || int64(c.nbFile)*perCluster > maxMem {
		return nil, fmt.Errorf("qcow2: check %s: the file has %d clusters, more than the check's memory limit of %d MiB allows",
			c.res.Filename, c.nbFile, maxMem>>20)
	}
	if h.RefcountOrder <= 4 {
		c.refs16 = make([]uint16, c.nbFile)
	} else {
		c.refs32 = make([]uint32, c.nbFile)
	}
	c.nb = c.nbFile
	c.refMax = min(rt.maxRefcount(), math.MaxUint32)
	c.l2buf = make([]byte, c.cs)
	c.l2Weights = make(map[uint64]*l2Weight)
	c.budget = 2*uint64(fileSize) + metadataReadSlack
	c.res.TotalClusters = int64((h.Size + c.cs - 1) >> c.cb)
	c.mode = opts.Repair
	if err := c.run(); err != nil {
		// The check stopped early.
		if !errors.Is(err, errNeedRebuild) && !errors.Is(err, errRebuildUnsupported) && !errors.Is(err, errRepairUnsupported) {
			c.res.CheckErrors++
			c.msg("ERROR: %v", err)
		}
		c.res.Failure = err.Error()
	}
	r := c.res
	if r.LeaksFixed == 0 && r.CorruptionsFixed == 0 {
		return r, nil
	}
	// Check the repaired image again, as qemu-img does, keeping the
	// repair counts and every message.
	if err := f.Sync(); err != nil {
		return nil, fmt.Errorf("qcow2: check %s: syncing the repairs: %w", r.Filename, err)
	}
	again := opts
	again.Repair = RepairNone
	again.Filename = r.Filename
	r2, err := Check(f, again)
	if err != nil {
		return nil, fmt.Errorf("qcow2: check %s after repairing it: %w", r.Filename, err)
	}
	r2.LeaksFixed, r2.CorruptionsFixed = r.LeaksFixed, r.CorruptionsFixed
	r2.Messages = append(r.Messages, r2.Messages...)
	r2.MessagesDropped += r.MessagesDropped
	return r2, nil
}

// errNeedRebuild: the refcount structures must be rebuilt, which repairing
// leaks does not do.
var errNeedRebuild = errors.New("the refcount structures need rebuilding, which repairing leaks does not do")

// errRebuildUnsupported, errRepairUnsupported: RepairAll would need
// repairs this package does not make yet; nothing was written.
var (
	errRebuildUnsupported = errors.New("the refcount structures need rebuilding, which imgloop does not do yet (nothing was repaired)")
	errRepairUnsupported  = errors.New("the image needs repairs imgloop does not make yet (nothing was repaired)")
)

// errCheckAborted marks a limit that stopped the check.
var errCheckAborted = errors.New("check aborted")

// checker holds the state of one Check.
type checker struct {
	f        disk.File
	h        *Header
	snaps    []SnapshotEntry
	rt       *refcountTable
	g        geometry
	fileSize int64
	cb       uint
	cs       uint64

	// References per cluster of the file: 16 bits each when refcounts
	// are at most 16 bits wide (refMax then fits), else 32.
	refs16 []uint16
	refs32 []uint32
	extra  map[uint64]uint32 // references to clusters past the end of the file
	nbFile uint64            // clusters of the file: len(refs16 or refs32)
	nb     uint64            // clusters considered: past the highest reference
	refMax uint64            // refcount overflow limit

	l2buf []byte

	// L2 tables referenced by the L1 tables, in the order first met.
	l2Order   []uint64
	l2Weights map[uint64]*l2Weight

	// budget is how many more bytes of L1, L2 and bitmap tables may be
	// read: twice the file size and some, which a valid image (whose
	// tables are distinct clusters of the file) never needs; tables that
	// overlap each other over and over exhaust it.
	budget uint64

	maxMessages int
	res         *CheckResult

	mode      RepairMode
	fixLeaks  bool // compare repairs the leaks it finds
	fixErrors bool // compare raises refcounts below the references
	// unfixable: RepairAll would have to make a repair this package does
	// not do (an unaligned preallocated cluster, a refcount block past
	// the end of the file).
	unfixable bool
	// rebuild: the refcount structures are broken beyond what adjusting
	// refcounts repairs (QEMU's rebuild flag).
	rebuild bool
}

// msg records a finding line.
func (c *checker) msg(format string, args ...any) {
	if c.maxMessages < 0 || len(c.res.Messages) >= c.maxMessages {
		c.res.MessagesDropped++
		return
	}
	c.res.Messages = append(c.res.Messages, fmt.Sprintf(format, args...))
}

// run performs the check: calculate_refcounts, compare_refcounts and
// check_oflag_copied of QEMU.
func (c *checker) run() error {
	if err := c.calculate(); err != nil {
		return err
	}
	pre := *c.res
	highest, err := c.compare()
	if err != nil {
		return err
	}
	res := c.res
	if c.mode != RepairNone {
		if c.rebuild {
			c.msg("ERROR need to rebuild refcount structures")
			res.CheckErrors++
			if c.mode == RepairAll {
				return errRebuildUnsupported
			}
			return errNeedRebuild
		}
		if c.mode == RepairAll && c.unfixable {
			c.msg("ERROR the image needs repairs imgloop does not make yet; nothing was repaired")
			res.CheckErrors++
			return errRepairUnsupported
		}
		if res.Leaks > 0 || res.Corruptions > 0 {
			// Compare again, repairing; keep every message.
			msgs, dropped := res.Messages, res.MessagesDropped
			*res = pre
			res.Messages, res.MessagesDropped = msgs, dropped
			c.fixLeaks, c.fixErrors = true, c.mode == RepairAll
			highest, err = c.compare()
			c.fixLeaks, c.fixErrors = false, false
			if err != nil {
				return err
			}
		}
	}
	fixCopied := c.mode == RepairAll ||
		c.mode == RepairLeaks && res.CheckErrors == 0 && res.Corruptions == 0 && res.Leaks == 0
	if err := c.checkCopied(fixCopied); err != nil {
		return err
	}
	res.ImageEndOffset = int64((highest + 1) << c.cb)
	if c.mode != RepairNone && res.CheckErrors == 0 && res.Corruptions == 0 {
		return c.markClean()
	}
	return nil
}

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
	for i := range c.snaps {
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
	if len(c.snaps) > 0 {
		last := c.snaps[len(c.snaps)-1]
		end := uint64(last.Offset) + snapshotHeaderSize + uint64(last.ExtraDataSize) + uint64(len(last.ID)) + uint64(len(last.Name))
		if err := c.inc(h.SnapshotsOffset, end-h.SnapshotsOffset); err != nil {
			return err
		}
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

// writeEntry writes a table entry (8 bytes, big endian) at off.
func (c *checker) writeEntry(off, v uint64) error {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], v)
	if _, err := c.f.WriteAt(b[:], int64(off)); err != nil {
		return fmt.Errorf("writing the table entry at %#x: %w", off, err)
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
				if containsData {
					c.msg("ERROR offset=%x: Data cluster is not properly aligned; L2 entry corrupted.", off)
				} else {
					c.msg("ERROR offset=%x: Preallocated cluster is not properly aligned; L2 entry corrupted.", off)
					c.unfixable = true // QEMU's -r all makes it a zero cluster
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
			c.msg("ERROR refcount block %d is outside image", i)
			c.res.Corruptions++
			c.unfixable = true // QEMU's -r all grows the file
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
				if err := c.writeEntry(h.L1TableOffset+uint64(i)*8, e^entryCopied); err != nil {
					res.CheckErrors++
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
					if err := c.writeEntry(l2off+uint64(j*c.g.entryBytes()), word^entryCopied); err != nil {
						res.CheckErrors++
						return err
					}
					res.CorruptionsFixed++
					continue
				}
				res.Corruptions += count[l2off]
				c.msg("ERROR OFLAG_COPIED data cluster: l2_entry=%x refcount=%d", word, rc)
			}
		}
	}
	return nil
}
