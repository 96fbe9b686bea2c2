package raw

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/disk/disktest"
	"github.com/imgloop/imgloop/disk/hostfile"
	"github.com/imgloop/imgloop/disk/hostfile/hostfiletest"
)

// plainFile hides the optional methods of a file (no hole punching, no
// zero range, no SEEK_DATA), as a host file system without them would.
type plainFile struct{ hostfiletest.File }

// randomBytes returns n seeded pseudo-random bytes.
func randomBytes(seed uint64, n int64) []byte {
	var key [32]byte
	binary.LittleEndian.PutUint64(key[:], seed)
	b := make([]byte, n)
	rand.NewChaCha8(key).Read(b)
	return b
}

// sparseContent returns the content of a sparse file of size bytes with
// data only in a few places, and writes it to path as a sparse file.
func makeSparse(t testing.TB, path string, size int64) []byte {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	content := make([]byte, size)
	for i, off := range []int64{0, 70 << 10, 1<<20 + 3, size / 2, size - 5000} {
		if off < 0 || off >= size {
			continue
		}
		n := min(int64(3000+i*5000), size-off)
		data := randomBytes(uint64(i), n)
		if _, err := f.WriteAt(data, off); err != nil {
			t.Fatal(err)
		}
		copy(content[off:], data)
	}
	return content
}

func makeDense(t testing.TB, path string, size int64) []byte {
	t.Helper()
	content := randomBytes(uint64(size), size)
	if err := os.WriteFile(path, content, 0o644); err != nil {
		t.Fatal(err)
	}
	return content
}

// openPath opens path as a raw image.
func openPath(t testing.TB, path string, opts disk.OpenOptions) *Image {
	t.Helper()
	f, err := hostfile.Open(path, opts.ReadOnly)
	if err != nil {
		t.Fatal(err)
	}
	img, err := Open(f, opts)
	if err != nil {
		f.Close()
		t.Fatal(err)
	}
	return img
}

func TestConformance(t *testing.T) {
	cases := []struct {
		name   string
		size   int64
		sparse bool
	}{
		{"empty", 0, false},
		{"one byte", 1, false},
		{"1000 bytes", 1000, false},
		{"3 sectors", 3 * 512, false},
		{"1MiB+123 dense", 1<<20 + 123, false},
		{"5MiB+7 sparse", 5<<20 + 7, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			for _, ro := range []bool{false, true} {
				name := "rw"
				if ro {
					name = "ro"
				}
				t.Run(name, func(t *testing.T) {
					var model []byte
					open := func(t *testing.T) disk.Image {
						path := filepath.Join(t.TempDir(), "disk.raw")
						if c.sparse {
							model = makeSparse(t, path, c.size)
						} else {
							model = makeDense(t, path, c.size)
						}
						return openPath(t, path, disk.OpenOptions{ReadOnly: ro})
					}
					// Build the model once up front for Options.
					path := filepath.Join(t.TempDir(), "probe.raw")
					if c.sparse {
						model = makeSparse(t, path, c.size)
					} else {
						model = makeDense(t, path, c.size)
					}
					disktest.Run(t, open, disktest.Options{ReadOnly: ro, Model: model})
				})
			}
		})
	}
}

func TestConformanceHostFiles(t *testing.T) {
	const size = 2<<20 + 600
	content := randomBytes(9, size)
	files := map[string]func(t *testing.T) disk.File{
		"memfile": func(t *testing.T) disk.File { return hostfiletest.NewMemFile("mem.raw", content) },
		"plain": func(t *testing.T) disk.File {
			return plainFile{hostfiletest.NewMemFile("plain.raw", content)}
		},
		"faulty without holes": func(t *testing.T) disk.File {
			return hostfiletest.NewFaulty(plainFile{hostfiletest.NewMemFile("faulty.raw", content)})
		},
	}
	for name, mk := range files {
		t.Run(name, func(t *testing.T) {
			disktest.Run(t, func(t *testing.T) disk.Image {
				// Probed: the guard runs on every first-sector write and
				// must let ordinary data through.
				img, err := Open(mk(t), disk.OpenOptions{Probed: true})
				if err != nil {
					t.Fatal(err)
				}
				return img
			}, disktest.Options{Model: content})
		})
	}
}

func TestRandomOps(t *testing.T) {
	const size = 4<<20 + 1000
	for seed := uint64(1); seed <= 2; seed++ {
		t.Run("os", func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "disk.raw")
			content := makeSparse(t, path, size)
			img := openPath(t, path, disk.OpenOptions{})
			defer img.Close()
			disktest.RandomOps(t, seed, img, disktest.NewModelFrom(content), 300)
		})
		t.Run("memfile", func(t *testing.T) {
			content := randomBytes(seed, size)
			img, err := Open(hostfiletest.NewMemFile("m", content), disk.OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			disktest.RandomOps(t, seed, img, disktest.NewModelFrom(content), 300)
		})
	}
}

