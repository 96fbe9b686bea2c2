package main

import (
	"fmt"

	"github.com/spf13/cobra"
)

// Output formats of --output.
const (
	outputHuman = "human"
	outputJSON  = "json"
)

// addFormatFlag adds -f/--format, the image format ("" probes).
func addFormatFlag(cmd *cobra.Command, p *string) {
	cmd.Flags().StringVarP(p, "format", "f", "", "image format (raw, qcow2); probed if not given")
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
