package disktest

import (
	"context"
	"errors"
	"testing"

	"github.com/imgloop/imgloop/disk"
)

// The cases for what an image says of itself: its block limits and its
// capabilities, and that a read-only image refuses every write.

func isPow2(n int64) bool { return n > 0 && n&(n-1) == 0 }

func (s *suite) limits(t *testing.T) {
	img := s.image(t)
	l := disk.LimitsOf(img)
	t.Logf("LimitsOf = %+v", l)
	if l2 := disk.LimitsOf(img); l2 != l {
		t.Errorf("LimitsOf changed between calls: %+v, then %+v", l, l2)
	}
	for _, f := range []struct {
		name string
		v    int64
	}{
		{"MinTransfer", l.MinTransfer}, {"PreferredTransfer", l.PreferredTransfer}, {"MaxTransfer", l.MaxTransfer},
		{"DiscardAlignment", l.DiscardAlignment}, {"ZeroAlignment", l.ZeroAlignment},
	} {
		if !isPow2(f.v) {
			t.Errorf("%s = %d, want a power of two", f.name, f.v)
		}
	}
	if !(l.MinTransfer <= l.PreferredTransfer && l.PreferredTransfer <= l.MaxTransfer) {
		t.Errorf("want MinTransfer <= PreferredTransfer <= MaxTransfer, have %d, %d, %d",
			l.MinTransfer, l.PreferredTransfer, l.MaxTransfer)
	}
	if l.MinTransfer > 64<<10 {
		t.Errorf("MinTransfer = %d, more than NBD's 64 KiB limit", l.MinTransfer)
	}
	if l.DiscardAlignment < l.MinTransfer || l.ZeroAlignment < l.MinTransfer {
		t.Errorf("DiscardAlignment %d, ZeroAlignment %d: want both >= MinTransfer %d",
			l.DiscardAlignment, l.ZeroAlignment, l.MinTransfer)
	}
	size := img.Size()
	if need := min(1<<20, size); l.MaxTransfer < need {
		t.Errorf("MaxTransfer = %d, want at least %d (1 MiB, or the disk size)", l.MaxTransfer, need)
	}
	for _, m := range []struct {
		name       string
		max, align int64
	}{{"DiscardMax", l.DiscardMax, l.DiscardAlignment}, {"ZeroMax", l.ZeroMax, l.ZeroAlignment}} {
		if m.max < 0 || (m.max > 0 && m.max < m.align) {
			t.Errorf("%s = %d, want 0 (no limit) or at least the alignment %d", m.name, m.max, m.align)
		}
	}
	if t.Failed() || size == 0 {
		return
	}
	// Requests at the limits are served: the smallest, the largest, and
	// the tail when the size is not a multiple of MinTransfer.
	if size >= l.MinTransfer {
		readRange(t, img, 0, l.MinTransfer, l.MinTransfer)
	}
	big := min(l.MaxTransfer, size/l.MinTransfer*l.MinTransfer)
	if big > 0 {
		b := readRange(t, img, 0, big, big)
		if ref := s.reference(t, img); ref != nil {
			wantEqual(t, "read of MaxTransfer bytes", 0, b, ref[:big])
		}
	}
	if tail := size % l.MinTransfer; tail != 0 {
		t.Logf("size %d is not a multiple of MinTransfer %d: reading the %d-byte tail", size, l.MinTransfer, tail)
		readRange(t, img, size-tail, tail, tail)
	}
	if !s.opts.ReadOnly && big > 0 {
		data := make([]byte, big)
		fill(s.rng(t, 10), data)
		writeCheck(t, img, "write of MaxTransfer bytes", 0, data, nil)
	}
}

