package raw

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/disk/hostfile"
	"github.com/imgloop/imgloop/disk/hostfile/hostfiletest"
	"github.com/imgloop/imgloop/internal/qemutest"
)

// run is a normalised map entry: [start, end) is data or a hole.
type run struct {
	start, end int64
	data       bool
}

// normalise clips runs to [0, size) and merges neighbours of one kind.
func normalise(in []run, size int64) []run {
	var out []run
	for _, r := range in {
		r.end = min(r.end, size)
		if r.start >= r.end {
			continue
		}
		if n := len(out); n > 0 && out[n-1].data == r.data && out[n-1].end == r.start {
			out[n-1].end = r.end
			continue
		}
		out = append(out, r)
	}
	return out
}

func ourRuns(t *testing.T, img *Image) []run {
	t.Helper()
	var runs []run
	err := disk.Extents(img, 0, img.Size(), func(e disk.Extent) error {
		if e.Status&disk.StatusAllocated == 0 {
			t.Errorf("extent %+v not allocated (qemu reports raw files as present)", e)
		}
		if e.HostOffset != e.Offset || e.HostFile != img.f.Name() || e.Depth != 0 {
			t.Errorf("extent %+v: want HostOffset = Offset, HostFile %q, depth 0", e, img.f.Name())
		}
		data := e.Status&disk.StatusData != 0
		if data == (e.Status&disk.StatusZero != 0) {
			t.Errorf("extent %+v: want exactly one of data and zero", e)
		}
		runs = append(runs, run{e.Offset, e.Offset + e.Length, data})
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return normalise(runs, img.Size())
}

func qemuRuns(t *testing.T, path string, size int64) []run {
	t.Helper()
	var runs []run
	for _, m := range qemutest.Map(t, path, "-f", "raw") {
		if m.Length == 0 {
			continue // qemu-img lists an empty disk as one empty, absent entry
		}
		if !m.Present || m.Depth != 0 || m.Data == m.Zero {
			t.Errorf("qemu-img map entry %+v: expected present, depth 0, one of data/zero", m)
		}
		if m.Offset == nil || *m.Offset != m.Start {
			t.Errorf("qemu-img map entry %+v: offset differs from start", m)
		}
		runs = append(runs, run{m.Start, m.Start + m.Length, m.Data})
	}
	return normalise(runs, size)
}

func TestMapMatchesQemu(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	type write struct{ off, n int64 }
	cases := []struct {
		name   string
		size   int64
		writes []write
		holes  []write // punched through the image after the writes
	}{
		{"empty file", 0, nil, nil},
		{"all hole", 10 << 20, nil, nil},
		{"all data", 1 << 20, []write{{0, 1 << 20}}, nil},
		{"scattered", 10 << 20, []write{{0, 1}, {409600, 40960}, {9000000, 10}, {10<<20 - 1, 1}}, nil},
		{"odd size", 1<<20 + 1000, []write{{5000, 100}, {1<<20 + 900, 100}}, nil},
		{"punched", 4 << 20, []write{{0, 4 << 20}}, []write{{64 << 10, 128 << 10}, {1 << 20, 1 << 20}, {4<<20 - 4096, 4096}}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "disk.raw")
			f, err := os.Create(path)
			if err != nil {
				t.Fatal(err)
			}
			if err := f.Truncate(c.size); err != nil {
				t.Fatal(err)
			}
			for i, w := range c.writes {
				if _, err := f.WriteAt(randomBytes(uint64(i), w.n), w.off); err != nil {
					t.Fatal(err)
				}
			}
			f.Close()
			img := openPath(t, path, disk.OpenOptions{Format: "raw"})
			defer img.Close()
			for _, h := range c.holes {
				if err := img.Discard(h.off, h.n); errors.Is(err, disk.ErrNotSupported) {
					t.Skipf("file system cannot punch holes: %v", err)
				} else if err != nil {
					t.Fatal(err)
				}
			}
			if err := img.Flush(); err != nil {
				t.Fatal(err)
			}
			ours := ourRuns(t, img)
			theirs := qemuRuns(t, path, c.size)
			if !slices.Equal(ours, theirs) {
				t.Fatalf("map differs from qemu-img:\nours   %v\nqemu's %v", ours, theirs)
			}
			if c.name == "scattered" && len(ours) < 7 {
				t.Errorf("file system reported no holes (%v); the test is not testing much", ours)
			}
		})
	}
}

