package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/imgloop/imgloop/internal/qemutest"
)

// TestConvertOracle converts every test image with imgloop and with
// qemu-img and compares the outputs byte for byte.
func TestConvertOracle(t *testing.T) {
	dir, imgs := sharedImages(t)
	for _, img := range imgs {
		t.Run(img.name, func(t *testing.T) {
			out := t.TempDir()
			want := filepath.Join(out, "qemu.raw")
			qemuImg(t, dir, append(append([]string{"convert", "-O", "raw"}, img.openArgs()...), img.name, want)...)
			for _, extra := range [][]string{nil, {"-j", "1"}, {"-S", "0", "-j", "3", "-t", "unsafe"}} {
				got := filepath.Join(out, "imgloop.raw")
				args := append(append(append([]string{"convert", "-O", "raw"}, extra...), img.openArgs()...), img.name, got)
				mustRun(t, dir, args...)
				compareFiles(t, got, want)
			}
		})
	}
}

func compareFiles(t *testing.T, got, want string) {
	t.Helper()
	g, err := os.ReadFile(got)
	if err != nil {
		t.Fatal(err)
	}
	w, err := os.ReadFile(want)
	if err != nil {
		t.Fatal(err)
	}
	if d := qemutest.FirstDiff(g, w); d >= 0 {
		t.Fatalf("%s differs from qemu-img's output at offset %#x (sizes %d, %d)", got, d, len(g), len(w))
	}
}

// allocated returns the bytes allocated to path on the host.
func allocated(t *testing.T, path string) int64 {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Sys().(*syscall.Stat_t).Blocks * 512
}

// TestConvertSparse checks that holes and zero data stay holes, that an
// existing destination is truncated, and that -p reports progress.
func TestConvertSparse(t *testing.T) {
	dir, _ := sharedImages(t)
	tmp := t.TempDir()
	out := filepath.Join(tmp, "out.raw")
	if err := os.WriteFile(out, bytes.Repeat([]byte{0xff}, 16<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	r := imgloop(t, dir, "convert", "-p", "-O", "raw", "plain.qcow2", out)
	if r.code != 0 {
		t.Fatalf("convert -p: exit %d: %s", r.code, r.stderr)
	}
	if !strings.Contains(r.stderr, "100%") {
		t.Errorf("convert -p: no progress bar on stderr: %q", r.stderr)
	}
	fi, err := os.Stat(out)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Size() != 8<<20 {
		t.Errorf("output size %d, want %d", fi.Size(), 8<<20)
	}
	// plain.qcow2 holds 192k+64k+512 bytes of non-zero data (the 64k of
	// zeros written at 6M must stay a hole); allow file system rounding.
	if a := allocated(t, out); a > 512<<10 {
		t.Errorf("output allocates %d bytes, want <= 512 KiB (sparse)", a)
	}
	ref := filepath.Join(tmp, "ref.raw")
	qemuImg(t, dir, "convert", "-O", "raw", "plain.qcow2", ref)
	compareFiles(t, out, ref)
}

// TestSnapshotFlag: convert and map read an internal snapshot with
// --snapshot ID|NAME, as qemu-img does with -l snapshot.id=/snapshot.name=.
func TestSnapshotFlag(t *testing.T) {
	dir, _ := sharedImages(t)
	for _, sel := range []struct{ flag, qemu string }{{"1", "snapshot.id=1"}, {"first", "snapshot.name=first"}} {
		got := filepath.Join(t.TempDir(), "snap.raw")
		mustRun(t, dir, "convert", "--snapshot", sel.flag, "-O", "raw", "snap.qcow2", got)
		want := filepath.Join(t.TempDir(), "want.raw")
		qemuImg(t, dir, "convert", "-l", sel.qemu, "-O", "raw", "snap.qcow2", want)
		g, err := os.ReadFile(got)
		if err != nil {
			t.Fatal(err)
		}
		w, err := os.ReadFile(want)
		if err != nil {
			t.Fatal(err)
		}
		if d := qemutest.FirstDiff(g, w); d >= 0 {
			t.Errorf("--snapshot %s: differs from qemu-img at offset %d", sel.flag, d)
		}
		if g[0] != 0xcc {
			t.Errorf("--snapshot %s: first byte %#x, want the snapshot's 0xcc", sel.flag, g[0])
		}
		if out := mustRun(t, dir, "map", "--output=json", "--snapshot", sel.flag, "snap.qcow2"); !strings.Contains(out, `"data": true`) {
			t.Errorf("map --snapshot %s: no data extent:\n%s", sel.flag, out)
		}
	}
	args := []string{"convert", "--snapshot", "nope", "-O", "raw", "snap.qcow2", filepath.Join(t.TempDir(), "x.raw")}
	checkFailure(t, imgloop(t, dir, args...), args)
}
