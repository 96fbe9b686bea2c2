package main

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/internal/qemutest"
)

// Image locking against real QEMU processes. The lock bytes each holder
// shows are QEMU 7.2's (/proc/locks): 100+bit for each permission held,
// 200+bit for each one not shared.

// qemuExit runs qemu-img with args in dir and returns its exit status.
func qemuExit(t *testing.T, dir string, args ...string) (int, string) {
	t.Helper()
	cmd := exec.Command("qemu-img", args...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.ExitCode(), string(out)
	} else if err != nil {
		t.Fatal(err)
	}
	return 0, string(out)
}

// checkLockFailure fails t unless r is imgloop's failure to lock file: exit
// 1 and one line naming the file and the conflict, as QEMU words it.
func checkLockFailure(t *testing.T, r result, args []string, file string) {
	t.Helper()
	if r.code != 1 || strings.Count(r.stderr, "\n") != 1 || !strings.HasPrefix(r.stderr, "imgloop: ") ||
		!strings.Contains(r.stderr, " "+file+": Failed to get ") ||
		!strings.HasSuffix(r.stderr, " lock: is another process using the image?\n") {
		t.Errorf("imgloop %v: exit %d, stderr %q; want 1 and one line about the lock on %s", args, r.code, r.stderr, file)
	}
}

// TestLockQEMUHolder: while qemu-nbd or qemu-io holds an image, disk.Open
// read-write fails with ErrLocked, and each imgloop command fails to lock
// it exactly when qemu-img fails with the same arguments (-U included;
// create takes a creator's locks before it truncates, as qemu-img create
// does, so the image is left as it is).
func TestLockQEMUHolder(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io", "qemu-nbd")
	for _, tc := range []struct {
		name   string
		format string
		tool   string
		args   []string // before the image path; SOCK is the socket
		locks  []int64
	}{
		{"qemu-nbd rw qcow2", "qcow2", "qemu-nbd", []string{"-f", "qcow2", "-k", "SOCK"}, []int64{100, 101, 103, 201, 203}},
		{"qemu-nbd -r qcow2", "qcow2", "qemu-nbd", []string{"-r", "-f", "qcow2", "-k", "SOCK"}, []int64{100, 201, 203}},
		{"qemu-io rw qcow2", "qcow2", "qemu-io", []string{"-f", "qcow2"}, []int64{100, 101, 103, 201, 203}},
		{"qemu-nbd rw raw", "raw", "qemu-nbd", []string{"-f", "raw", "-k", "SOCK"}, []int64{100, 101, 203}},
		{"qemu-nbd -r raw", "raw", "qemu-nbd", []string{"-r", "-f", "raw", "-k", "SOCK"}, []int64{100, 203}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			img := "busy." + tc.format
			path := filepath.Join(dir, img)
			qemutest.Create(t, path, tc.format, "", "4M")
			qemutest.IO(t, path, tc.format, "write -P 1 0 64k")
			var args []string
			for _, a := range tc.args {
				args = append(args, strings.ReplaceAll(a, "SOCK", filepath.Join(dir, "nbd.sock")))
			}
			qemutest.Hold(t, path, tc.locks, tc.tool, append(args, path)...)
			before, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}

			_, err = disk.Open(path, disk.OpenOptions{})
			var le *disk.LockError
			if !errors.Is(err, disk.ErrLocked) || !errors.As(err, &le) || le.Path != path {
				t.Errorf("disk.Open read-write: %v; want a *disk.LockError on %s", err, path)
			}

			for _, args := range [][]string{
				{"info", img}, {"info", "-U", img},
				{"map", img}, {"map", "-U", img},
				{"check", img}, {"check", "-U", img},
				{"convert", img, "out.raw"}, {"convert", "-U", img, "out.raw"},
				{"resize", img, "8M"},
				// Last: a create that got its locks would replace the image.
				{"create", "-q", "-f", tc.format, img, "1M"},
			} {
				want, qout := qemuExit(t, dir, args...)
				os.Remove(filepath.Join(dir, "out.raw"))
				r := imgloop(t, dir, args...)
				os.Remove(filepath.Join(dir, "out.raw"))
				if r.code != want {
					t.Errorf("imgloop %v: exit %d (stderr %q), qemu-img: %d (%q)", args, r.code, r.stderr, want, qout)
					continue
				}
				if want == 1 {
					checkLockFailure(t, r, args, img)
				}
			}
			if after, err := os.ReadFile(path); err != nil || !bytes.Equal(before, after) {
				t.Errorf("the image changed while qemu held it (%v)", err)
			}
		})
	}
}

