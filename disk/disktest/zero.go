package disktest

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/imgloop/imgloop/disk"
)

// The cases for fast zeroing, forced unit access and the discard
// contract.

// dataArea fills the first min(size, n) bytes of img with random data
// without zero bytes (so that nothing reads as zeros by chance) and
// returns its length.
func (s *suite) dataArea(t *testing.T, img disk.Image, n int64, salt uint64) int64 {
	t.Helper()
	n = min(img.Size(), n)
	r := s.rng(t, salt)
	for off := int64(0); off < n; off += 1 << 20 {
		s.freshData(t, img, r, off, min(off+1<<20, n))
	}
	return n
}

// freshData writes random bytes other than zero over [lo, hi) and
// returns them as a window.
func (s *suite) freshData(t testing.TB, img disk.Image, r *rand.Rand, lo, hi int64) window {
	t.Helper()
	b := make([]byte, hi-lo)
	fill(r, b)
	for i, c := range b {
		if c == 0 {
			b[i] = 1
		}
	}
	if m, err := img.WriteAt(b, lo); err != nil || m != len(b) {
		t.Fatalf("WriteAt(%d bytes at %d) = %d, %v", len(b), lo, m, err)
	}
	return window{lo, hi, b}
}

// unitRequests returns requests in [0, area) around units of align
// bytes: aligned, unaligned at either end, smaller than a unit, and
// random ones.
func (s *suite) unitRequests(t *testing.T, area, align int64, salt uint64) [][2]int64 {
	a := align
	reqs := [][2]int64{
		{a, 2 * a}, {0, a}, {a / 2, 3 * a}, {a + 1, a - 2}, {1, 2*a - 2}, {3 * a, 4*a + 7},
		{5*a - 100, a + 200}, {7 * a, 0}, {a - 1, 2}, {0, 1}, {area - 1, 1},
	}
	r := s.rng(t, salt)
	for i := 0; i < 12; i++ {
		off, n := randRange(r, area)
		reqs = append(reqs, [2]int64{off, n})
	}
	var out [][2]int64
	for _, q := range reqs {
		if q[0] >= 0 && q[1] >= 0 && q[0]+q[1] <= area {
			out = append(out, q)
		}
	}
	return out
}

func (s *suite) fastZero(t *testing.T) {
	img := s.image(t)
	size := img.Size()
	if size == 0 {
		t.Skip("empty image")
	}
	c, l := disk.CapabilitiesOf(img), disk.LimitsOf(img)
	za := l.ZeroAlignment
	area := min(size, max(8<<20, 16*za))
	for _, f := range []struct {
		name  string
		flags disk.ZeroFlags
	}{{"ZeroFast", disk.ZeroFast}, {"ZeroFast|ZeroNoUnmap", disk.ZeroFast | disk.ZeroNoUnmap}} {
		flags := f.flags
		t.Run(f.name, func(t *testing.T) {
			fast, slow := 0, 0
			r := s.rng(t, 21)
			for i, q := range s.unitRequests(t, area, za, 20) {
				off, n := q[0], q[1]
				// Fresh data, so that zeroing has something to do.
				margin := min(za, 64<<10) + 1024
				w := s.freshData(t, img, r, max(0, off-margin), min(size, off+n+margin))
				what := fmt.Sprintf("request %d: WriteZeroes(%d, %d, %#x)", i, off, n, flags)
				err := disk.WriteZeroes(img, off, n, flags)
				aligned := off%za == 0 && (n%za == 0 || off+n == size)
				switch {
				case err == nil:
					fast++
					if j := nonZero(readRange(t, img, off, n, 1<<20)); j >= 0 {
						t.Fatalf("%s succeeded, but byte %d is not zero", what, off+int64(j))
					}
					w.unchanged(t, img, what+": before the range", w.lo, off-w.lo)
					w.unchanged(t, img, what+": after the range", off+n, w.hi-off-n)
				case errors.Is(err, disk.ErrSlowZero):
					slow++
					if errors.Is(err, disk.ErrNotSupported) {
						t.Fatalf("%s: %v matches ErrNotSupported too: a caller would fall back to writing zeros", what, err)
					}
					w.unchanged(t, img, what+" failed with ErrSlowZero, and changed the image", w.lo, w.hi-w.lo)
					if c.Zero && aligned && n > 0 && !s.opts.SlowZero {
						t.Fatalf("%s: the image claims Zero and the range is aligned to ZeroAlignment %d, but: %v "+
							"(set Options.SlowZero if the format may refuse)", what, za, err)
					}
				default:
					t.Fatalf("%s: %v, want nil or ErrSlowZero", what, err)
				}
			}
			t.Logf("%d fast, %d refused as slow", fast, slow)
			if !c.Zero && fast > 0 {
				// Allowed (ranges that read as zeros already need no
				// writing), but worth knowing.
				t.Logf("the image does not claim Zero, but zeroed %d requests fast", fast)
			}
		})
	}
}

