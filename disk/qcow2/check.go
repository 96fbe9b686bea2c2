package qcow2

import (
	"errors"
	"fmt"
	"math"

	"encoding/json"
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
	// references (qemu-img check -r leaks), deallocating the clusters
	// freed. When nothing else is wrong it also fixes OFLAG_COPIED flags,
	// and clears the dirty and corrupt bits. Images whose refcount
	// structures need rebuilding are not touched: the check fails
	// instead.
	RepairLeaks
	// RepairAll repairs what qemu-img check -r all repairs: it also
	// raises refcounts that are below the references, always fixes
	// OFLAG_COPIED flags, turns unaligned preallocated clusters into zero
	// clusters, grows the file to a refcount block past its end, and
	// when a refcount block is missing or broken (a cluster in use has
	// refcount 0, a refcount table entry is invalid or points into other
	// metadata) rebuilds the whole refcount structure crash-safely (see
	// rebuild.go), drops snapshot extra data beyond 1 KiB and completes
	// incomplete v3 snapshot entries by writing the snapshot table anew,
	// then clears the dirty and corrupt bits. What it cannot
	// repair (reserved bits, data clusters that are not aligned, tables
	// past the end of the file) stays counted as corruptions.
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
// check` does. It needs only a readable header, as QEMU opens it for a
// check (readHeaderToCheck): images with the dirty or corrupt bit set,
// wrong refcounts, damaged tables or snapshot table entries, an empty
// refcount table, or an L1 or refcount table over the header, over
// another table or past the end of the file (which Open refuses) are
// checked, and what is wrong is counted in the result. Metadata tables
// reaching past the end of the file read as zeros, as QEMU reads them.
// f is not closed.
//
// Without opts.Repair, f is only read. With RepairLeaks or RepairAll,
// Check repairs as `qemu-img check -r leaks` or `-r all` does, syncs f,
// checks the image again and returns that result, with LeaksFixed and
// CorruptionsFixed set and the messages of both passes. A caller that
// opens a dirty image (lazy refcounts) for writing runs RepairAll and
// requires ExitCode 0 of the result.
//
// Memory: 2 bytes per host cluster of the file (4 with refcounts wider
// than 16 bits), bounded by opts.MaxMemory; one cluster of table buffers;
// the largest L1 table (at most 32 MiB); a rebuild of the refcount
// structures also holds the new refcount table (at most 8 MiB) and counts
// the clusters it allocates past the end of the file. Work: each L1 table and each
// distinct L2 table is read once (twice for the active ones); tables read
// beyond twice the file size (tables overlapping each other) end the
// check with a check error.
//
// Errors: the header's errors (*disk.FormatError, *disk.UnsupportedError,
// *disk.UnsupportedFormatError) when QEMU could not open the image for a
// check either (tables unaligned or over QEMU's limits, ...); an error
// for a file too large for opts.MaxMemory. I/O errors and limits met
// during the check are counted as check errors in the result instead, and
// CheckResult.Failure says why the result is incomplete (ExitCode 1).
func Check(f disk.File, opts CheckOptions) (*CheckResult, error) {
	fileSize, err := f.Size()
	if err != nil {
		return nil, fmt.Errorf("qcow2: check %s: %w", f.Name(), err)
	}
	h, err := readHeaderToCheck(f, fileSize)
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
	c.maxMem = maxMem
	if err := c.resetRefs(fileSize); err != nil {
		return nil, fmt.Errorf("qcow2: check %s: %w", c.res.Filename, err)
	}
	c.refMax = min(rt.maxRefcount(), math.MaxUint32)
	c.l2buf = make([]byte, c.cs)
	c.l2Weights = make(map[uint64]*l2Weight)
	c.budget = 2*uint64(fileSize) + metadataReadSlack
	c.res.TotalClusters = int64((h.Size + c.cs - 1) >> c.cb)
	c.mode = opts.Repair
	if err := c.run(); err != nil {
		// The check stopped early.
		var counted countedError
		if !errors.As(err, &counted) {
			c.res.CheckErrors++
			c.msg("ERROR: %v", err)
		}
		c.res.Failure = err.Error()
	}
	r := c.res
	if r.Failure != "" || r.LeaksFixed == 0 && r.CorruptionsFixed == 0 {
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

// countedError is an error that ended the check after it was counted (as
// a check error) and reported in the messages.
type countedError struct{ err error }

func (e countedError) Error() string { return e.err.Error() }
func (e countedError) Unwrap() error { return e.err }

// errCheckAborted marks a limit that stopped the check.
var errCheckAborted = errors.New("check aborted")

// checker holds the state of one Check.
type checker struct {
	f        disk.File
	h        *Header
	rt       *refcountTable
	g        geometry
	fileSize int64
	cb       uint
	cs       uint64

	// The snapshot table as read by readSnapshotTable: the entries, what
	// the check keeps of each besides, the end of the table in the file,
	// and the findings about it.
	snaps     []SnapshotEntry
	snapExtra []checkSnapshot
	snapsEnd  uint64
	snapRes   snapRepairs

	// References per cluster of the file: 16 bits each when refcounts
	// are at most 16 bits wide (refMax then fits), else 32.
	refs16 []uint16
	refs32 []uint32
	extra  map[uint64]uint32 // references to clusters past the end of the file
	nbFile uint64            // clusters of the file: len(refs16 or refs32)
	nb     uint64            // clusters considered: past the highest reference
	refMax uint64            // refcount overflow limit

	l2buf []byte

	// activeL1 is the active L1 table as read by walkL1.
	activeL1 []uint64

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
	// calcFix: calculate repairs what QEMU's calculate_refcounts repairs
	// with BDRV_FIX_ERRORS (unaligned preallocated clusters, refcount
	// blocks past the end of the file).
	calcFix bool
	// rebuild: the refcount structures are broken beyond what adjusting
	// refcounts repairs (QEMU's rebuild flag).
	rebuild bool
	// avoid: clusters a rebuild must not take (uncountedRefblocks).
	avoid map[uint64]bool
	// used: the clusters [from, to) are all in use (allocClusters).
	used struct{ from, to uint64 }
	// maxMem bounds the reference counts' memory (CheckOptions.MaxMemory).
	maxMem int64
}

// msg records a finding line.
func (c *checker) msg(format string, args ...any) {
	if c.maxMessages < 0 || len(c.res.Messages) >= c.maxMessages {
		c.res.MessagesDropped++
		return
	}
	c.res.Messages = append(c.res.Messages, fmt.Sprintf(format, args...))
}

// run performs the check and the repairs (qcow2_co_check_locked): the
// snapshot table is read (and with RepairAll rewritten when it needs
// it), the refcounts checked and repaired (runRefcounts), and when all is
// well after repairing, the dirty and corrupt bits cleared.
func (c *checker) run() error {
	err := c.readSnapshotTable(c.mode == RepairAll)
	if err != nil {
		err = countedError{err}
	} else {
		err = c.runRefcounts()
		if err == nil && c.mode == RepairAll {
			if err = c.fixSnapshotTable(); err != nil {
				err = countedError{err}
			}
		}
	}
	res := c.res
	res.Corruptions += c.snapRes.corruptions
	res.CorruptionsFixed += c.snapRes.fixed
	res.CheckErrors += c.snapRes.checkErrors
	if err == nil && c.mode != RepairNone && res.CheckErrors == 0 && res.Corruptions == 0 {
		err = c.markClean()
	}
	return err
}

// runRefcounts checks and repairs the refcounts: qcow2_check_refcounts of
// QEMU (calculate_refcounts, compare_refcounts,
// rebuild_refcount_structure, check_oflag_copied).
func (c *checker) runRefcounts() error {
	c.calcFix = c.mode == RepairAll
	err := c.calculate()
	c.calcFix = false
	if err != nil {
		return err
	}
	res := c.res
	pre := *res
	highest, err := c.compare()
	if err != nil {
		return err
	}
	switch {
	case c.rebuild && c.mode == RepairAll:
		if highest, err = c.rebuildAndRecount(); err != nil {
			return err
		}
	case c.mode != RepairNone:
		if c.rebuild {
			c.msg("ERROR need to rebuild refcount structures")
			res.CheckErrors++
			return countedError{errNeedRebuild}
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
	return nil
}