// TestLockImgloopHolder: while imgloop holds an image, QEMU's tools fail to
// take what conflicts (qemu-img info without -U, qemu-io writes) and get
// the rest.
func TestLockImgloopHolder(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	type qemuRun struct {
		args []string // qemu-img or qemu-io arguments, the image last
		ok   bool
	}
	info := func(args ...string) []string { return append([]string{"qemu-img", "info"}, args...) }
	io := func(args ...string) []string { return append([]string{"qemu-io"}, args...) }
	for _, tc := range []struct {
		name   string
		format string
		opts   disk.OpenOptions
		locks  []int64
		runs   []qemuRun
	}{
		{"read-write qcow2", "qcow2", disk.OpenOptions{}, []int64{100, 101, 103, 201, 203}, []qemuRun{
			{info(), false},
			{info("-U"), true},
			{io("-f", "qcow2", "-c", "write 0 512"), false},
			{io("-r", "-f", "qcow2", "-c", "read 0 512"), false},
			{io("-r", "-U", "-f", "qcow2", "-c", "read 0 512"), true},
		}},
		{"read-only qcow2", "qcow2", disk.OpenOptions{ReadOnly: true}, []int64{100, 201, 203}, []qemuRun{
			{info(), true},
			{io("-r", "-f", "qcow2", "-c", "read 0 512"), true},
			{io("-f", "qcow2", "-c", "write 0 512"), false},
		}},
		{"read-write raw", "raw", disk.OpenOptions{}, []int64{100, 101, 103, 201, 203}, []qemuRun{
			{info(), true}, // qemu-img info locks nothing on a raw file
			{io("-f", "raw", "-c", "write 0 512"), false},
			{io("-r", "-f", "raw", "-c", "read 0 512"), true},
		}},
		{"share-write raw", "raw", disk.OpenOptions{ReadOnly: true, ShareWrite: true}, []int64{100}, []qemuRun{
			{io("-f", "raw", "-c", "write 0 512"), true},
		}},
		{"force-share qcow2", "qcow2", disk.OpenOptions{ReadOnly: true, ForceShare: true}, []int64{100}, []qemuRun{
			{info(), true},
			{io("-f", "qcow2", "-c", "write 0 512"), true},
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "held."+tc.format)
			qemutest.Create(t, path, tc.format, "", "1M")
			tc.opts.Format = tc.format
			img, err := disk.Open(path, tc.opts)
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			if got := qemutest.LockedBytes(t, path); !slices.Equal(got, tc.locks) {
				t.Errorf("imgloop holds lock bytes %v, want %v", got, tc.locks)
			}
			for _, run := range tc.runs {
				out, err := qemutest.Try(run.args[0], append(run.args[1:], path)...)
				if ok := err == nil; ok != run.ok {
					t.Errorf("%v: succeeded %t, want %t: %v %s", run.args, ok, run.ok, err, out)
				} else if err != nil && !strings.Contains(err.Error(), "lock") {
					t.Errorf("%v: failed, but not on a lock: %v", run.args, err)
				}
			}
		})
	}
}

// TestLockBackingShared: two overlays of one backing file are written at
// once, by imgloop and by qemu-io; the backing file is shared for reading
// only, and so is an external data file's image while imgloop writes it.
func TestLockBackingShared(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	qemutest.Create(t, base, "qcow2", "", "1M")
	top1, top2 := filepath.Join(dir, "top1.qcow2"), filepath.Join(dir, "top2.qcow2")
	qemutest.Create(t, top1, "qcow2", "", "", "-b", "base.qcow2", "-F", "qcow2")
	qemutest.Create(t, top2, "qcow2", "", "", "-b", "base.qcow2", "-F", "qcow2")
	img, err := disk.Open(top1, disk.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if _, err := img.WriteAt(make([]byte, 512), 0); err != nil {
		t.Fatal(err)
	}
	// The backing file as QEMU opens one: read, writes refused.
	if got, want := qemutest.LockedBytes(t, base), []int64{100, 201, 203}; !slices.Equal(got, want) {
		t.Errorf("backing file lock bytes %v, want %v", got, want)
	}
	if out, err := qemutest.Try("qemu-io", "-f", "qcow2", "-c", "write 0 512", top2); err != nil {
		t.Errorf("qemu-io writing the other overlay: %v %s", err, out)
	}
	if _, err := qemutest.Try("qemu-io", "-f", "qcow2", "-c", "write 0 512", base); err == nil {
		t.Error("qemu-io wrote to the backing file of an image imgloop writes")
	}
	// And the other way round: qemu-io holds top2, imgloop opens top1
	// again (after closing it) and writes.
	img.Close()
	qemutest.Hold(t, top2, []int64{100, 101, 103, 201, 203}, "qemu-io", "-f", "qcow2", top2)
	img2, err := disk.Open(top1, disk.OpenOptions{})
	if err != nil {
		t.Fatalf("imgloop opening an overlay beside qemu-io's: %v", err)
	}
	defer img2.Close()
	if _, err := disk.Open(base, disk.OpenOptions{}); !errors.Is(err, disk.ErrLocked) {
		t.Errorf("disk.Open read-write of the backing file: %v, want ErrLocked", err)
	}

	// An external data file is locked with its image.
	withData := filepath.Join(dir, "data.qcow2")
	qemutest.Create(t, withData, "qcow2", "data_file=data.raw", "1M")
	di, err := disk.Open(withData, disk.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer di.Close()
	if _, err := qemutest.Try("qemu-io", "-f", "raw", "-c", "write 0 512", filepath.Join(dir, "data.raw")); err == nil {
		t.Error("qemu-io wrote to the data file of an image imgloop writes")
	}
}