func TestMapMemFileHoles(t *testing.T) {
	mem := hostfiletest.NewMemFile("m.raw", nil)
	if err := mem.Truncate(1 << 20); err != nil {
		t.Fatal(err)
	}
	mem.WriteAt([]byte{1}, 5000)           // block 1
	mem.WriteAt(make([]byte, 8192), 1<<19) // blocks 128, 129
	img, err := Open(mem, disk.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	want := []run{{0, 4096, false}, {4096, 8192, true}, {8192, 1 << 19, false}, {1 << 19, 1<<19 + 8192, true}, {1<<19 + 8192, 1 << 20, false}}
	if got := ourRuns(t, img); !slices.Equal(got, want) {
		t.Fatalf("runs = %v, want %v", got, want)
	}
	// A request inside a run is clipped to it.
	e, err := img.Map(4100, 10)
	if err != nil || e.Offset != 4100 || e.Length != 10 || e.Status != disk.StatusData|disk.StatusAllocated {
		t.Fatalf("Map(4100, 10) = %+v, %v", e, err)
	}
	e, err = img.Map(100, 1<<19)
	if err != nil || e.Length != 4096-100 || e.Status != disk.StatusZero|disk.StatusAllocated {
		t.Fatalf("Map(100, 512K) = %+v, %v", e, err)
	}
	if _, err := img.Map(0, 0); !errors.Is(err, disk.ErrOutOfRange) {
		t.Fatalf("Map(0, 0) = %v, want ErrOutOfRange", err)
	}
}

func TestMapWithoutSeek(t *testing.T) {
	img, err := Open(plainFile{hostfiletest.NewMemFile("p", make([]byte, 10000))}, disk.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	e, err := img.Map(0, 10000)
	if err != nil || e.Length != 10000 || e.Status != disk.StatusData|disk.StatusAllocated {
		t.Fatalf("Map = %+v, %v; want all data", e, err)
	}
}

// dataAt reports whether the host file has data at off (SEEK_DATA).
func dataAt(t *testing.T, f *hostfile.OSFile, off int64) bool {
	t.Helper()
	d, err := f.SeekData(off)
	if err != nil {
		return false
	}
	return d == off
}

func TestZeroingPunchesHoles(t *testing.T) {
	cases := []struct {
		name  string
		do    func(img *Image, off, n int64) error
		holes bool
	}{
		{"Discard", func(img *Image, off, n int64) error { return img.Discard(off, n) }, true},
		{"WriteZeroes", func(img *Image, off, n int64) error { return img.WriteZeroes(off, n, 0) }, true},
		{"WriteZeroes NoUnmap", func(img *Image, off, n int64) error { return img.WriteZeroes(off, n, disk.ZeroNoUnmap) }, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "disk.raw")
			makeDense(t, path, 2<<20)
			img := openPath(t, path, disk.OpenOptions{})
			defer img.Close()
			const off, n = 256 << 10, 512 << 10
			if err := c.do(img, off, n); errors.Is(err, disk.ErrNotSupported) {
				t.Skip(err)
			} else if err != nil {
				t.Fatal(err)
			}
			f := img.f.(*hostfile.OSFile)
			for _, o := range []int64{off, off + 4096, off + n - 4096} {
				if got := dataAt(t, f, o); got == c.holes {
					t.Errorf("data at %d = %v, want %v", o, got, !c.holes)
				}
			}
			for _, o := range []int64{off - 4096, off + n} {
				if !dataAt(t, f, o) {
					t.Errorf("no data at %d, outside the zeroed range", o)
				}
			}
			buf := make([]byte, n)
			if _, err := img.ReadAt(buf, off); err != nil {
				t.Fatal(err)
			}
			for i, b := range buf {
				if b != 0 {
					t.Fatalf("byte %d = %#x after zeroing", off+i, b)
				}
			}
		})
	}
}

func TestInfoMatchesQemu(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	for _, size := range []int64{0, 4096, 1000, 3<<20 + 512} {
		path := filepath.Join(t.TempDir(), "disk.raw")
		if err := os.WriteFile(path, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(path, size); err != nil {
			t.Fatal(err)
		}
		img := openPath(t, path, disk.OpenOptions{ReadOnly: true})
		info := img.Info()
		img.Close()
		q := qemutest.Info(t, path, "-f", "raw")
		// QEMU rounds the size up to whole sectors; imgloop keeps the
		// file's exact length (see the package doc).
		want := (size + 511) / 512 * 512
		if q["format"] != "raw" || int64(q["virtual-size"].(float64)) != want {
			t.Fatalf("qemu-img info = %v; expected format raw, virtual-size %d", q, want)
		}
		if info.Format != "raw" || info.VirtualSize != size {
			t.Fatalf("Info() = %+v, want format raw, virtual size %d", info, size)
		}
	}
}
