package main

import (
	"fmt"
	"os"
	"runtime/pprof"

	"github.com/spf13/cobra"
)

// cpuProfile is the --cpuprofile path (hidden flag, for benchmarking) and
// profileFile the open profile while one is being written.
var (
	cpuProfile  string
	profileFile *os.File
)

func addProfileFlag(root *cobra.Command) {
	root.PersistentFlags().StringVar(&cpuProfile, "cpuprofile", "", "write a CPU profile to `file`")
	_ = root.PersistentFlags().MarkHidden("cpuprofile")
}

func startProfile() error {
	if cpuProfile == "" {
		return nil
	}
	f, err := os.Create(cpuProfile)
	if err != nil {
		return err
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return fmt.Errorf("cpu profile: %w", err)
	}
	profileFile = f
	return nil
}

func stopProfile() error {
	if profileFile == nil {
		return nil
	}
	pprof.StopCPUProfile()
	err := profileFile.Close()
	profileFile = nil
	return err
}