func TestOpenThroughRegistry(t *testing.T) {
	path := filepath.Join(t.TempDir(), "disk.raw")
	content := makeDense(t, path, 64<<10)
	img, err := disk.Open(path, disk.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	r, ok := img.(*Image)
	if !ok {
		t.Fatalf("Open picked %T, want *raw.Image", img)
	}
	if !r.probed {
		t.Error("a probed open did not set Probed")
	}
	if info := r.Info(); info.Format != "raw" || info.VirtualSize != int64(len(content)) {
		t.Errorf("Info() = %+v", info)
	}
	got := make([]byte, len(content))
	if _, err := img.ReadAt(got, 0); err != nil || !bytes.Equal(got, content) {
		t.Fatalf("ReadAt: %v, equal %v", err, bytes.Equal(got, content))
	}
}

func TestReadShrunkFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "disk.raw")
	makeDense(t, path, 8192)
	img := openPath(t, path, disk.OpenOptions{})
	defer img.Close()
	if err := os.Truncate(path, 5000); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4096)
	n, err := img.ReadAt(buf, 4096)
	if !errors.Is(err, io.ErrUnexpectedEOF) || n != 5000-4096 {
		t.Fatalf("ReadAt past the shrunk end = %d, %v; want %d, ErrUnexpectedEOF", n, err, 5000-4096)
	}
	if _, err := img.ReadAt(buf, 0); err != nil {
		t.Fatalf("ReadAt before the new end: %v", err)
	}
	// Map past the new end reports zeros rather than failing.
	if _, err := img.Map(6000, 2000); err != nil {
		t.Fatalf("Map past the shrunk end: %v", err)
	}
}

func TestCloseFlushes(t *testing.T) {
	mem := hostfiletest.NewMemFile("m", make([]byte, 4096))
	img, err := Open(mem, disk.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := img.WriteAt([]byte("hello"), 100); err != nil {
		t.Fatal(err)
	}
	if got := mem.Crash().Bytes()[100:105]; bytes.Equal(got, []byte("hello")) {
		t.Fatal("write durable before any flush")
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if got := mem.Crash().Bytes()[100:105]; !bytes.Equal(got, []byte("hello")) {
		t.Fatalf("after Close the durable content is %q, want hello", got)
	}
}

func TestFlushErrors(t *testing.T) {
	mem := hostfiletest.NewMemFile("m", make([]byte, 4096))
	f := hostfiletest.NewFaulty(mem)
	f.FailAfter(hostfiletest.OpSync, 0, nil)
	img, err := Open(f, disk.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := img.Flush(); !errors.Is(err, hostfiletest.ErrInjected) {
		t.Fatalf("Flush = %v, want the injected error", err)
	}
	if err := img.Close(); !errors.Is(err, hostfiletest.ErrInjected) {
		t.Fatalf("Close = %v, want the injected error", err)
	}
	if _, err := mem.Size(); !errors.Is(err, os.ErrClosed) {
		t.Fatalf("the host file is still open after a failed Close: %v", err)
	}
}

func TestWriteErrorsSweep(t *testing.T) {
	// Fail each write in turn: the error reaches the caller, wrapped.
	for i := int64(0); ; i++ {
		// Without ZeroRange, WriteZeroes writes zeros in 256 KiB chunks.
		f := hostfiletest.NewFaulty(plainFile{hostfiletest.NewMemFile("m", make([]byte, 1<<20))})
		f.FailNth(hostfiletest.OpWrite, i, nil)
		img, err := Open(f, disk.OpenOptions{})
		if err != nil {
			t.Fatal(err)
		}
		var failed bool
		for j := int64(0); j < 4; j++ {
			if _, err := img.WriteAt([]byte{1, 2, 3}, j*1000); err != nil {
				if !errors.Is(err, hostfiletest.ErrInjected) || j != i {
					t.Fatalf("write %d with write %d failing: %v", j, i, err)
				}
				failed = true
			}
		}
		if err := img.WriteZeroes(5000, 300<<10, disk.ZeroNoUnmap); err != nil {
			if !errors.Is(err, hostfiletest.ErrInjected) {
				t.Fatalf("WriteZeroes with write %d failing: %v", i, err)
			}
			failed = true
		}
		img.Close()
		if !failed {
			if i < 6 {
				t.Fatalf("no operation failed with write %d failing", i)
			}
			break
		}
	}
}

func TestDiscardNotSupported(t *testing.T) {
	img, err := Open(plainFile{hostfiletest.NewMemFile("p", make([]byte, 8192))}, disk.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if err := img.Discard(0, 4096); !errors.Is(err, disk.ErrNotSupported) {
		t.Fatalf("Discard on a file without holes = %v, want ErrNotSupported", err)
	}
	// Faulty reports the missing method as errors.ErrUnsupported, as the OS would.
	img2, err := Open(hostfiletest.NewFaulty(plainFile{hostfiletest.NewMemFile("p", make([]byte, 8192))}), disk.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer img2.Close()
	if err := img2.Discard(0, 4096); !errors.Is(err, disk.ErrNotSupported) {
		t.Fatalf("Discard when punching is unsupported = %v, want ErrNotSupported", err)
	}
	if err := img2.WriteZeroes(0, 4096, 0); err != nil {
		t.Fatalf("WriteZeroes must fall back to writing zeros: %v", err)
	}
}
