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
	format   string // -f: the image format, "" to probe
	snapshot string // --snapshot: an internal snapshot's ID or name
}

// addFormatFlag adds -f/--format, the image format ("" probes).
func addFormatFlag(cmd *cobra.Command, p *string) {
	cmd.Flags().StringVarP(p, "format", "f", "", "image format (raw, qcow2); probed if not given")
}

// addImageFlags adds -f/--format and --snapshot.
func addImageFlags(cmd *cobra.Command, p *imageFlags) {
	addFormatFlag(cmd, &p.format)
	cmd.Flags().StringVar(&p.snapshot, "snapshot", "", "read internal snapshot `ID|NAME` (qcow2) instead of the current disk")
}

// options returns the read-only open options the flags ask for.
func (p imageFlags) options() disk.OpenOptions {
	return disk.OpenOptions{Format: p.format, Snapshot: p.snapshot, ReadOnly: true}
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
