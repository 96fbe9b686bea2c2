// Command imgloop inspects, creates, checks, converts and serves disk
// images (raw, qcow2) without QEMU: `imgloop info`, `map`, `create`,
// `check`, `convert` and `resize` behave like their qemu-img namesakes and
// print the same formats; `imgloop serve` exports images over NBD as
// qemu-nbd does.
//
// Exit status: 0 on success; otherwise one line "imgloop: <error>" on
// standard error and 1, except for check, which exits as qemu-img check
// does (2 corruptions, 3 leaks only, 63 format without checks).
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime/debug"
	"strings"

	"github.com/spf13/cobra"

	// The format drivers register themselves; the commands reach them
	// only through package disk.
	_ "github.com/imgloop/imgloop/disk/qcow2"
	_ "github.com/imgloop/imgloop/disk/raw"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// run executes the command line args and returns the exit status.
func run(args []string, stdout, stderr io.Writer) (status int) {
	defer func() {
		// A panic is a bug, but the user still gets one line; the stack
		// goes to stderr only when IMGLOOP_TRACEBACK=1.
		if r := recover(); r != nil {
			if os.Getenv("IMGLOOP_TRACEBACK") == "1" {
				fmt.Fprintf(stderr, "%s\n", debug.Stack())
			}
			fmt.Fprintf(stderr, "imgloop: internal error: %v\n", r)
			status = 2
		}
	}()
	root := newRootCmd(stdout, stderr)
	root.SetArgs(args)
	err := root.ExecuteContext(context.Background())
	if perr := stopProfile(); err == nil {
		err = perr
	}
	if err != nil {
		fmt.Fprintf(stderr, "imgloop: %s\n", oneLine(err.Error()))
		return exitStatus(err)
	}
	return 0
}

// oneLine folds a multi-line message into one line.
func oneLine(s string) string {
	return strings.Join(strings.Fields(strings.ReplaceAll(s, "\n", "; ")), " ")
}

func newRootCmd(stdout, stderr io.Writer) *cobra.Command {
	root := &cobra.Command{
		Use:   "imgloop",
		Short: "Inspect, convert and serve disk images (raw, qcow2)",
		Long: "imgloop reads and writes disk images (raw, qcow2) in user space: info,\n" +
			"map, create, check, convert and resize behave as qemu-img's; serve\n" +
			"exports images over NBD as qemu-nbd does.",
		SilenceUsage:      true,
		SilenceErrors:     true,
		PersistentPreRunE: func(cmd *cobra.Command, args []string) error { return startProfile() },
		RunE: func(cmd *cobra.Command, args []string) error {
			return errors.New("missing command (try imgloop --help)")
		},
	}
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.CompletionOptions.DisableDefaultCmd = true
	addProfileFlag(root)
	root.AddCommand(newInfoCmd(), newMapCmd(), newConvertCmd(), newCheckCmd(), newCreateCmd())
	root.AddCommand(newResizeCmd(), newServeCmd())
	return root
}
