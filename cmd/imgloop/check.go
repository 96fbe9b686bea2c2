package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/imgloop/imgloop/disk"
)

// statusError is an error that ends imgloop with a given exit status (as
// qemu-img check does: 2 corruptions, 3 leaks, 63 no check for the
// format) instead of 1.
type statusError struct {
	code int
	msg  string
}

func (e *statusError) Error() string { return e.msg }

// exitStatus returns the exit status for a command's error: the one a
// *statusError carries, else 1.
func exitStatus(err error) int {
	var se *statusError
	if errors.As(err, &se) {
		return se.code
	}
	return 1
}

func newCheckCmd() *cobra.Command {
	var format, output, repair string
	var forceShare bool
	cmd := &cobra.Command{
		Use:   "check [-f FMT] [--output=human|json] [-r leaks|all] [-U] IMAGE",
		Short: "Check an image's metadata for consistency (as qemu-img check)",
		Long: "check counts the references to every host cluster of a qcow2 image and\n" +
			"compares them with its refcounts, as qemu-img check does, reporting the\n" +
			"same numbers. The findings are listed on standard error.\n\n" +
			"-r leaks frees leaked clusters; -r all also repairs what qemu-img check\n" +
			"-r all repairs: refcounts too low, OFLAG_COPIED flags, unaligned\n" +
			"preallocated clusters, and missing or broken refcount blocks, by\n" +
			"rebuilding the refcount structures (new ones written first, the header\n" +
			"switched last). The image is then checked again, and that is reported.\n\n" +
			"Exit status: 0 no errors, 2 corruptions, 3 leaked clusters only, 1 the\n" +
			"check failed, 63 the format has no check (raw).",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			mode := disk.RepairNone
			switch repair {
			case "":
			case "leaks":
				mode = disk.RepairLeaks
			case "all":
				mode = disk.RepairAll
			default:
				return fmt.Errorf("-r: unknown value %q (expecting 'leaks' or 'all')", repair)
			}
			if forceShare && mode != disk.RepairNone {
				// As qemu-img: force-share is for read-only opens.
				return errors.New("-U: --force-share cannot be used with -r (a repair takes the write lock)")
			}
			path := args[0]
			r, err := disk.Check(path, disk.CheckOptions{Format: format, Repair: mode, ForceShare: forceShare, Filename: path})
			if errors.Is(err, disk.ErrNoCheck) {
				return &statusError{code: disk.CheckExitNotSupported, msg: "This image format does not support checks"}
			}
			if err != nil {
				return err
			}
			return reportCheck(cmd.OutOrStdout(), cmd.ErrOrStderr(), r, output == outputJSON)
		},
	}
	addFormatFlag(cmd, &format)
	addOutputFlag(cmd, &output)
	cmd.Flags().BoolVarP(&forceShare, "force-share", "U", false, "check even if another process writes to the image (the result may be wrong)")
	cmd.Flags().StringVarP(&repair, "repair", "r", "", "repair `leaks` (refcounts above the references) or all (as qemu-img: refcounts below them, OFLAG_COPIED flags, broken refcount structures rebuilt)")
	return cmd
}

// reportCheck prints r: the findings on stderr, the report on stdout (as
// qemu-img check's human or JSON output), and returns the error that
// gives qemu-img's exit status.
func reportCheck(stdout, stderr io.Writer, r *disk.CheckResult, asJSON bool) error {
	for _, m := range r.Messages {
		fmt.Fprintln(stderr, m)
	}
	if r.MessagesDropped > 0 {
		fmt.Fprintf(stderr, "(%d more findings not listed)\n", r.MessagesDropped)
	}
	if r.Failure != "" {
		// As qemu-img: no report for a check that did not complete.
		return &statusError{code: disk.CheckExitFailed, msg: "Check failed: " + r.Failure}
	}
	var err error
	if !asJSON && (r.LeaksFixed > 0 || r.CorruptionsFixed > 0) {
		fmt.Fprintf(stdout, "The following inconsistencies were found and repaired:\n\n"+
			"    %d leaked clusters\n    %d corruptions\n\nDouble checking the fixed image now...\n",
			r.LeaksFixed, r.CorruptionsFixed)
	}
	if asJSON {
		var b []byte
		if b, err = json.MarshalIndent(r, "", "    "); err == nil {
			_, err = fmt.Fprintf(stdout, "%s\n", b)
		}
	} else {
		_, err = io.WriteString(stdout, humanCheck(r))
	}
	if err != nil {
		return err
	}
	switch code := r.ExitCode(); code {
	case disk.CheckExitClean:
		return nil
	case disk.CheckExitFailed:
		return &statusError{code: code, msg: "Check failed"}
	case disk.CheckExitCorruptions:
		return &statusError{code: code, msg: fmt.Sprintf("check: %d errors found on the image", r.Corruptions)}
	default:
		return &statusError{code: code, msg: fmt.Sprintf("check: %d leaked clusters found on the image", r.Leaks)}
	}
}

// humanCheck formats r as qemu-img check's human output
// (dump_human_image_check).
func humanCheck(r *disk.CheckResult) string {
	var s string
	if r.Corruptions == 0 && r.Leaks == 0 && r.CheckErrors == 0 {
		s += "No errors were found on the image.\n"
	} else {
		if r.Corruptions > 0 {
			s += fmt.Sprintf("\n%d errors were found on the image.\n"+
				"Data may be corrupted, or further writes to the image may corrupt it.\n", r.Corruptions)
		}
		if r.Leaks > 0 {
			s += fmt.Sprintf("\n%d leaked clusters were found on the image.\n"+
				"This means waste of disk space, but no harm to data.\n", r.Leaks)
		}
		if r.CheckErrors > 0 {
			s += fmt.Sprintf("\n%d internal errors have occurred during the check.\n", r.CheckErrors)
		}
	}
	if r.TotalClusters != 0 && r.AllocatedClusters != 0 {
		s += fmt.Sprintf("%d/%d = %0.2f%% allocated, %0.2f%% fragmented, %0.2f%% compressed clusters\n",
			r.AllocatedClusters, r.TotalClusters,
			float64(r.AllocatedClusters)*100/float64(r.TotalClusters),
			float64(r.FragmentedClusters)*100/float64(r.AllocatedClusters),
			float64(r.CompressedClusters)*100/float64(r.AllocatedClusters))
	}
	if r.ImageEndOffset != 0 {
		s += fmt.Sprintf("Image end offset: %d\n", r.ImageEndOffset)
	}
	return s
}
