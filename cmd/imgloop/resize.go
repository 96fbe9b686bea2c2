package main

import (
	"errors"
	"fmt"
	"math"

	"github.com/spf13/cobra"

	"github.com/imgloop/imgloop/disk"
)

func newResizeCmd() *cobra.Command {
	var format string
	var shrink, quiet bool
	cmd := &cobra.Command{
		Use:   "resize [-f FMT] [--shrink] [-q] IMAGE [+|-]SIZE",
		Short: "Change an image's virtual size (as qemu-img resize)",
		Long: "resize sets the virtual size of a raw or qcow2 image to SIZE (suffixes k, M,\n" +
			"G, T, P, E), or grows (+SIZE) or shrinks (-SIZE) it by SIZE. SIZE is always\n" +
			"the last argument, so \"-1G\" is a size, not an option.\n\n" +
			"Shrinking needs --shrink, as in qemu-img. A raw image is truncated: the\n" +
			"data past the new end is lost. A qcow2 image is shrunk only when nothing\n" +
			"past the new end is allocated (qemu-img would discard it); otherwise\n" +
			"resize fails and names the first allocated offset. A qcow2 size must be\n" +
			"a multiple of 512.",
		// SIZE is taken before flags are parsed, so that a negative size
		// is not read as an option (qemu-img does the same).
		DisableFlagParsing: true,
		RunE: func(cmd *cobra.Command, args []string) error {
			for _, a := range args {
				if a == "-h" || a == "--help" {
					return cmd.Help()
				}
			}
			if len(args) == 0 {
				return errors.New("resize: expects IMAGE and SIZE")
			}
			sizeArg := args[len(args)-1]
			cmd.InheritedFlags() // merges the root's flags into cmd.Flags()
			if err := cmd.Flags().Parse(args[:len(args)-1]); err != nil {
				return fmt.Errorf("resize: %w", err)
			}
			rest := cmd.Flags().Args()
			if len(rest) != 1 {
				return errors.New("resize: expects IMAGE and SIZE")
			}
			return runResize(cmd, rest[0], sizeArg, format, shrink, quiet)
		},
	}
	addFormatFlag(cmd, &format)
	cmd.Flags().BoolVar(&shrink, "shrink", false, "allow the size to go down")
	cmd.Flags().BoolVarP(&quiet, "quiet", "q", false, "do not print \"Image resized.\"")
	return cmd
}

// runResize resizes the image at path as sizeArg ([+|-]SIZE) says.
func runResize(cmd *cobra.Command, path, sizeArg, format string, shrink, quiet bool) error {
	relative, s := int64(0), sizeArg
	if s != "" && (s[0] == '+' || s[0] == '-') {
		relative = 1
		if s[0] == '-' {
			relative = -1
		}
		s = s[1:]
	}
	n, err := disk.ParseSize(s)
	if err != nil {
		return err
	}
	img, err := disk.Open(path, disk.OpenOptions{Format: format})
	if err != nil {
		return err
	}
	err = resizeTo(img, n, relative, shrink)
	if cerr := img.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	if !quiet {
		fmt.Fprintln(cmd.OutOrStdout(), "Image resized.")
	}
	return nil
}

// resizeTo resizes img to n bytes (relative 0), or by n bytes up
// (relative 1) or down (relative -1).
func resizeTo(img disk.Image, n, relative int64, shrink bool) error {
	cur := img.Size()
	total := n
	if relative != 0 {
		if relative > 0 && n > math.MaxInt64-cur {
			return fmt.Errorf("new image size (%d + %d bytes) is too large", cur, n)
		}
		total = cur + relative*n
	}
	switch {
	case total <= 0:
		return errors.New("new image size must be positive")
	case total < cur && !shrink:
		return fmt.Errorf("use the --shrink option to perform a shrink operation (from %d to %d bytes)", cur, total)
	}
	return disk.Resize(img, total)
}
