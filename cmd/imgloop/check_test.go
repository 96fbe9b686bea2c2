package main

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/imgloop/imgloop/internal/qemutest"
)

// qemuImgCheck runs qemu-img check with args and returns its stdout,
// stderr and exit status.
func qemuImgCheck(t *testing.T, dir string, args ...string) result {
	t.Helper()
	cmd := exec.Command("qemu-img", append([]string{"check"}, args...)...)
	cmd.Dir = dir
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	r := result{stdout: stdout.String(), stderr: stderr.String()}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		r.code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("qemu-img check: %v", err)
	}
	return r
}

// patchRefcount16 sets the 16-bit refcount of host cluster k (64 KiB
// clusters, first refcount block) of the image at path.
func patchRefcount16(t *testing.T, path string, k int, v uint16) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	rt := binary.BigEndian.Uint64(b[48:])
	rb := binary.BigEndian.Uint64(b[rt:])
	binary.BigEndian.PutUint16(b[rb+uint64(2*k):], v)
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestCheckCommand(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	mk := func(name string, cmds ...string) string {
		p := filepath.Join(dir, name)
		qemutest.Create(t, p, "qcow2", "", "4M")
		if len(cmds) > 0 {
			qemutest.IO(t, p, "qcow2", cmds...)
		}
		return name
	}
	clean := mk("clean.qcow2", "write -P 1 0 128k", "write -P 2 1M 64k")
	empty := mk("empty.qcow2")
	leaky := mk("leaky.qcow2", "write -P 1 0 128k")
	patchRefcount16(t, filepath.Join(dir, leaky), 1, 2) // the refcount table: a leak only
	corrupt := mk("corrupt.qcow2", "write -P 1 0 128k")
	patchRefcount16(t, filepath.Join(dir, corrupt), 1, 2)
	patchRefcount16(t, filepath.Join(dir, corrupt), 5, 0) // a data cluster
	raw := "disk.raw"
	if err := os.WriteFile(filepath.Join(dir, raw), make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}

	for _, img := range []string{clean, empty, leaky, corrupt, raw} {
		for _, args := range [][]string{{img}, {"--output=json", img}} {
			t.Run(strings.Join(args, " "), func(t *testing.T) { compareCheck(t, dir, args...) })
		}
	}

	t.Run("repair", func(t *testing.T) {
		for _, args := range [][]string{{"-r", "leaks"}, {"-r", "leaks", "--output=json"}, {"-r", "all"}, {"-r", "all", "--output=json"}} {
			for _, img := range []string{leaky, corrupt, clean} {
				compareRepair(t, dir, args, img)
			}
		}
		// -r all rebuilt the refcount structures of corrupt: the image
		// is clean now, for qemu-img too.
		if r := qemuImgCheck(t, dir, "r-"+corrupt); r.code != 0 {
			t.Errorf("qemu-img check after our -r all of %s: exit %d\n%s%s", corrupt, r.code, r.stdout, r.stderr)
		}
		for _, v := range []string{"bogus"} {
			args := []string{"check", "-r", v, leaky}
			r := imgloop(t, dir, args...)
			checkFailure(t, r, args)
			if r.code != 1 {
				t.Errorf("-r %s: exit %d, want 1", v, r.code)
			}
		}
	})
	t.Run("errors", func(t *testing.T) {
		// (Images with damaged headers that qemu-img check still checks:
		// TestCheckHeaderDamage.)
		for _, args := range [][]string{
			{"check", "missing.qcow2"},
			{"check", "-f", "nosuch", clean},
			{"check", "--output=xml", clean},
			{"check", "-f", "qcow2", raw},
		} {
			r := imgloop(t, dir, args...)
			checkFailure(t, r, args)
			if r.code != 1 {
				t.Errorf("%v: exit %d, want 1", args, r.code)
			}
		}
		// -f raw: raw has no check.
		r := imgloop(t, dir, "check", "-f", "raw", clean)
		if r.code != 63 || !strings.Contains(r.stderr, "does not support checks") {
			t.Errorf("check -f raw: exit %d, stderr %q; want 63", r.code, r.stderr)
		}
	})
}

// TestCheckLocking: while a QEMU process writes to an image, check refuses
// it (as qemu-img check does) unless -U is given, and check -r always
// refuses it.
func TestCheckLocking(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	p := filepath.Join(dir, "busy.qcow2")
	qemutest.Create(t, p, "qcow2", "", "4M")
	qemutest.IO(t, p, "qcow2", "write -P 1 0 64k")
	// qemu-io holds the image open for writing until its stdin closes.
	// Wait until it holds its locks (qemu-img check then fails); start it
	// again should it exit first (seen on loaded machines).
	locked := false
	for try := 0; try < 3 && !locked; try++ {
		cmd := exec.Command("qemu-io", "-f", "qcow2", p)
		stdin, err := cmd.StdinPipe()
		if err != nil {
			t.Fatal(err)
		}
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		exited := make(chan struct{})
		go func() {
			cmd.Wait()
			close(exited)
		}()
		t.Cleanup(func() {
			stdin.Close()
			<-exited
		})
		for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); {
			if r := qemuImgCheck(t, dir, "busy.qcow2"); r.code == 1 {
				locked = true
				break
			}
			select {
			case <-exited:
				t.Logf("qemu-io exited early: %s", out.String())
				deadline = time.Time{}
			case <-time.After(20 * time.Millisecond):
			}
		}
	}
	if !locked {
		t.Fatal("qemu-io never locked the image")
	}
	for _, args := range [][]string{{"check", "busy.qcow2"}, {"check", "-r", "leaks", "busy.qcow2"}, {"check", "-r", "all", "-U", "busy.qcow2"}} {
		r := imgloop(t, dir, args...)
		checkFailure(t, r, args)
		if !strings.Contains(r.stderr, "lock") {
			t.Errorf("%v: stderr %q, want a lock error", args, r.stderr)
		}
	}
	if r := imgloop(t, dir, "check", "-U", "busy.qcow2"); r.code != 0 {
		t.Errorf("check -U: exit %d, stderr %q", r.code, r.stderr)
	}
}

