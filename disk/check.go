package disk

import (
	"encoding/json"
	"fmt"

	"github.com/imgloop/imgloop/disk/hostfile"
)

// Consistency checks (`qemu-img check`), for every format whose driver
// implements Checker.

// Checker is implemented by drivers that can check (and repair) the
// consistency of their images' metadata, as `qemu-img check` does.
//
// Check checks the image held in f. It needs only what the format needs
// to find its metadata: a damaged image is checked, and what is wrong is
// counted in the result. f is not closed. With opts.Repair set it repairs
// what that mode repairs, writing to f (open for writing, and locked by
// the caller), syncs, checks again and returns the second result with
// the repair counts. Errors: the format's errors when the image cannot be
// checked at all; I/O errors and limits met during the check are counted
// in the result instead (CheckResult.Failure).
type Checker interface {
	Check(f File, opts CheckOptions) (*CheckResult, error)
}

// RepairMode selects what a check repairs (qemu-img check -r).
type RepairMode uint8

const (
	// RepairNone only checks.
	RepairNone RepairMode = iota
	// RepairLeaks frees leaked clusters (qemu-img check -r leaks).
	RepairLeaks
	// RepairAll repairs everything the format can (qemu-img check -r
	// all).
	RepairAll
)

// CheckOptions tune Check and Checker.Check.
type CheckOptions struct {
	// Format names the driver; "" probes the image. Check only.
	Format string
	// Repair selects what to repair; RepairNone opens the image
	// read-only.
	Repair RepairMode
	// ForceShare checks an image other processes may be writing to
	// (qemu-img check -U): no lock refuses them, and the result may be
	// wrong. Only without Repair. Check only.
	ForceShare bool
	// Filename is the name reported in CheckResult.Filename; the path
	// (or the file's Name) when empty.
	Filename string
	// MaxMemory bounds the driver's in-memory reference counts, in
	// bytes; 0 picks the driver's default.
	MaxMemory int64
	// MaxMessages bounds how many finding lines are kept in
	// CheckResult.Messages (the counts are always complete); 0 picks the
	// driver's default, negative keeps none.
	MaxMessages int
}

// CheckResult is what a check found, with the numbers `qemu-img check
// --output=json` reports (QAPI ImageCheck; MarshalJSON uses its keys).
type CheckResult struct {
	// Filename is the image's name as given (CheckOptions.Filename).
	Filename string
	// Format is the format's name.
	Format string
	// CheckErrors counts internal errors: parts of the check that could
	// not be done.
	CheckErrors int64
	// Corruptions counts errors in the metadata.
	Corruptions int64
	// Leaks counts clusters allocated but not used.
	Leaks int64
	// CorruptionsFixed and LeaksFixed count what a repair fixed; the
	// other counts are then those of the check after the repair.
	CorruptionsFixed int64
	LeaksFixed       int64
	// ImageEndOffset is the end of the highest cluster in use.
	ImageEndOffset int64
	// TotalClusters is the virtual disk size in clusters; the other
	// cluster counts are about its mappings.
	TotalClusters      int64
	AllocatedClusters  int64
	FragmentedClusters int64
	CompressedClusters int64
	// Messages are the findings, one line each, in QEMU's wording (what
	// qemu-img check prints on standard error), in the order found.
	Messages []string
	// MessagesDropped counts the lines left out of Messages.
	MessagesDropped int
	// Failure says why the check stopped before the end ("" if it did
	// not); the counts are then incomplete and qemu-img prints "Check
	// failed" instead of a report.
	Failure string
}

// Exit statuses of qemu-img check (CheckResult.ExitCode).
const (
	CheckExitClean       = 0
	CheckExitFailed      = 1
	CheckExitCorruptions = 2
	CheckExitLeaks       = 3
	// CheckExitNotSupported is qemu-img's status for a format that has no
	// check (ErrNoCheck).
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

// ErrNoCheck is returned by Check for a format whose driver has no
// Checker (qemu-img: "This image format does not support checks", exit
// status 63). It matches ErrNotSupported.
var ErrNoCheck = fmt.Errorf("%w: This image format does not support checks", ErrNotSupported)

// Check checks the image at path with its driver's Checker, as `qemu-img
// check` does: it opens the host file (read-write only to repair), picks
// the driver (opts.Format, or the one that detects the file), locks the
// file as qemu-img check does (a reader sharing writes where the format
// allows it, a writer to repair, nothing refused with opts.ForceShare),
// and checks.
//
// Errors: ErrUnknownFormat, ErrNoCheck, *LockError (ErrLocked), an error
// for ForceShare with Repair, the *fs.PathError of the host file, and the
// Checker's errors.
func Check(path string, opts CheckOptions) (*CheckResult, error) {
	oo := OpenOptions{Format: opts.Format, ReadOnly: opts.Repair == RepairNone, ForceShare: opts.ForceShare}
	oo.ShareWrite = oo.ReadOnly
	if _, err := oo.Access(); err != nil {
		return nil, err
	}
	f, err := hostfile.Open(path, oo.ReadOnly)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	d, err := driverFor(f, &oo)
	if err != nil {
		return nil, err
	}
	if _, err := lockImageFile(f, d, oo); err != nil {
		return nil, err
	}
	c, ok := d.(Checker)
	if !ok {
		return nil, ErrNoCheck
	}
	if opts.Filename == "" {
		opts.Filename = path
	}
	r, err := c.Check(f, opts)
	return r, nameFile(err, path)
}
