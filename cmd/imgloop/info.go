package main

import (
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/internal/report"
)

func newInfoCmd() *cobra.Command {
	var src imageFlags
	var output string
	var header bool
	cmd := &cobra.Command{
		Use:   "info [-f FMT] [--output=human|json] [--header] [--snapshot ID|NAME] [-U] IMAGE",
		Short: "Describe an image (as qemu-img info)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			path := args[0]
			opts := src.describeOptions()
			opts.NoBacking = true // as qemu-img info: describe, don't read
			img, err := disk.Open(path, opts)
			if err != nil {
				return err
			}
			defer img.Close()
			if header {
				return writeHeader(cmd.OutOrStdout(), img)
			}
			r := report.Image{Filename: path, ActualSize: -1}
			if d, ok := img.(disk.Describer); ok {
				r.Info = d.Info()
			} else {
				r.Info = disk.Info{Format: src.format, VirtualSize: img.Size()}
			}
			files := []string{path}
			if df := dataFile(path, img); df != "" {
				files = append(files, df)
			}
			if n, err := report.DiskUsage(files...); err == nil {
				r.ActualSize = n
			}
			if output == outputJSON {
				return report.WriteInfoJSON(cmd.OutOrStdout(), r)
			}
			return report.WriteInfoHuman(cmd.OutOrStdout(), r)
		},
	}
	addImageFlags(cmd, &src)
	addOutputFlag(cmd, &output)
	cmd.Flags().BoolVar(&header, "header", false, "print the QCOW2 header fields, one \"name: value\" per line")
	return cmd
}

// resolve returns name, a file name stored in the image at path,
// relative to the image's folder.
func resolve(path, name string) string {
	if filepath.IsAbs(name) {
		return name
	}
	return filepath.Join(filepath.Dir(path), name)
}
