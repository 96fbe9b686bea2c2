package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/internal/qemutest"
)

// TestResizeCommand runs `imgloop resize` and `qemu-img resize` with the
// same arguments on copies of an image and compares the results: exit
// status, virtual size, content, and a clean `qemu-img check`.
func TestResizeCommand(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	tests := []struct {
		name   string
		format string // of the image
		opts   string // qemu-img create -o
		size   string
		args   []string // after "resize", before IMAGE SIZE
		to     string   // [+|-]SIZE
	}{
		{"qcow2 absolute", "qcow2", "", "1M", nil, "3M"},
		{"qcow2 plus", "qcow2", "cluster_size=4096", "1M", nil, "+2G"},
		{"qcow2 minus", "qcow2", "", "4M", []string{"--shrink"}, "-1M"},
		{"qcow2 minus after --", "qcow2", "", "4M", []string{"--shrink", "--"}, "-3M"},
		{"qcow2 fraction", "qcow2", "compat=0.10", "1M", []string{"-f", "qcow2"}, "1.5G"},
		{"qcow2 quiet", "qcow2", "", "1M", []string{"-q"}, "+64k"},
		{"qcow2 same size", "qcow2", "", "1M", nil, "1M"},
		{"raw grow", "raw", "", "1M", []string{"-f", "raw"}, "+1000"},
		{"raw shrink", "raw", "", "1M", []string{"-f", "raw", "--shrink"}, "-1000"},
		{"raw probed", "raw", "", "1M", nil, "2M"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			ours := filepath.Join(dir, "ours."+tc.format)
			ref := filepath.Join(dir, "ref."+tc.format)
			qemutest.Create(t, ours, tc.format, tc.opts, tc.size)
			qemutest.IO(t, ours, tc.format, "write -P 0x11 0 64k")
			b, err := os.ReadFile(ours)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(ref, b, 0o644); err != nil {
				t.Fatal(err)
			}
			args := append(append([]string{"resize"}, tc.args...), ours, tc.to)
			r := imgloop(t, dir, args...)
			if r.code != 0 {
				t.Fatalf("imgloop %s: exit %d, stderr %q", strings.Join(args, " "), r.code, r.stderr)
			}
			wantOut := "Image resized.\n"
			if strings.Contains(strings.Join(tc.args, " "), "-q") {
				wantOut = ""
			}
			if r.stdout != wantOut || r.stderr != "" {
				t.Errorf("stdout %q, stderr %q; want %q and nothing", r.stdout, r.stderr, wantOut)
			}
			qargs := append(append([]string{"resize", "-q", "-f", tc.format}, tc.args...), ref, tc.to)
			qemutest.Img(t, qargs...)
			qi, oi := qemutest.Info(t, ref, "-f", tc.format), qemutest.Info(t, ours, "-f", tc.format)
			if qi["virtual-size"] != oi["virtual-size"] {
				t.Errorf("virtual-size %v, qemu-img made %v", oi["virtual-size"], qi["virtual-size"])
			}
			if out, err := qemutest.Try("qemu-img", "compare", "-f", tc.format, "-F", tc.format, ours, ref); err != nil {
				t.Errorf("qemu-img compare: %v\n%s", err, out)
			}
			if tc.format == "qcow2" {
				if out, err := qemutest.Try("qemu-img", "check", ours); err != nil {
					t.Errorf("qemu-img check: %v\n%s", err, out)
				}
			}
		})
	}
}

// TestResizeCommandErrors checks that refused resizes fail with exit
// status 1 and one line on stderr, and leave the image as it was.
func TestResizeCommandErrors(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	qemutest.Create(t, filepath.Join(dir, "a.qcow2"), "qcow2", "", "4M")
	qemutest.IO(t, filepath.Join(dir, "a.qcow2"), "qcow2", "write -P 1 3M 64k")
	qemutest.Create(t, filepath.Join(dir, "v2snap.qcow2"), "qcow2", "compat=0.10", "4M")
	qemutest.Img(t, "snapshot", "-c", "s1", filepath.Join(dir, "v2snap.qcow2"))
	qemutest.Create(t, filepath.Join(dir, "a.raw"), "raw", "", "4M")
	tests := []struct {
		args []string
		want string
	}{
		{[]string{"a.qcow2", "1M"}, "--shrink"},
		{[]string{"a.raw", "-1M"}, "--shrink"},
		{[]string{"--shrink", "a.qcow2", "1M"}, "guest offset 0x300000"},
		{[]string{"--shrink", "a.qcow2", "-4M"}, "must be positive"},
		{[]string{"a.qcow2", "0"}, "must be positive"},
		{[]string{"a.qcow2", "+8E"}, "too large"},
		{[]string{"a.qcow2", "5000000"}, "multiple of 512"},
		{[]string{"a.qcow2", "1X"}, "invalid size"},
		{[]string{"a.qcow2", "+4P"}, "L1 table"},
		{[]string{"v2snap.qcow2", "8M"}, "version 2 image that has internal snapshots"},
		{[]string{"missing.qcow2", "8M"}, "no such file"},
		{[]string{"-f", "vmdk", "a.qcow2", "8M"}, "unknown image format"},
		{[]string{"--bogus", "a.qcow2", "8M"}, "unknown flag"},
		{[]string{"a.qcow2"}, "expects IMAGE and SIZE"},
		{nil, "expects IMAGE and SIZE"},
		{[]string{"a.qcow2", "b.qcow2", "1M"}, "expects IMAGE and SIZE"},
	}
	before := map[string][]byte{}
	for _, name := range []string{"a.qcow2", "v2snap.qcow2", "a.raw"} {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		before[name] = b
	}
	for _, tc := range tests {
		args := append([]string{"resize"}, tc.args...)
		r := imgloop(t, dir, args...)
		checkFailure(t, r, args)
		if r.code != 1 {
			t.Errorf("imgloop %s: exit %d, want 1", strings.Join(args, " "), r.code)
		}
		if !strings.Contains(r.stderr, tc.want) {
			t.Errorf("imgloop %s: stderr %q, want it to contain %q", strings.Join(args, " "), r.stderr, tc.want)
		}
	}
	for name, b := range before {
		got, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if string(got) != string(b) {
			t.Errorf("%s changed although every resize failed", name)
		}
	}
}

// TestResizeCommandLocked: an image another process holds for writing is
// not resized.
func TestResizeCommandLocked(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	path := filepath.Join(dir, "a.qcow2")
	qemutest.Create(t, path, "qcow2", "", "1M")
	// Hold the image as a writer (OFD locks: the child process conflicts
	// with this open file).
	img, err := disk.Open(path, disk.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	args := []string{"resize", "a.qcow2", "2M"}
	r := imgloop(t, dir, args...)
	checkFailure(t, r, args)
	if !strings.Contains(r.stderr, "lock") {
		t.Errorf("stderr %q, want a lock error", r.stderr)
	}
}