// compareCheck runs qemu-img check and imgloop check with args in dir
// and compares their exit status, their report (the JSON key by key, or
// the text), and that every finding qemu-img lists on stderr we list
// too.
func compareCheck(t *testing.T, dir string, args ...string) {
	t.Helper()
	want := qemuImgCheck(t, dir, args...)
	got := imgloop(t, dir, append([]string{"check"}, args...)...)
	if got.code != want.code {
		t.Errorf("check %v: exit %d, qemu-img %d (stderr %q)", args, got.code, want.code, got.stderr)
	}
	if slices.Contains(args, "--output=json") && want.stdout != "" {
		var g, w map[string]any
		if err := json.Unmarshal([]byte(got.stdout), &g); err != nil {
			t.Fatalf("check %v: our JSON: %v\n%s", args, err, got.stdout)
		}
		if err := json.Unmarshal([]byte(want.stdout), &w); err != nil {
			t.Fatal(err)
		}
		if len(g) != len(w) {
			t.Errorf("check %v: keys: ours %v, qemu-img %v", args, g, w)
		}
		for k, v := range w {
			if g[k] != v {
				t.Errorf("check %v: %s = %v, qemu-img %v", args, k, g[k], v)
			}
		}
	} else if got.stdout != want.stdout {
		t.Errorf("check %v: stdout:\n%s\nqemu-img:\n%s", args, got.stdout, want.stdout)
	}
	// Each finding line qemu-img prints, we print too.
	for _, line := range strings.Split(strings.TrimSpace(want.stderr), "\n") {
		line = strings.TrimPrefix(line, "qemu-img: ")
		if line != "" && !strings.Contains(got.stderr, line) {
			t.Errorf("check %v: stderr lacks %q:\n%s", args, line, got.stderr)
		}
	}
}

// compareRepair runs check with args (a repair: -r leaks or -r all) on
// two copies of the image img in dir, one for qemu-img and one for us,
// and compares the exit status, the human report and the repaired files.
func compareRepair(t *testing.T, dir string, args []string, img string) {
	t.Helper()
	ours, theirs := "r-"+img, "q-"+img
	b, err := os.ReadFile(filepath.Join(dir, img))
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{ours, theirs} {
		if err := os.WriteFile(filepath.Join(dir, p), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want := qemuImgCheck(t, dir, append(args, theirs)...)
	got := imgloop(t, dir, append(append([]string{"check"}, args...), ours)...)
	if got.code != want.code {
		t.Errorf("%v %s: exit %d, qemu-img %d (stderr %q)", args, img, got.code, want.code, got.stderr)
	}
	if got.stdout != strings.ReplaceAll(want.stdout, theirs, ours) && len(args) == 2 {
		t.Errorf("%v %s: stdout\n%s\nqemu-img:\n%s", args, img, got.stdout, want.stdout)
	}
	if d := firstFileDiff(t, filepath.Join(dir, ours), filepath.Join(dir, theirs)); d >= 0 {
		t.Errorf("%v %s: our repaired file differs from qemu-img's at %#x", args, img, d)
	}
}

// firstFileDiff returns the first offset where the files at a and b
// differ (the shorter one's end if one is a prefix), or -1 if they are
// equal. It reads only their data extents (SEEK_DATA/SEEK_HOLE): a
// repair can leave a sparse file of gigabytes (qemu-img check -r all
// grows an image whose refcount table lies over its header to 4 GiB).
func firstFileDiff(t *testing.T, a, b string) int64 {
	t.Helper()
	var files [2]*os.File
	var sizes [2]int64
	for i, p := range []string{a, b} {
		f, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		fi, err := f.Stat()
		if err != nil {
			t.Fatal(err)
		}
		files[i], sizes[i] = f, fi.Size()
	}
	size := min(sizes[0], sizes[1])
	// nextData returns where the next data extent of either file at or
	// after off starts and where the first of them that starts there
	// ends; (size, size) when none is left.
	nextData := func(off int64) (int64, int64) {
		start, end := size, size
		for _, f := range files {
			d, err := unix.Seek(int(f.Fd()), off, unix.SEEK_DATA)
			if err != nil || d >= size { // ENXIO: no data past off
				continue
			}
			h, err := unix.Seek(int(f.Fd()), d, unix.SEEK_HOLE)
			if err != nil {
				t.Fatal(err)
			}
			if d < start {
				start, end = d, min(h, size)
			} else if d == start {
				end = max(end, min(h, size))
			}
		}
		return start, end
	}
	bufs := [2][]byte{make([]byte, 1<<20), make([]byte, 1<<20)}
	for off := int64(0); off < size; {
		start, end := nextData(off)
		for p := start; p < end; {
			n := min(end-p, 1<<20)
			for i, f := range files {
				if _, err := f.ReadAt(bufs[i][:n], p); err != nil {
					t.Fatal(err)
				}
			}
			if d := qemutest.FirstDiff(bufs[0][:n], bufs[1][:n]); d >= 0 {
				return p + d
			}
			p += n
		}
		off = end
	}
	if sizes[0] != sizes[1] {
		return size
	}
	return -1
}
