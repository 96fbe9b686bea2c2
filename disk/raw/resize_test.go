package raw

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/disk/hostfile/hostfiletest"
	"github.com/imgloop/imgloop/internal/qemutest"
)

// TestResize resizes raw images with Resize and with `qemu-img resize`
// and compares the files, then checks that the image reads and writes at
// its new size.
func TestResize(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	cases := []struct {
		name          string
		size, newSize int64
	}{
		{"grow", 1 << 20, 3 << 20},
		{"grow unaligned", 1 << 20, 1<<20 + 1000},
		{"grow from empty", 0, 64 << 10},
		{"shrink", 1 << 20, 100 << 10},
		{"shrink unaligned", 1<<20 + 7, 4097},
		{"shrink to empty", 1 << 20, 0},
		{"same size", 1 << 20, 1 << 20},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "a.raw")
			ref := filepath.Join(dir, "ref.raw")
			data := randomBytes(uint64(c.size), c.size)
			for _, p := range []string{path, ref} {
				if err := os.WriteFile(p, data, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			if c.newSize > 0 {
				qemutest.Img(t, "resize", "-q", "-f", "raw", "--shrink", ref, strconv.FormatInt(c.newSize, 10))
			} else if err := os.Truncate(ref, 0); err != nil { // qemu-img refuses size 0
				t.Fatal(err)
			}
			img := openPath(t, path, disk.OpenOptions{})
			if err := disk.Resize(img, c.newSize); err != nil {
				t.Fatalf("Resize(%d): %v", c.newSize, err)
			}
			if img.Size() != c.newSize {
				t.Errorf("Size() = %d, want %d", img.Size(), c.newSize)
			}
			if c.newSize > 0 {
				end := make([]byte, 1)
				if _, err := img.ReadAt(end, c.newSize-1); err != nil {
					t.Errorf("reading the last byte: %v", err)
				}
				if _, err := img.WriteAt([]byte{0xee}, c.newSize-1); err != nil {
					t.Errorf("writing the last byte: %v", err)
				}
			}
			if _, err := img.ReadAt(make([]byte, 1), c.newSize); !errors.Is(err, disk.ErrOutOfRange) {
				t.Errorf("read past the new end = %v, want disk.ErrOutOfRange", err)
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			got, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			want, err := os.ReadFile(ref)
			if err != nil {
				t.Fatal(err)
			}
			if c.newSize > 0 {
				want[c.newSize-1] = 0xee
			}
			if !bytes.Equal(got, want) {
				t.Errorf("file differs from qemu-img's (%d and %d bytes), first at %d", len(got), len(want), qemutest.FirstDiff(got, want))
			}
		})
	}
}

// TestResizeErrors: read-only and closed images, a negative size, and a
// host file that cannot be truncated.
func TestResizeErrors(t *testing.T) {
	path := filepath.Join(t.TempDir(), "a.raw")
	makeDense(t, path, 4096)
	ro := openPath(t, path, disk.OpenOptions{ReadOnly: true})
	if err := ro.Resize(8192); !errors.Is(err, disk.ErrReadOnly) {
		t.Errorf("Resize of a read-only image = %v, want disk.ErrReadOnly", err)
	}
	ro.Close()

	img := openPath(t, path, disk.OpenOptions{})
	if err := img.Resize(-1); err == nil {
		t.Error("Resize(-1) succeeded")
	}
	img.Close()
	if err := img.Resize(8192); !errors.Is(err, disk.ErrClosed) {
		t.Errorf("Resize after Close = %v, want disk.ErrClosed", err)
	}

	boom := errors.New("boom")
	f := hostfiletest.NewFaulty(hostfiletest.NewMemFile("mem", make([]byte, 4096)))
	f.FailAfter(hostfiletest.OpTruncate, 0, boom)
	img, err := Open(f, disk.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := img.Resize(8192); !errors.Is(err, boom) {
		t.Errorf("Resize with a failing truncate = %v, want %v", err, boom)
	}
	if img.Size() != 4096 {
		t.Errorf("Size() = %d after a failed Resize, want 4096", img.Size())
	}
}
