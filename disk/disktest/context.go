package disktest

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"testing"

	"github.com/imgloop/imgloop/disk"
)

// The cases for the context-aware helpers on a real image: a cancelled
// context stops them before they change anything, a live one lets them
// do what the plain calls do.

func (s *suite) contextCancelled(t *testing.T) {
	img := s.image(t)
	size := img.Size()
	if size == 0 {
		t.Skip("empty image")
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	n := min(size, 256<<10)
	before := readRange(t, img, 0, n, 1<<20)
	calls := map[string]error{
		"FlushContext":   disk.FlushContext(ctx, img),
		"DiscardContext": disk.DiscardContext(ctx, img, 0, n),
	}
	for _, flags := range []disk.ZeroFlags{0, disk.ZeroNoUnmap, disk.ZeroFast, disk.ZeroFUA} {
		calls[fmt.Sprintf("ZeroContext(%#x)", flags)] = disk.ZeroContext(ctx, img, 0, n, flags)
	}
	called := false
	calls["ExtentsContext"] = disk.ExtentsContext(ctx, img, 0, size, func(disk.Extent) error { called = true; return nil })
	for name, err := range calls {
		if !errors.Is(err, context.Canceled) {
			t.Errorf("%s with a cancelled context: %v, want context.Canceled", name, err)
		}
	}
	if called {
		t.Error("ExtentsContext with a cancelled context called fn")
	}
	wantEqual(t, "after calls with a cancelled context", 0, readRange(t, img, 0, n, 1<<20), before)
}

func (s *suite) contextHelpers(t *testing.T) {
	img := s.image(t)
	size := img.Size()
	if size == 0 {
		t.Skip("empty image")
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	c, l := disk.CapabilitiesOf(img), disk.LimitsOf(img)
	r := s.rng(t, 50)
	_, zeroer := img.(disk.ZeroWriter)
	for _, flags := range []disk.ZeroFlags{0, disk.ZeroNoUnmap, disk.ZeroFUA} {
		off, n := randRange(r, min(size, 8<<20))
		w := s.freshData(t, img, r, max(0, off-1024), min(size, off+n+1024))
		what := fmt.Sprintf("ZeroContext(%d, %d, %#x)", off, n, flags)
		err := disk.ZeroContext(ctx, img, off, n, flags)
		if !zeroer && errors.Is(err, disk.ErrNotSupported) {
			t.Logf("%s: %v (no ZeroWriter)", what, err)
			continue
		}
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		if j := nonZero(readRange(t, img, off, n, 1<<20)); j >= 0 {
			t.Fatalf("%s: byte %d is not zero", what, off+int64(j))
		}
		w.unchanged(t, img, what+": before the range", w.lo, off-w.lo)
		w.unchanged(t, img, what+": after the range", off+n, w.hi-off-n)
	}
	if al := l.DiscardAlignment; c.Discard && 4*al <= size {
		off, n := al/2, 3*al
		w := s.freshData(t, img, r, 0, min(size, 5*al))
		what := fmt.Sprintf("DiscardContext(%d, %d)", off, n)
		if err := disk.DiscardContext(ctx, img, off, n); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		s.checkDiscarded(t, img, what, w, off, n, al)
	}
	if err := disk.FlushContext(ctx, img); err != nil {
		t.Fatalf("FlushContext: %v", err)
	}
	var got, want []disk.Extent
	if err := disk.ExtentsContext(ctx, img, 0, size, func(e disk.Extent) error { got = append(got, e); return nil }); err != nil {
		t.Fatalf("ExtentsContext: %v", err)
	}
	if err := disk.Extents(img, 0, size, func(e disk.Extent) error { want = append(want, e); return nil }); err != nil {
		t.Fatalf("Extents: %v", err)
	}
	if !slices.Equal(got, want) {
		t.Fatalf("ExtentsContext and Extents differ:\n%+v\n%+v", got, want)
	}
	// Cancelled from fn, the walk stops with the context's error.
	if len(want) > 2 {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		k := 0
		err := disk.ExtentsContext(ctx, img, 0, size, func(disk.Extent) error {
			k++
			cancel()
			return nil
		})
		if !errors.Is(err, context.Canceled) || k != 1 {
			t.Fatalf("ExtentsContext cancelled in fn = %v after %d extents, want context.Canceled after 1", err, k)
		}
	}
}
