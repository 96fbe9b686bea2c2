package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/imgloop/imgloop/disk"
)

// Output formats of --output.
const (
	outputHuman = "human"
	outputJSON  = "json"
)

// imageFlags say how to open the image a command reads.
type imageFlags struct {
	format     string // -f: the image format, "" to probe
	snapshot   string // --snapshot: an internal snapshot's ID or name
	forceShare bool   // -U: take no lock that refuses other processes
}

// addFormatFlag adds -f/--format, the image format ("" probes).
func addFormatFlag(cmd *cobra.Command, p *string) {
	cmd.Flags().StringVarP(p, "format", "f", "", "image format (raw, qcow2); probed if not given")
}

// addImageFlags adds -f/--format, --snapshot and -U/--force-share.
func addImageFlags(cmd *cobra.Command, p *imageFlags) {
	addFormatFlag(cmd, &p.format)
	cmd.Flags().StringVar(&p.snapshot, "snapshot", "", "read internal snapshot `ID|NAME` (qcow2) instead of the current disk")
	cmd.Flags().BoolVarP(&p.forceShare, "force-share", "U", false, "open the image even if another process writes to it (what is read may then be inconsistent)")
}

// options returns the read-only open options the flags ask for. The image
// is locked as qemu-img convert locks its source (others may read it, not
// write to it), or not against anyone with -U.
func (p imageFlags) options() disk.OpenOptions {
	return disk.OpenOptions{Format: p.format, Snapshot: p.snapshot, ReadOnly: true, ForceShare: p.forceShare}
}

// describeOptions returns the open options of info and map: as options,
// but sharing writes where the format allows it, as qemu-img info and map
// do.
func (p imageFlags) describeOptions() disk.OpenOptions {
	o := p.options()
	o.ShareWrite = true
	return o
}

// addOutputFlag adds --output=human|json.
func addOutputFlag(cmd *cobra.Command, p *string) {
	cmd.Flags().StringVar(p, "output", outputHuman, "output format: human or json")
}

// checkOutput validates an --output value.
func checkOutput(s string) error {
	if s != outputHuman && s != outputJSON {
		return fmt.Errorf("--output: unknown output format %q (want human or json)", s)
	}
	return nil
}
