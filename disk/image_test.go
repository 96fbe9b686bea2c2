package disk_test

import (
	"errors"
	"slices"
	"testing"

	"github.com/imgloop/imgloop/disk"
)

// bareImage implements only disk.Image.
type bareImage struct{ size int64 }

func (b bareImage) ReadAt(p []byte, off int64) (int, error)  { clear(p); return len(p), nil }
func (b bareImage) WriteAt(p []byte, off int64) (int, error) { return len(p), nil }
func (b bareImage) Size() int64                              { return b.size }
func (b bareImage) SectorSize() int                          { return 512 }
func (b bareImage) Flush() error                             { return nil }
func (b bareImage) Close() error                             { return nil }

// mappedImage serves Map from a fixed list of extents, cut to requests.
type mappedImage struct {
	bareImage
	extents []disk.Extent
	broken  bool // return extents that do not start at the request
}

func (m mappedImage) Map(off, n int64) (disk.Extent, error) {
	if err := disk.CheckRange(off, n, m.size); err != nil {
		return disk.Extent{}, err
	}
	for _, e := range m.extents {
		if off >= e.Offset && off < e.Offset+e.Length {
			d := off - e.Offset
			e.Offset, e.Length = off, min(e.Length-d, n)
			if e.HostOffset >= 0 {
				e.HostOffset += d
			}
			if m.broken {
				e.Offset++
			}
			return e, nil
		}
	}
	return disk.Extent{}, errors.New("no extent")
}

func TestHelpersWithoutCapabilities(t *testing.T) {
	img := bareImage{size: 4096}
	if err := disk.Discard(img, 0, 512); !errors.Is(err, disk.ErrNotSupported) {
		t.Errorf("Discard = %v, want ErrNotSupported", err)
	}
	if err := disk.WriteZeroes(img, 0, 512, 0); !errors.Is(err, disk.ErrNotSupported) {
		t.Errorf("WriteZeroes = %v, want ErrNotSupported", err)
	}
	// Asked to be fast, a missing ZeroWriter is "slow", not "not
	// supported" (a caller falls back to writing zeros on the latter).
	if err := disk.WriteZeroes(img, 0, 512, disk.ZeroFast); !errors.Is(err, disk.ErrSlowZero) || errors.Is(err, disk.ErrNotSupported) {
		t.Errorf("WriteZeroes(ZeroFast) = %v, want ErrSlowZero only", err)
	}
	if err := disk.Resize(img, 8192); !errors.Is(err, disk.ErrNotSupported) {
		t.Errorf("Resize = %v, want ErrNotSupported", err)
	}
	e, err := disk.Map(img, 512, 1024)
	want := disk.Extent{Offset: 512, Length: 1024, Status: disk.StatusData | disk.StatusAllocated, HostOffset: -1}
	if err != nil || e != want {
		t.Errorf("Map = %+v, %v; want %+v", e, err, want)
	}
	if _, err := disk.Map(img, 4000, 100); !errors.Is(err, disk.ErrOutOfRange) {
		t.Errorf("Map past the end = %v, want ErrOutOfRange", err)
	}
}

func TestExtents(t *testing.T) {
	data := disk.StatusData | disk.StatusAllocated
	zero := disk.StatusZero | disk.StatusAllocated
	img := mappedImage{bareImage: bareImage{size: 10000}, extents: []disk.Extent{
		{Offset: 0, Length: 1000, Status: data, HostOffset: 5000, HostFile: "f"},
		{Offset: 1000, Length: 1000, Status: data, HostOffset: 6000, HostFile: "f"}, // contiguous: merged
		{Offset: 2000, Length: 1000, Status: data, HostOffset: 9000, HostFile: "f"}, // jump: not merged
		{Offset: 3000, Length: 500, Status: zero, HostOffset: -1},
		{Offset: 3500, Length: 500, Status: zero, HostOffset: -1}, // both without host offset: merged
		{Offset: 4000, Length: 1000, Status: zero, HostOffset: -1, Depth: 1},
		{Offset: 5000, Length: 5000, Status: 0, HostOffset: -1, Depth: 2},
	}}
	var got []disk.Extent
	collect := func(e disk.Extent) error { got = append(got, e); return nil }
	if err := disk.Extents(img, 0, 10000, collect); err != nil {
		t.Fatal(err)
	}
	want := []disk.Extent{
		{Offset: 0, Length: 2000, Status: data, HostOffset: 5000, HostFile: "f"},
		{Offset: 2000, Length: 1000, Status: data, HostOffset: 9000, HostFile: "f"},
		{Offset: 3000, Length: 1000, Status: zero, HostOffset: -1},
		{Offset: 4000, Length: 1000, Status: zero, HostOffset: -1, Depth: 1},
		{Offset: 5000, Length: 5000, Status: 0, HostOffset: -1, Depth: 2},
	}
	if !slices.Equal(got, want) {
		t.Fatalf("Extents =\n%+v\nwant\n%+v", got, want)
	}
	// A sub-range starts and ends mid-extent.
	got = nil
	if err := disk.Extents(img, 500, 3000, collect); err != nil {
		t.Fatal(err)
	}
	want = []disk.Extent{
		{Offset: 500, Length: 1500, Status: data, HostOffset: 5500, HostFile: "f"},
		{Offset: 2000, Length: 1000, Status: data, HostOffset: 9000, HostFile: "f"},
		{Offset: 3000, Length: 500, Status: zero, HostOffset: -1},
	}
	if !slices.Equal(got, want) {
		t.Fatalf("Extents(500, 3000) =\n%+v\nwant\n%+v", got, want)
	}
	// fn's error stops the walk.
	stop := errors.New("stop")
	calls := 0
	err := disk.Extents(img, 0, 10000, func(disk.Extent) error { calls++; return stop })
	if !errors.Is(err, stop) || calls != 1 {
		t.Fatalf("Extents with a failing fn = %v after %d calls", err, calls)
	}
	// A driver returning a misplaced extent is an error, not a loop.
	img.broken = true
	if err := disk.Extents(img, 0, 10000, collect); err == nil {
		t.Fatal("Extents accepted an extent that does not start at the request")
	}
	// Map's errors pass through.
	if err := disk.Extents(mappedImage{bareImage: bareImage{size: 100}}, 0, 100, collect); err == nil {
		t.Fatal("Extents hid Map's error")
	}
}
