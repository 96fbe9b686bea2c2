package main

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/imgloop/imgloop/convert"
	"github.com/imgloop/imgloop/disk"
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
		{"convert", "-O", "qcow2", "-o", "preallocation=metadata", "src.raw", "out.qcow2"},
		{"convert", "-O", "qcow2", "-o", "data_file=data.raw", "src.raw", "out.qcow2"},
		{"convert", "-O", "qcow2", "-o", "data_file_raw=on", "src.raw", "out.qcow2"},
		{"convert", "-O", "qcow2", "-o", "backing_file=src.raw", "src.raw", "out.qcow2"},
		{"convert", "-O", "qcow2", "-B", "src.raw", "src.raw", "out.qcow2"},
		{"convert", "-O", "qcow2", "-F", "raw", "src.raw", "out.qcow2"},
		{"convert", "-O", "qcow2", "-o", "backing_fmt=raw", "src.raw", "out.qcow2"},
		{"convert", "-O", "qcow2", "-B", "nope.raw", "-F", "raw", "src.raw", "out.qcow2"},
		{"convert", "-O", "qcow2", "-B", "src.raw", "-F", "qcow2", "src.raw", "out.qcow2"},
		{"convert", "-O", "qcow2", "-B", "src.raw", "-F", "raw", "-o", "backing_file=other.raw", "src.raw", "out.qcow2"},
		{"convert", "-O", "raw", "-B", "src.raw", "-F", "raw", "src.raw", "out.raw"},
		{"convert", "-O", "qcow2", "-o", "compat=0.10,compression_type=zstd", "src.raw", "out.qcow2"},
		{"convert", "-O", "qcow2", "src.raw", "src.raw"},
	} {
		checkFailure(t, imgloop(t, dir, args...), args)
		if _, err := os.Stat(filepath.Join(dir, "out.qcow2")); err == nil {
			t.Errorf("imgloop %s: failed but left out.qcow2", strings.Join(args, " "))
			os.Remove(filepath.Join(dir, "out.qcow2"))
		}
	}
	// Refused options leave an existing destination alone.
	keep := filepath.Join(dir, "keep.qcow2")
	if err := os.WriteFile(keep, []byte("keep me"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, opt := range []string{"preallocation=full", "cluster_size=3k", "compat=0.10,extended_l2=on"} {
		args := []string{"convert", "-O", "qcow2", "-o", opt, "src.raw", "keep.qcow2"}
		checkFailure(t, imgloop(t, dir, args...), args)
		if b, err := os.ReadFile(keep); err != nil || string(b) != "keep me" {
			t.Errorf("-o %s: the existing destination was changed (%v)", opt, err)
		}
	}
	for _, tc := range []struct{ opt, want string }{
		{"preallocation=full", "preallocation"},
		{"data_file=data.raw", "data_file"},
		{"backing_file=src.raw", "backing format"},
	} {
		r := imgloop(t, dir, "convert", "-O", "qcow2", "-o", tc.opt, "src.raw", "out.qcow2")
		if !strings.Contains(r.stderr, tc.want) {
			t.Errorf("-o %s: error %q does not mention %s", tc.opt, r.stderr, tc.want)
		}
	}
}

// TestConvertQcow2Backing converts the top of a backing chain with -B (and
// its spellings -b and -o backing_file=,backing_fmt=): the output names
// the backing file, reads as the source, is clean, and has the map of
// qemu-img convert -B's output. Converting onto the backing file itself
// is refused and leaves it intact.
func TestConvertQcow2Backing(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	qemutest.Create(t, base, "qcow2", "", "4M")
	qemutest.IO(t, base, "qcow2", "write -P 1 0 3M")
	top := filepath.Join(dir, "top.qcow2")
	qemutest.Create(t, top, "qcow2", "cluster_size=16k", "", "-b", "base.qcow2", "-F", "qcow2")
	qemutest.IO(t, top, "qcow2", "write -P 2 100k 20k", "write -z 1M 256k", "write -P 0 2M 64k", "write -P 3 3900k 100k")
	qemuImg(t, dir, "convert", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", "top.qcow2", "ref.qcow2")
	want := qemutest.Map(t, filepath.Join(dir, "ref.qcow2"))
	for i, args := range [][]string{
		{"-B", "base.qcow2", "-F", "qcow2"},
		{"-b", "base.qcow2", "-F", "qcow2", "-p"},
		{"-o", "backing_file=base.qcow2,backing_fmt=qcow2"},
		{"-B", "base.qcow2", "-o", "backing_fmt=qcow2", "-j", "1"},
	} {
		t.Run(strings.Join(args, " "), func(t *testing.T) {
			out := filepath.Join(dir, "out"+string(rune('a'+i))+".qcow2")
			r := imgloop(t, dir, append(append([]string{"convert", "-O", "qcow2"}, args...), "top.qcow2", out)...)
			if r.code != 0 {
				t.Fatalf("exit %d: %s", r.code, r.stderr)
			}
			check := qemuImg(t, dir, "check", out)
			if !strings.Contains(check, "No errors were found") || strings.Contains(check, "leaked") {
				t.Fatalf("qemu-img check:\n%s", check)
			}
			info := qemutest.Info(t, out)
			if info["backing-filename"] != "base.qcow2" || info["backing-filename-format"] != "qcow2" {
				t.Fatalf("backing file %v, format %v", info["backing-filename"], info["backing-filename-format"])
			}
			qemuImg(t, dir, "compare", "-q", "top.qcow2", out)
			got := qemutest.Map(t, out)
			if len(got) != len(want) {
				t.Fatalf("map:\n got %+v\nwant %+v", got, want)
			}
			for j := range got {
				g, w := got[j], want[j]
				g.Offset, w.Offset = nil, nil
				if g != w {
					t.Fatalf("map entry %d: got %+v, want %+v", j, g, w)
				}
			}
		})
	}
	before, err := os.ReadFile(base)
	if err != nil {
		t.Fatal(err)
	}
	args := []string{"convert", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", "top.qcow2", "base.qcow2"}
	checkFailure(t, imgloop(t, dir, args...), args)
	if after, err := os.ReadFile(base); err != nil || !bytes.Equal(before, after) {
		t.Fatalf("converting onto the backing file changed it (%v)", err)
	}
}

// TestConvertQcow2Cancelled checks that an interrupted conversion removes
// its incomplete output.
func TestConvertQcow2Cancelled(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src.raw")
	if err := os.WriteFile(src, bytes.Repeat([]byte("imgloop "), 1<<18), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	dst := filepath.Join(dir, "out.qcow2")
	err := convertStream(ctx, src, dst, disk.OpenOptions{ReadOnly: true}, convert.Options{}, "qcow2", map[string]string{}, true, true, nil)
	if err == nil || !strings.Contains(err.Error(), "interrupted") {
		t.Fatalf("error %v, want an interruption", err)
	}
	if _, err := os.Stat(dst); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("incomplete output left behind (%v)", err)
	}
}

// TestConvertQcow2Interrupt interrupts a running conversion with SIGINT:
// imgloop must fail with one line and remove the incomplete output.
func TestConvertQcow2Interrupt(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src.raw")
	if err := os.WriteFile(src, qemutest.Compressible(5, 96<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(dir, "out.qcow2")
	cmd := exec.Command(imgloopBin, "convert", "-O", "qcow2", "-c", "-j", "1", src, dst)
	cmd.Env = append(os.Environ(), "GORACE=atexit_sleep_ms=0")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// Wait until the conversion has begun writing.
	for start := time.Now(); time.Since(start) < 10*time.Second; time.Sleep(20 * time.Millisecond) {
		if fi, err := os.Stat(dst); err == nil && fi.Size() > 0 {
			break
		}
	}
	if err := cmd.Process.Signal(os.Interrupt); err != nil {
		t.Fatal(err)
	}
	err := cmd.Wait()
	if err == nil {
		t.Skip("the conversion finished before the interrupt")
	}
	if !strings.Contains(stderr.String(), "interrupted") || strings.Count(stderr.String(), "\n") != 1 {
		t.Errorf("stderr %q, want one line about the interruption", stderr.String())
	}
	if _, err := os.Stat(dst); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("incomplete output left behind (%v)", err)
	}
}
