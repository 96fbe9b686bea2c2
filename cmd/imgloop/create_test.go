package main

import (
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/imgloop/imgloop/internal/qemutest"
)

// TestCreateCommand runs `imgloop create` and `qemu-img create` with the
// same arguments in two folders and compares what they print and the
// images they make.
func TestCreateCommand(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	tests := []struct {
		name string
		args []string
	}{
		{"qcow2 default", []string{"-f", "qcow2", "x.qcow2", "64M"}},
		{"qcow2 options", []string{"-f", "qcow2", "-o", "cluster_size=16k,extended_l2=on,compression_type=zstd", "-o", "lazy_refcounts=on", "x.qcow2", "1.5G"}},
		{"qcow2 v2", []string{"-f", "qcow2", "-o", "compat=0.10", "x.qcow2", "1000"}},
		{"qcow2 prealloc", []string{"-f", "qcow2", "-o", "preallocation=metadata,refcount_bits=8", "x.qcow2", "4M"}},
		{"qcow2 backing", []string{"-f", "qcow2", "-b", "base.raw", "-F", "raw", "x.qcow2"}},
		{"qcow2 backing option", []string{"-f", "qcow2", "-o", "backing_file=base.raw,backing_fmt=raw", "x.qcow2", "8M"}},
		{"qcow2 data file", []string{"-f", "qcow2", "-o", "data_file=x.data,data_file_raw=on", "x.qcow2", "2M"}},
		{"qcow2 unsafe", []string{"-f", "qcow2", "-u", "-b", "nothere.qcow2", "-F", "qcow2", "x.qcow2", "1M"}},
		{"qcow2 quiet", []string{"-q", "-f", "qcow2", "x.qcow2", "1M"}},
		{"raw", []string{"-f", "raw", "x.qcow2", "1M"}},
		{"raw default format", []string{"x.qcow2", "3k"}},
		{"raw full", []string{"-f", "raw", "-o", "preallocation=full", "x.qcow2", "1M"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ours, ref := t.TempDir(), t.TempDir()
			for _, d := range []string{ours, ref} {
				if err := os.WriteFile(filepath.Join(d, "base.raw"), make([]byte, 3<<20), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			got := mustRun(t, ours, append([]string{"create"}, tc.args...)...)
			want := runIn(t, ref, "qemu-img", append([]string{"create"}, tc.args...)...)
			if slices.Contains(tc.args, "-u") {
				// Made only now, as -u allows: check and info open it.
				for _, d := range []string{ours, ref} {
					runIn(t, d, "qemu-img", "create", "-q", "-f", "qcow2", "nothere.qcow2", "1M")
				}
			}
			if got != want {
				t.Errorf("printed:\n %q\nqemu-img printed:\n %q", got, want)
			}
			if slices.Contains(tc.args, "qcow2") {
				runIn(t, ours, "qemu-img", "check", "x.qcow2")
			}
			a := qemutest.Info(t, filepath.Join(ours, "x.qcow2"))
			b := qemutest.Info(t, filepath.Join(ref, "x.qcow2"))
			for _, k := range []string{"virtual-size", "format", "cluster-size", "backing-filename", "backing-filename-format", "format-specific"} {
				if !reflect.DeepEqual(a[k], b[k]) {
					t.Errorf("info %s: ours %v, qemu-img %v", k, a[k], b[k])
				}
			}
		})
	}
}

// TestCreateCommandErrors checks that bad command lines fail with one
// line on stderr and leave no image behind.
func TestCreateCommandErrors(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "base.raw"), make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		args []string
		want string
	}{
		{[]string{"-f", "qcow2", "x.qcow2", "1X"}, "invalid image size"},
		{[]string{"-f", "qcow2", "x.qcow2"}, "needs a size"},
		{[]string{"-f", "qcow2", "-o", "foo=bar", "x.qcow2", "1M"}, `unknown parameter "foo"`},
		{[]string{"-f", "qcow2", "-o", "cluster_size", "x.qcow2", "1M"}, "not name=value"},
		{[]string{"-f", "qcow2", "-o", "cluster_size=4k,extended_l2=on", "x.qcow2", "1M"}, "at least 16384 bytes"},
		{[]string{"-f", "qcow2", "-o", "compat=0.10,lazy_refcounts=on", "x.qcow2", "1M"}, "compatibility level 1.1"},
		{[]string{"-f", "qcow2", "-o", "cluster_size=1000", "x.qcow2", "1M"}, "power of two"},
		{[]string{"-f", "qcow2", "-b", "base.raw", "x.qcow2", "1M"}, "without backing format"},
		{[]string{"-f", "qcow2", "-b", "missing.raw", "-F", "raw", "x.qcow2"}, "could not open backing image"},
		{[]string{"-f", "raw", "-b", "base.raw", "x.qcow2", "1M"}, "backing file not supported"},
		{[]string{"-f", "raw", "-o", "preallocation=metadata", "x.qcow2", "1M"}, "unsupported preallocation mode"},
		{[]string{"-f", "vmdk", "x.qcow2", "1M"}, "unknown image format"},
		{[]string{"-f", "qcow2"}, "arg"},
	}
	for _, tc := range tests {
		args := append([]string{"create"}, tc.args...)
		r := imgloop(t, dir, args...)
		checkFailure(t, r, args)
		if !strings.Contains(r.stderr, tc.want) {
			t.Errorf("imgloop %s: stderr %q, want it to contain %q", strings.Join(args, " "), r.stderr, tc.want)
		}
		if _, err := os.Stat(filepath.Join(dir, "x.qcow2")); !os.IsNotExist(err) {
			t.Errorf("imgloop %s left x.qcow2 behind", strings.Join(args, " "))
			os.Remove(filepath.Join(dir, "x.qcow2"))
		}
	}
}
