package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/internal/report"
)

func newMapCmd() *cobra.Command {
	var src imageFlags
	var output string
	var offset int64
	cmd := &cobra.Command{
		Use:   "map [-f FMT] [--snapshot ID|NAME] [--output=human|json] [--offset N] [-U] IMAGE",
		Short: "Print the allocation map of an image (as qemu-img map)",
		Long: "map prints the image's extents as qemu-img map does. With --offset N it\n" +
			"prints where byte N of the virtual disk is stored instead: for qcow2 the\n" +
			"cluster that holds it, for other formats the extent containing it.",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			img, err := disk.Open(args[0], src.describeOptions())
			if err != nil {
				return err
			}
			defer img.Close()
			out := cmd.OutOrStdout()
			if cmd.Flags().Changed("offset") {
				if err := disk.CheckRange(offset, 1, img.Size()); err != nil {
					return fmt.Errorf("--offset: %w", err)
				}
				if ok, err := writeLocation(out, img, offset, output == outputJSON); ok || err != nil {
					return err
				}
				return writeExtentAt(out, img, offset, output == outputJSON)
			}
			p := report.NewMapPrinter(out, output == outputJSON)
			err = disk.Extents(img, 0, img.Size(), func(e disk.Extent) error {
				return p.Add(report.Entry(e))
			})
			if err != nil {
				_ = p.Flush()
				return err
			}
			return p.Close()
		},
	}
	addImageFlags(cmd, &src)
	addOutputFlag(cmd, &output)
	cmd.Flags().Int64Var(&offset, "offset", 0, "print where byte `N` of the virtual disk is stored")
	return cmd
}

// errFound stops an extent walk.
var errFound = errors.New("found")

// writeExtentAt prints the extent of img that contains off.
func writeExtentAt(w io.Writer, img disk.Image, off int64, asJSON bool) error {
	var found disk.Extent
	err := disk.Extents(img, 0, img.Size(), func(e disk.Extent) error {
		if off < e.Offset+e.Length {
			found = e
			return errFound
		}
		return nil
	})
	if !errors.Is(err, errFound) {
		if err == nil {
			err = fmt.Errorf("no extent contains offset %d", off)
		}
		return err
	}
	e := report.Entry(found)
	if asJSON {
		b, err := json.MarshalIndent(struct {
			Offset int64 `json:"offset"`
			report.MapEntry
			File string `json:"file,omitempty"`
		}{off, e, e.File}, "", "    ")
		if err != nil {
			return err
		}
		_, err = fmt.Fprintf(w, "%s\n", b)
		return err
	}
	host := "none"
	if e.Offset != nil {
		host = fmt.Sprint(*e.Offset)
	}
	_, err = fmt.Fprintf(w, "offset: %d\nstart: %d\nlength: %d\ndepth: %d\npresent: %t\nzero: %t\ndata: %t\nhost_offset: %s\nfile: %s\n",
		off, e.Start, e.Length, e.Depth, e.Present, e.Zero, e.Data, host, e.File)
	return err
}