func (s *suite) capabilities(t *testing.T) {
	img := s.image(t)
	c := disk.CapabilitiesOf(img)
	t.Logf("CapabilitiesOf = %+v", c)
	if c2 := disk.CapabilitiesOf(img); c2 != c {
		t.Errorf("CapabilitiesOf changed between calls: %+v, then %+v", c, c2)
	}
	if c.ReadOnly != s.opts.ReadOnly {
		t.Fatalf("Capabilities.ReadOnly = %v, but Options.ReadOnly = %v", c.ReadOnly, s.opts.ReadOnly)
	}
	// What the driver states must be honest by itself: CapabilitiesOf
	// masks a read-only image's write capabilities, but an export that
	// reads Capabilities() directly must not be lied to either.
	if cp, ok := img.(disk.Capabler); ok && c.ReadOnly {
		st := cp.Capabilities()
		for name, v := range map[string]bool{"Flush": st.Flush, "Discard": st.Discard, "Zero": st.Zero, "FUA": st.FUA, "Resize": st.Resize} {
			if v {
				t.Errorf("Capabilities() of a read-only image states %s", name)
			}
		}
	}
	// A capability needs the interface that provides it.
	_, discarder := img.(disk.Discarder)
	_, zeroer := img.(disk.ZeroWriter)
	_, fua := img.(disk.FUAWriter)
	_, resizer := img.(disk.Resizer)
	_, notifier := img.(disk.ResizeNotifier)
	_, mapper := img.(disk.Mapper)
	for _, need := range []struct {
		capability, iface string
		claimed, has      bool
	}{
		{"Discard", "disk.Discarder", c.Discard, discarder},
		{"Zero", "disk.ZeroWriter", c.Zero, zeroer},
		{"FUA", "disk.FUAWriter", c.FUA, fua},
		{"Resize", "disk.Resizer", c.Resize, resizer},
		{"Resize", "disk.ResizeNotifier", c.Resize, notifier},
		{"Extents", "disk.Mapper", c.Extents, mapper},
		{"Depth", "disk.Mapper", c.Depth, mapper},
	} {
		if need.claimed && !need.has {
			t.Errorf("Capabilities claim %s, but the image is not a %s", need.capability, need.iface)
		}
	}
	if c.ReadOnly {
		return // the ReadOnly case checks the refusals
	}
	if !c.Flush {
		t.Error("a writable image does not claim Flush")
	}
	size := img.Size()
	if size == 0 {
		return
	}
	l := disk.LimitsOf(img)
	// The claimed capabilities work on an aligned range with data in it.
	for _, op := range []struct {
		name    string
		claimed bool
		align   int64
		zeros   bool
		do      func(off, n int64) error
	}{
		{"WriteZeroes", c.Zero, l.ZeroAlignment, true, func(off, n int64) error { return disk.WriteZeroes(img, off, n, 0) }},
		{"WriteZeroes(ZeroNoUnmap)", c.Zero, l.ZeroAlignment, true, func(off, n int64) error {
			return disk.WriteZeroes(img, off, n, disk.ZeroNoUnmap)
		}},
		{"Discard", c.Discard, l.DiscardAlignment, !s.opts.DiscardKeepsData, func(off, n int64) error { return disk.Discard(img, off, n) }},
	} {
		if !op.claimed {
			t.Logf("%s not claimed", op.name)
			continue
		}
		off, n := alignedRange(size, op.align)
		if n == 0 {
			t.Logf("%s: the image is smaller than one %d-byte unit", op.name, op.align)
			continue
		}
		data := make([]byte, n)
		fill(s.rng(t, 11), data)
		writeCheck(t, img, op.name+": data to zero", off, data, nil)
		if err := op.do(off, n); err != nil {
			t.Errorf("%s is claimed, but %s(%d, %d) (aligned) failed: %v", op.name, op.name, off, n, err)
			continue
		}
		if op.zeros {
			if i := nonZero(readRange(t, img, off, n, 1<<20)); i >= 0 {
				t.Errorf("%s(%d, %d) (aligned): byte %d is not zero", op.name, off, n, off+int64(i))
			}
		}
	}
}

// alignedRange returns a range of up to 4 whole units of align bytes in
// a disk of size bytes, starting at the second unit when there is room;
// n is 0 if the disk holds no whole unit.
func alignedRange(size, align int64) (off, n int64) {
	units := size / align
	switch {
	case units == 0:
		return 0, 0
	case units <= 2:
		return 0, units * align
	}
	return align, min(4, units-1) * align
}

