package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/imgloop/imgloop/internal/qemutest"
)

// TestConvertQcow2 converts a raw image with data and holes, and a
// compressed qcow2 image, to qcow2 with several options, and checks the
// outputs with qemu-img check and compare; -c must shrink compressible
// data.
func TestConvertQcow2(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	dir := t.TempDir()
	data := make([]byte, 5<<20)
	copy(data[256<<10:], qemutest.Compressible(1, 2<<20))
	copy(data[4<<20+100:], qemutest.Compressible(2, 50000))
	if err := os.WriteFile(filepath.Join(dir, "src.raw"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	qemuImg(t, dir, "convert", "-c", "-O", "qcow2", "src.raw", "src.qcow2")
	sizes := map[string]int64{}
	for _, src := range []string{"src.raw", "src.qcow2"} {
		for _, args := range [][]string{
			nil,
			{"-c"},
			{"-o", "cluster_size=4k"},
			{"-o", "compat=0.10"},
			{"-c", "-o", "compression_type=zstd", "-j", "1"},
			{"-p", "-t", "unsafe", "-o", "refcount_bits=8", "-S", "0"},
		} {
			name := src + "/" + strings.Join(args, " ")
			t.Run(name, func(t *testing.T) {
				full := append(append([]string{"convert", "-O", "qcow2"}, args...), src, "out.qcow2")
				r := imgloop(t, dir, full...)
				if r.code != 0 {
					t.Fatalf("exit %d: %s", r.code, r.stderr)
				}
				check := qemuImg(t, dir, "check", "out.qcow2")
				if !strings.Contains(check, "No errors were found") || strings.Contains(check, "leaked") {
					t.Fatalf("qemu-img check:\n%s", check)
				}
				qemuImg(t, dir, "compare", "-q", src, "out.qcow2")
				got := filepath.Join(t.TempDir(), "got.raw")
				mustRun(t, dir, "convert", "out.qcow2", got)
				compareFiles(t, got, filepath.Join(dir, "src.raw"))
				fi, err := os.Stat(filepath.Join(dir, "out.qcow2"))
				if err != nil {
					t.Fatal(err)
				}
				sizes[name] = fi.Size()
			})
		}
	}
	for _, src := range []string{"src.raw", "src.qcow2"} {
		if plain, comp := sizes[src+"/"], sizes[src+"/-c"]; comp == 0 || comp >= plain*9/10 {
			t.Errorf("%s: -c output of %d bytes, %d without", src, comp, plain)
		}
	}
}

// TestConvertQcow2Errors checks the refusals of convert's qcow2 options.
func TestConvertQcow2Errors(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "src.raw"), make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"convert", "-c", "src.raw", "out.raw"},
		{"convert", "-o", "cluster_size=4k", "src.raw", "out.raw"},
		{"convert", "-O", "qcow2", "-o", "cluster_size=3k", "src.raw", "out.qcow2"},
		{"convert", "-O", "qcow2", "-o", "nope=1", "src.raw", "out.qcow2"},
		{"convert", "-O", "qcow2", "-o", "preallocation=full", "src.raw", "out.qcow2"},
		{"convert", "-O", "qcow2", "-o", "backing_file=src.raw,backing_fmt=raw", "src.raw", "out.qcow2"},
		{"convert", "-O", "qcow2", "-o", "compat=0.10,compression_type=zstd", "src.raw", "out.qcow2"},
		{"convert", "-O", "qcow2", "src.raw", "src.raw"},
	} {
		checkFailure(t, imgloop(t, dir, args...), args)
	}
}
