package main

import (
	"fmt"
	"strings"

	"github.com/spf13/cobra"

	"github.com/imgloop/imgloop/disk"
)

func newCreateCmd() *cobra.Command {
	var format, backing, backingFmt string
	var options []string
	var quiet, unsafe bool
	cmd := &cobra.Command{
		Use:   "create [-q] [-f FMT] [-o OPTIONS] [-b BACKING [-F BACKING_FMT]] [-u] IMAGE [SIZE]",
		Short: "Create an image (as qemu-img create)",
		Long: "create makes a new raw or qcow2 image of SIZE bytes (suffixes k, M, G, T, P,\n" +
			"E; fractions like 1.5G), or of its backing file's size when SIZE is left out.\n" +
			"-o takes qemu-img's options as name=value pairs separated by commas:\n" +
			"  qcow2: cluster_size, compat (0.10 or 1.1), lazy_refcounts, refcount_bits,\n" +
			"         extended_l2, compression_type (zlib or zstd), preallocation (off,\n" +
			"         metadata, falloc, full), data_file, data_file_raw, backing_file,\n" +
			"         backing_fmt\n" +
			"  raw:   preallocation (off, falloc, full)\n" +
			"A relative backing file name is stored as given and resolved against the\n" +
			"new image's folder.",
		Args: cobra.RangeArgs(1, 2),
		RunE: func(cmd *cobra.Command, args []string) error {
			opts, err := parseCreateOptions(options)
			if err != nil {
				return err
			}
			if backing != "" {
				opts["backing_file"] = backing
			}
			if backingFmt != "" {
				opts["backing_fmt"] = backingFmt
			}
			size := int64(disk.SizeFromBacking)
			if len(args) == 2 {
				if size, err = disk.ParseSize(args[1]); err != nil {
					return fmt.Errorf("invalid image size: %w", err)
				}
			}
			co := disk.CreateOptions{Options: opts, Unsafe: unsafe}
			if !quiet {
				out := cmd.OutOrStdout()
				co.Announce = func(line string) { fmt.Fprintln(out, line) }
			}
			return disk.Create(format, args[0], size, co)
		},
	}
	cmd.Flags().StringVarP(&format, "format", "f", "raw", "image format (raw, qcow2)")
	cmd.Flags().StringArrayVarP(&options, "options", "o", nil, "format options, `name=value[,...]` (repeatable)")
	cmd.Flags().StringVarP(&backing, "backing", "b", "", "backing file (qcow2)")
	cmd.Flags().StringVarP(&backingFmt, "backing-format", "F", "", "backing file format (needed with -b)")
	cmd.Flags().BoolVarP(&unsafe, "unsafe", "u", false, "do not open the backing file (-F and SIZE then needed)")
	cmd.Flags().BoolVarP(&quiet, "quiet", "q", false, "do not print the \"Formatting ...\" line")
	return cmd
}

// parseCreateOptions merges -o arguments into a map: comma-separated
// name=value pairs, ",," standing for a comma inside a value (as in
// qemu-img); a later value replaces an earlier one.
func parseCreateOptions(args []string) (map[string]string, error) {
	m := map[string]string{}
	for _, arg := range args {
		var parts []string
		var cur strings.Builder
		for i := 0; i < len(arg); i++ {
			if arg[i] != ',' {
				cur.WriteByte(arg[i])
				continue
			}
			if i+1 < len(arg) && arg[i+1] == ',' {
				cur.WriteByte(',')
				i++
				continue
			}
			parts = append(parts, cur.String())
			cur.Reset()
		}
		parts = append(parts, cur.String())
		for _, p := range parts {
			if p == "" {
				continue
			}
			k, v, ok := strings.Cut(p, "=")
			if !ok || k == "" {
				return nil, fmt.Errorf("-o: %q is not name=value", p)
			}
			m[k] = v
		}
	}
	return m, nil
}