func (s *suite) fua(t *testing.T) {
	img := s.image(t)
	size := img.Size()
	if size == 0 {
		t.Skip("empty image")
	}
	c := disk.CapabilitiesOf(img)
	f, native := img.(disk.FUAWriter)
	if !c.FUA {
		t.Logf("the image does not claim FUA: WriteAtFlags falls back to WriteAt and Flush")
	}
	r := s.rng(t, 30)
	reqs := [][2]int64{{0, 512}, {1, 4095}, {size - 1, 1}, {size / 2, 64 << 10}}
	for i := 0; i < 8; i++ {
		off, n := randRange(r, size)
		reqs = append(reqs, [2]int64{off, n})
	}
	for i, q := range reqs {
		off, n := max(0, min(q[0], size-1)), q[1]
		n = min(n, size-off)
		data := make([]byte, n)
		fill(r, data)
		w := snapshot(t, img, off, n, 1024)
		copy(w.b[off-w.lo:], data)
		var m int
		var err error
		what := fmt.Sprintf("write %d: WriteAtFlags(%d bytes at %d, WriteFUA)", i, n, off)
		switch {
		case native && i%2 == 1:
			what = fmt.Sprintf("write %d: WriteAtFUA(%d bytes at %d)", i, n, off)
			m, err = f.WriteAtFUA(data, off)
		case i%3 == 2:
			what = fmt.Sprintf("write %d: WriteAtFlags(%d bytes at %d, 0)", i, n, off)
			m, err = disk.WriteAtFlags(img, data, off, 0)
		default:
			m, err = disk.WriteAtFlags(img, data, off, disk.WriteFUA)
		}
		if err != nil || m != int(n) {
			t.Fatalf("%s = %d, %v", what, m, err)
		}
		w.unchanged(t, img, what+": read back", w.lo, w.hi-w.lo)
	}
	// ZeroFUA, directly and through ZeroContext.
	for _, zero := range []struct {
		name string
		do   func(off, n int64) error
	}{
		{"WriteZeroes(ZeroFUA)", func(off, n int64) error { return disk.WriteZeroes(img, off, n, disk.ZeroFUA) }},
		{"WriteZeroes(ZeroFUA|ZeroNoUnmap)", func(off, n int64) error {
			return disk.WriteZeroes(img, off, n, disk.ZeroFUA|disk.ZeroNoUnmap)
		}},
		{"ZeroContext(ZeroFUA)", func(off, n int64) error {
			return disk.ZeroContext(context.Background(), img, off, n, disk.ZeroFUA)
		}},
	} {
		off, n := randRange(r, min(size, 8<<20))
		if n == 0 {
			n = min(size-off, 512)
		}
		w := s.freshData(t, img, r, max(0, off-1024), min(size, off+n+1024))
		err := zero.do(off, n)
		if errors.Is(err, disk.ErrNotSupported) {
			if _, ok := img.(disk.ZeroWriter); !ok {
				t.Logf("%s: %v (no ZeroWriter)", zero.name, err)
				continue
			}
		}
		if err != nil {
			t.Fatalf("%s(%d, %d): %v", zero.name, off, n, err)
		}
		if j := nonZero(readRange(t, img, off, n, 1<<20)); j >= 0 {
			t.Fatalf("%s(%d, %d): byte %d is not zero", zero.name, off, n, off+int64(j))
		}
		w.unchanged(t, img, zero.name+": before the range", w.lo, off-w.lo)
		w.unchanged(t, img, zero.name+": after the range", off+n, w.hi-off-n)
	}
}

