package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/disk/hostfile"
	"github.com/imgloop/imgloop/disk/qcow2"
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
			mode := qcow2.RepairNone
			switch repair {
			case "":
			case "leaks":
				mode = qcow2.RepairLeaks
			case "all":
				mode = qcow2.RepairAll
			default:
				return fmt.Errorf("-r: unknown value %q (expecting 'leaks' or 'all')", repair)
			}
			path := args[0]
			f, err := hostfile.Open(path, mode == qcow2.RepairNone)
			if err != nil {
				return err
			}
			defer f.Close()
			switch {
			case mode != qcow2.RepairNone:
				err = lockImage(f, true)
			case !forceShare:
				err = lockImage(f, false)
			}
			if err != nil {
				return fmt.Errorf("%s: %w", path, err)
			}
			name, err := checkFormat(f, format)
			if err != nil {
				return err
			}
			if name != "qcow2" {
				return &statusError{code: qcow2.CheckExitNotSupported, msg: "This image format does not support checks"}
			}
			r, err := qcow2.Check(f, qcow2.CheckOptions{Filename: path, Repair: mode})
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

// checkFormat returns the name of the format of f: format if given (it
// must be a known one), else the detected one.
func checkFormat(f disk.File, format string) (string, error) {
	if format != "" {
		d, err := disk.Lookup(format)
		if err != nil {
			return "", err
		}
		return d.Name(), nil
	}
	var hdr [disk.ProbeSize]byte
	n, err := f.ReadAt(hdr[:], 0)
	if err != nil && !errors.Is(err, io.EOF) {
		return "", fmt.Errorf("reading %s: %w", f.Name(), err)
	}
	d, err := disk.Detect(hdr[:n])
	if err != nil {
		return "", err
	}
	return d.Name(), nil
}

// reportCheck prints r: the findings on stderr, the report on stdout (as
// qemu-img check's human or JSON output), and returns the error that
// gives qemu-img's exit status.
func reportCheck(stdout, stderr io.Writer, r *qcow2.CheckResult, asJSON bool) error {
	for _, m := range r.Messages {
		fmt.Fprintln(stderr, m)
	}
	if r.MessagesDropped > 0 {
		fmt.Fprintf(stderr, "(%d more findings not listed)\n", r.MessagesDropped)
	}
	if r.Failure != "" {
		// As qemu-img: no report for a check that did not complete.
		return &statusError{code: qcow2.CheckExitFailed, msg: "Check failed: " + r.Failure}
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
	case qcow2.CheckExitClean:
		return nil
	case qcow2.CheckExitFailed:
		return &statusError{code: code, msg: "Check failed"}
	case qcow2.CheckExitCorruptions:
		return &statusError{code: code, msg: fmt.Sprintf("check: %d errors found on the image", r.Corruptions)}
	default:
		return &statusError{code: code, msg: fmt.Sprintf("check: %d leaked clusters found on the image", r.Leaks)}
	}
}

// QEMU's image locking (block/file-posix.c): a process holding permission
// bit i of an image locks byte lockPermBase+i of it (a shared OFD lock),
// and one refusing to share permission i locks byte lockSharedBase+i.
const (
	lockPermBase       = 100
	lockSharedBase     = 200
	permConsistentRead = 0
	permWrite          = 1
	permResize         = 3
)

// lockImage takes the locks QEMU takes to read (write: to write) an
// image without letting others write to it, as qemu-img check (-r) does,
// so that imgloop and a QEMU process using the image exclude each other.
// The locks last until f is closed.
func lockImage(f *hostfile.OSFile, write bool) error {
	fd := f.File().Fd()
	lock := func(cmd int, typ int16, b int64) (*unix.Flock_t, error) {
		l := &unix.Flock_t{Type: typ, Whence: 0, Start: b, Len: 1}
		return l, unix.FcntlFlock(fd, cmd, l)
	}
	// What we hold, and what we refuse to share (others' writes).
	held := []int64{lockPermBase + permConsistentRead}
	unshared := []int64{lockSharedBase + permWrite}
	// Others must neither refuse to share what we hold nor hold what we
	// refuse to share.
	conflicts := []int64{lockSharedBase + permConsistentRead, lockPermBase + permWrite}
	what := "shared \"write\""
	if write {
		held = append(held, lockPermBase+permWrite)
		unshared = append(unshared, lockSharedBase+permResize)
		conflicts = append(conflicts, lockSharedBase+permWrite, lockPermBase+permResize)
		what = "\"write\""
	}
	for _, b := range append(held, unshared...) {
		if _, err := lock(unix.F_OFD_SETLK, unix.F_RDLCK, b); err != nil {
			return fmt.Errorf("failed to get %s lock: %w (is another process using the image?)", what, err)
		}
	}
	for _, b := range conflicts {
		l, err := lock(unix.F_OFD_GETLK, unix.F_WRLCK, b)
		if err != nil {
			return fmt.Errorf("testing the image locks: %w", err)
		}
		if l.Type != unix.F_UNLCK {
			return fmt.Errorf("failed to get %s lock: is another process using the image? (-U checks it anyway)", what)
		}
	}
	return nil
}

// humanCheck formats r as qemu-img check's human output
// (dump_human_image_check).
func humanCheck(r *qcow2.CheckResult) string {
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
