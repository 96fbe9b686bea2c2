package disktest

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/imgloop/imgloop/disk"
)

// RandomOps applies n seeded random operations to img and to model, which
// must start with the same content and size: writes of every shape (some
// with WriteFUA), Discard and WriteZeroes (with ZeroNoUnmap, ZeroFast and
// ZeroFUA) when img offers them, flushes, and reads, each compared with
// the model. A discard must leave what lies outside the whole units of
// img's Limits.DiscardAlignment as it was, and those units must read as
// zeros; a fast zero either zeroes its range or fails with
// disk.ErrSlowZero and changes nothing. At the end the whole disk is
// compared (up to 256 MiB). A failure reports the seed and the last
// operations, so that `RandomOps(t, seed, ...)` replays it.
func RandomOps(t testing.TB, seed uint64, img disk.Image, model *Model, n int) {
	t.Helper()
	size := img.Size()
	if model.Size() != size {
		t.Fatalf("RandomOps: image size %d, model size %d", size, model.Size())
	}
	if size == 0 {
		return
	}
	align := disk.LimitsOf(img).DiscardAlignment
	r := rand.New(rand.NewPCG(seed, 0x5eed))
	var history []string
	fail := func(format string, args ...any) {
		t.Helper()
		start := max(0, len(history)-20)
		t.Fatalf("RandomOps seed %d, op %d: %s\nlast operations:\n  %s", seed, len(history)-1,
			fmt.Sprintf(format, args...), strings.Join(history[start:], "\n  "))
	}
	canDiscard, canZero := true, true
	buf := make([]byte, 1<<20)
	want := make([]byte, 1<<20)
	for i := 0; i < n; i++ {
		off, k := randRange(r, size)
		switch p := r.IntN(100); {
		case p < 40:
			data := buf[:k]
			fill(r, data)
			if r.IntN(4) == 0 {
				clear(data[:k/2]) // some zero runs, for drivers that detect them
			}
			flags := disk.WriteFlags(0)
			if r.IntN(8) == 0 {
				flags = disk.WriteFUA
			}
			history = append(history, fmt.Sprintf("WriteAtFlags(%d bytes at %d, %#x)", k, off, flags))
			if m, err := disk.WriteAtFlags(img, data, off, flags); err != nil || m != int(k) {
				fail("WriteAtFlags = %d, %v", m, err)
			}
			model.WriteAt(data, off)
		case p < 50 && canDiscard:
			history = append(history, fmt.Sprintf("Discard(%d, %d)", off, k))
			err := disk.Discard(img, off, k)
			if errors.Is(err, disk.ErrNotSupported) {
				canDiscard = false
				continue
			}
			if err != nil {
				fail("Discard: %v", err)
			}
			// Only the whole units read as zeros now; the disk's last,
			// partial unit may or may not have been discarded.
			a, b, ea, eb := discardSpans(off, k, size, align)
			model.WriteZeroes(a, b-a, 0)
			if eb > ea {
				got, old := buf[:eb-ea], want[:eb-ea]
				if _, err := img.ReadAt(got, ea); err != nil {
					fail("ReadAt(%d at %d): %v", eb-ea, ea, err)
				}
				model.ReadAt(old, ea)
				if !bytes.Equal(got, old) && nonZero(got) >= 0 {
					fail("the disk's last, partial unit [%d, %d) reads neither as before nor as zeros", ea, eb)
				}
				model.WriteAt(got, ea)
			}
		case p < 60 && canZero:
			flags := disk.ZeroFlags(0)
			if r.IntN(2) == 0 {
				flags = disk.ZeroNoUnmap
			}
			if r.IntN(4) == 0 {
				flags |= disk.ZeroFast
			}
			if r.IntN(8) == 0 {
				flags |= disk.ZeroFUA
			}
			history = append(history, fmt.Sprintf("WriteZeroes(%d, %d, %#x)", off, k, flags))
			err := disk.WriteZeroes(img, off, k, flags)
			if errors.Is(err, disk.ErrNotSupported) {
				canZero = false
				continue
			}
			if flags&disk.ZeroFast != 0 && errors.Is(err, disk.ErrSlowZero) {
				continue // nothing changed: later reads check it
			}
			if err != nil {
				fail("WriteZeroes: %v", err)
			}
			model.WriteZeroes(off, k, flags)
		case p < 63:
			history = append(history, "Flush()")
			if err := img.Flush(); err != nil {
				fail("Flush: %v", err)
			}
		default:
			history = append(history, fmt.Sprintf("ReadAt(%d bytes at %d)", k, off))
			if m, err := img.ReadAt(buf[:k], off); err != nil || m != int(k) {
				fail("ReadAt = %d, %v", m, err)
			}
			model.ReadAt(want[:k], off)
			if !bytes.Equal(buf[:k], want[:k]) {
				j := 0
				for buf[j] == want[j] {
					j++
				}
				fail("read differs from the model at offset %d: got %#x, want %#x", off+int64(j), buf[j], want[j])
			}
		}
	}
	history = append(history, "final comparison")
	end := min(size, 256<<20)
	for off := int64(0); off < end; off += int64(len(buf)) {
		k := min(int64(len(buf)), end-off)
		if _, err := img.ReadAt(buf[:k], off); err != nil {
			fail("ReadAt(%d at %d): %v", k, off, err)
		}
		model.ReadAt(want[:k], off)
		if !bytes.Equal(buf[:k], want[:k]) {
			fail("disk differs from the model in [%d, %d)", off, off+k)
		}
	}
}