// dataExtents returns the StatusData extents of [lo, hi).
func dataExtents(t testing.TB, img disk.Image, lo, hi int64) []disk.Extent {
	t.Helper()
	var list []disk.Extent
	if hi <= lo {
		return nil
	}
	err := disk.Extents(img, lo, hi-lo, func(e disk.Extent) error {
		if e.Status&disk.StatusData != 0 {
			list = append(list, e)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("Extents(%d, %d): %v", lo, hi-lo, err)
	}
	return list
}

// isData reports whether off lies in one of the extents.
func isData(list []disk.Extent, off int64) bool {
	for _, e := range list {
		if off >= e.Offset && off < e.Offset+e.Length {
			return true
		}
	}
	return false
}

// newData returns a byte of after's data extents that is not in
// before's, or -1.
func newData(before, after []disk.Extent) int64 {
	for _, e := range after {
		// Check the extent's start and every boundary of before inside it.
		points := []int64{e.Offset}
		for _, b := range before {
			for _, p := range []int64{b.Offset, b.Offset + b.Length} {
				if p > e.Offset && p < e.Offset+e.Length {
					points = append(points, p)
				}
			}
		}
		for _, p := range points {
			if !isData(before, p) {
				return p
			}
		}
	}
	return -1
}

func (s *suite) discard(t *testing.T) {
	img := s.image(t)
	size := img.Size()
	if size == 0 {
		t.Skip("empty image")
	}
	c, l := disk.CapabilitiesOf(img), disk.LimitsOf(img)
	al := l.DiscardAlignment
	area := min(size, max(8<<20, 16*al))
	// Data in the first half of the area; the second half as opened
	// (holes, zeros or backing data in most images).
	s.dataArea(t, img, area/2, 40)
	if c.Zero {
		// An aligned hole in the data, where the image can make one.
		if off, n := alignedRange(area/2, l.ZeroAlignment); n > 0 {
			if err := disk.WriteZeroes(img, off, n, 0); err != nil {
				t.Fatalf("WriteZeroes(%d, %d): %v", off, n, err)
			}
		}
	}
	reqs := s.unitRequests(t, area, al, 41)
	reqs = append(reqs, [2]int64{area / 2, area / 2}, [2]int64{area/2 - al - 1, 2*al + 2})
	if size%al != 0 {
		// Reaching the end of the disk, whose last unit is partial.
		reqs = append(reqs, [2]int64{size - al - 5, al + 5}, [2]int64{alignDown(size, al), size - alignDown(size, al)})
	}
	done := 0
	for i, q := range reqs {
		off, n := q[0], q[1]
		if off < 0 || n < 0 || off+n > size {
			continue
		}
		what := fmt.Sprintf("request %d: Discard(%d, %d) (alignment %d)", i, off, n, al)
		w := snapshot(t, img, off, n, al+1024)
		var before []disk.Extent
		if c.Extents {
			before = dataExtents(t, img, w.lo, w.hi)
		}
		err := disk.Discard(img, off, n)
		if err != nil {
			// An image that does not claim Discard may refuse it (after
			// doing nothing for discards of less than a unit).
			if !c.Discard && errors.Is(err, disk.ErrNotSupported) {
				t.Skipf("the image does not claim Discard: %s: %v (%d discards before kept the contract)", what, err, done)
			}
			t.Fatalf("%s: %v", what, err)
		}
		done++
		s.checkDiscarded(t, img, what, w, off, n, al)
		if c.Extents {
			if p := newData(before, dataExtents(t, img, w.lo, w.hi)); p >= 0 {
				t.Fatalf("%s allocated: byte %d is StatusData now, but was not before", what, p)
			}
		}
	}
	if !c.Discard {
		t.Logf("the image does not claim Discard, but %d discards kept the contract", done)
	}
	if err := img.Flush(); err != nil {
		t.Fatalf("Flush: %v", err)
	}
}

// checkDiscarded checks the image after a discard of [off, off+n) with
// units of al bytes, w holding the content before: the whole units read
// as zeros (unless Options.DiscardKeepsData), everything else as before.
func (s *suite) checkDiscarded(t *testing.T, img disk.Image, what string, w window, off, n, al int64) {
	t.Helper()
	a, b, ea, eb := discardSpans(off, n, img.Size(), al)
	w.unchanged(t, img, what+": before the whole units", w.lo, a-w.lo)
	if eb > ea {
		w.unchanged(t, img, what+": between the whole units and the last, partial one", b, ea-b)
		got := readRange(t, img, ea, eb-ea, 1<<20)
		if nonZero(got) >= 0 && !s.opts.DiscardKeepsData {
			w.unchanged(t, img, what+": the disk's last, partial unit (may read as zeros or as before)", ea, eb-ea)
		}
	} else {
		w.unchanged(t, img, what+": after the whole units", b, w.hi-b)
	}
	if !s.opts.DiscardKeepsData && b > a {
		if j := nonZero(readRange(t, img, a, b-a, 1<<20)); j >= 0 {
			t.Fatalf("%s: byte %d of the whole units [%d, %d) is not zero", what, a+int64(j), a, b)
		}
	}
}
