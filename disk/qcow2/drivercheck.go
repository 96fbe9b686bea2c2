package qcow2

import (
	"fmt"

	"github.com/imgloop/imgloop/disk"
)

var _ disk.Checker = Driver{}

// Check implements disk.Checker with the package's Check: it checks (and,
// with opts.Repair, repairs) the qcow2 image in f as `qemu-img check`
// does. opts.Format and opts.ForceShare are disk.Check's concern and
// ignored here.
func (Driver) Check(f disk.File, opts disk.CheckOptions) (*disk.CheckResult, error) {
	var mode RepairMode
	switch opts.Repair {
	case disk.RepairNone:
		mode = RepairNone
	case disk.RepairLeaks:
		mode = RepairLeaks
	case disk.RepairAll:
		mode = RepairAll
	default:
		return nil, fmt.Errorf("qcow2: check: unknown repair mode %d", opts.Repair)
	}
	r, err := Check(f, CheckOptions{Filename: opts.Filename, MaxMemory: opts.MaxMemory, Repair: mode, MaxMessages: opts.MaxMessages})
	if err != nil {
		return nil, err
	}
	return &disk.CheckResult{
		Filename:           r.Filename,
		Format:             r.Format,
		CheckErrors:        r.CheckErrors,
		Corruptions:        r.Corruptions,
		Leaks:              r.Leaks,
		CorruptionsFixed:   r.CorruptionsFixed,
		LeaksFixed:         r.LeaksFixed,
		ImageEndOffset:     r.ImageEndOffset,
		TotalClusters:      r.TotalClusters,
		AllocatedClusters:  r.AllocatedClusters,
		FragmentedClusters: r.FragmentedClusters,
		CompressedClusters: r.CompressedClusters,
		Messages:           r.Messages,
		MessagesDropped:    r.MessagesDropped,
		Failure:            r.Failure,
	}, nil
}