// readOnly checks that every write-like call on a read-only image fails
// with disk.ErrReadOnly and changes nothing, and that Flush succeeds.
func (s *suite) readOnly(t *testing.T) {
	img := s.image(t)
	size := img.Size()
	if size == 0 {
		t.Skip("empty image")
	}
	c := disk.CapabilitiesOf(img)
	if !c.ReadOnly || c.Discard || c.Zero || c.FUA || c.Resize || c.Flush {
		t.Errorf("capabilities of a read-only image: %+v; want ReadOnly and no Flush, Discard, Zero, FUA or Resize", c)
	}
	window := min(size, 128<<10)
	before := readRange(t, img, 0, window, 1<<20)
	n := min(size, 4096)
	buf := make([]byte, n)
	fill(s.rng(t, 12), buf)
	_, discarder := img.(disk.Discarder)
	_, zeroer := img.(disk.ZeroWriter)
	_, resizer := img.(disk.Resizer)
	bg := context.Background()
	calls := []struct {
		name string
		// implemented: the image has the interface; without it the
		// helpers' own ErrNotSupported (ErrSlowZero) is accepted.
		implemented bool
		do          func() error
	}{
		{"WriteAt", true, func() error { _, err := img.WriteAt(buf, 0); return err }},
		{"WriteAtFlags(0)", true, func() error { _, err := disk.WriteAtFlags(img, buf, 0, 0); return err }},
		{"WriteAtFlags(WriteFUA)", true, func() error { _, err := disk.WriteAtFlags(img, buf, 0, disk.WriteFUA); return err }},
		{"Discard", discarder, func() error { return disk.Discard(img, 0, n) }},
		{"WriteZeroes", zeroer, func() error { return disk.WriteZeroes(img, 0, n, 0) }},
		{"WriteZeroes(ZeroNoUnmap)", zeroer, func() error { return disk.WriteZeroes(img, 0, n, disk.ZeroNoUnmap) }},
		{"WriteZeroes(ZeroFast)", zeroer, func() error { return disk.WriteZeroes(img, 0, n, disk.ZeroFast) }},
		{"WriteZeroes(ZeroFUA)", zeroer, func() error { return disk.WriteZeroes(img, 0, n, disk.ZeroFUA) }},
		{"ZeroContext", zeroer, func() error { return disk.ZeroContext(bg, img, 0, n, 0) }},
		{"ZeroContext(ZeroFast)", zeroer, func() error { return disk.ZeroContext(bg, img, 0, n, disk.ZeroFast) }},
		{"DiscardContext", discarder, func() error { return disk.DiscardContext(bg, img, 0, n) }},
		{"Resize(grow)", resizer, func() error { return disk.Resize(img, size+512) }},
		{"Resize(shrink)", resizer, func() error { return disk.Resize(img, size-min(size, 512)) }},
	}
	if f, ok := img.(disk.FUAWriter); ok {
		calls = append(calls, struct {
			name        string
			implemented bool
			do          func() error
		}{"WriteAtFUA", true, func() error { _, err := f.WriteAtFUA(buf, 0); return err }})
	}
	for _, call := range calls {
		err := call.do()
		switch {
		case errors.Is(err, disk.ErrReadOnly):
		case !call.implemented && (errors.Is(err, disk.ErrNotSupported) || errors.Is(err, disk.ErrSlowZero)):
		default:
			t.Errorf("%s on a read-only image: %v, want ErrReadOnly", call.name, err)
		}
		if got := img.Size(); got != size {
			t.Fatalf("%s on a read-only image changed Size from %d to %d", call.name, size, got)
		}
	}
	wantEqual(t, "read-only image after refused writes", 0, readRange(t, img, 0, window, 1<<20), before)
	if err := img.Flush(); err != nil {
		t.Errorf("Flush on a read-only image: %v", err)
	}
	ctx, cancel := context.WithCancel(bg)
	defer cancel()
	if err := disk.FlushContext(ctx, img); err != nil {
		t.Errorf("FlushContext on a read-only image: %v", err)
	}
}

// window is a copy of [lo, hi) of an image, for checking what a call
// changed.
type window struct {
	lo, hi int64
	b      []byte
}

// snapshot reads the window [off-margin, off+n+margin), cut to the disk.
func snapshot(t testing.TB, img disk.Image, off, n, margin int64) window {
	t.Helper()
	lo, hi := max(0, off-margin), min(img.Size(), off+n+margin)
	return window{lo, hi, readRange(t, img, lo, hi-lo, 1<<20)}
}

// unchanged fails t unless [off, off+n) (inside w) reads as in w.
func (w window) unchanged(t testing.TB, img disk.Image, what string, off, n int64) {
	t.Helper()
	off, end := max(off, w.lo), min(off+n, w.hi)
	if off >= end {
		return
	}
	wantEqual(t, what, off, readRange(t, img, off, end-off, 1<<20), w.b[off-w.lo:end-w.lo])
}
