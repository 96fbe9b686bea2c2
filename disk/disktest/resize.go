package disktest

import (
	"bytes"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/imgloop/imgloop/disk"
)

// The cases for Resize and its notification, alone and with calls in
// flight.

// resizeStep is how much the resize cases grow an image at a time: a
// multiple of every sector and cluster size, so that any format takes
// it, and small enough to be cheap.
const resizeStep = 1 << 20

// sizes records the sizes a NotifyResize callback saw, checking in the
// callback that the new size is in effect.
type sizes struct {
	img  disk.Image
	mu   sync.Mutex
	seen []int64
	errs []string
}

func (z *sizes) fn(size int64) {
	// Size is asked from another goroutine, with a timeout: a driver
	// that notifies with its lock held would deadlock the callback.
	got := make(chan int64, 1)
	go func() { got <- z.img.Size() }()
	var msg string
	select {
	case cur := <-got:
		if cur != size {
			msg = fmt.Sprintf("callback for size %d: Size() = %d: the new size is not in effect yet", size, cur)
		}
	case <-time.After(10 * time.Second):
		msg = fmt.Sprintf("callback for size %d: Size() blocked for 10s (notified with a lock held?)", size)
	}
	z.mu.Lock()
	defer z.mu.Unlock()
	z.seen = append(z.seen, size)
	if msg != "" {
		z.errs = append(z.errs, msg)
	}
}

// take returns and forgets what the callback saw.
func (z *sizes) take() ([]int64, []string) {
	z.mu.Lock()
	defer z.mu.Unlock()
	s, e := z.seen, z.errs
	z.seen, z.errs = nil, nil
	return s, e
}

// resizable returns img's ResizeNotifier, skipping t when img does not
// claim Resize.
func resizable(t *testing.T, img disk.Image) disk.ResizeNotifier {
	t.Helper()
	if !disk.CapabilitiesOf(img).Resize {
		t.Skip("the image does not claim Resize")
	}
	rn, ok := img.(disk.ResizeNotifier)
	if !ok {
		t.Fatal("the image claims Resize but is not a disk.ResizeNotifier")
	}
	return rn
}

func (s *suite) resize(t *testing.T) {
	img := s.image(t)
	rn := resizable(t, img)
	old := img.Size()
	tailN := min(old, 64<<10)
	tail := readRange(t, img, old-tailN, tailN, 1<<20)
	a, b := &sizes{img: img}, &sizes{img: img}
	stopA, stopB := rn.NotifyResize(a.fn), rn.NotifyResize(b.fn)
	defer stopB()
	expect := func(z *sizes, name string, want ...int64) {
		t.Helper()
		seen, errs := z.take()
		for _, e := range errs {
			t.Errorf("watcher %s: %s", name, e)
		}
		if len(seen) != len(want) || (len(want) > 0 && seen[0] != want[0]) {
			t.Errorf("watcher %s saw sizes %v, want %v", name, seen, want)
		}
	}
	checkSize := func(want int64) {
		t.Helper()
		if got := img.Size(); got != want {
			t.Fatalf("Size() = %d, want %d", got, want)
		}
		if d, ok := img.(disk.Describer); ok {
			if got := d.Info().VirtualSize; got != want {
				t.Errorf("Info().VirtualSize = %d, want %d", got, want)
			}
		}
	}

	// Grow: the watchers see the new size, the new area reads as zeros,
	// the old content is intact, and the new area takes writes.
	grown := old + resizeStep
	if err := disk.Resize(img, grown); err != nil {
		t.Fatalf("Resize(%d) from %d: %v", grown, old, err)
	}
	expect(a, "A", grown)
	expect(b, "B", grown)
	checkSize(grown)
	if j := nonZero(readRange(t, img, old, grown-old, 1<<20)); j >= 0 {
		t.Fatalf("after Resize(%d) from %d: byte %d of the new area is not zero", grown, old, old+int64(j))
	}
	wantEqual(t, "the old end after a grow", old-tailN, readRange(t, img, old-tailN, tailN, 1<<20), tail)
	data := bytes.Repeat([]byte{0xa5}, 4096)
	writeCheck(t, img, "write at the new end", grown-4096, data, nil)
	if _, err := img.ReadAt(make([]byte, 1), grown); !errors.Is(err, disk.ErrOutOfRange) {
		t.Errorf("ReadAt at the new size: %v, want ErrOutOfRange", err)
	}

	// A stopped watcher is not called; the other still is.
	stopA()
	grown2 := grown + resizeStep
	if err := disk.Resize(img, grown2); err != nil {
		t.Fatalf("Resize(%d) from %d: %v", grown2, grown, err)
	}
	expect(a, "A (stopped)")
	expect(b, "B", grown2)
	checkSize(grown2)

	// Shrinking back may be refused (qcow2 refuses to drop allocated
	// clusters); either way size and watchers agree.
	cur := grown2
	if err := disk.Resize(img, grown); err == nil {
		cur = grown
		expect(b, "B", grown)
	} else {
		t.Logf("Resize(%d) from %d (shrink): %v", grown, grown2, err)
		expect(b, "B (after a refused shrink)")
	}
	checkSize(cur)
	wantEqual(t, "the old end after resizes", old-tailN, readRange(t, img, old-tailN, tailN, 1<<20), tail)
	if err := img.Flush(); err != nil {
		t.Fatalf("Flush: %v", err)
	}
}

// resizeInFlight grows the image in steps while workers write and read
// back stripes below the old size and readers read the area being grown:
// nothing may fail and no data may change.
func (s *suite) resizeInFlight(t *testing.T) {
	img := s.image(t)
	rn := resizable(t, img)
	old := img.Size()
	const workers, grows = 4, 8
	stripe := alignDown(min(old, s.opts.MaxRead)/workers, 512)
	if stripe == 0 {
		t.Skip("image too small for 4 stripes")
	}
	z := &sizes{img: img}
	defer rn.NotifyResize(z.fn)()
	var stop atomic.Bool
	var wg sync.WaitGroup
	errs := make(chan error, workers+2)
	for w := range workers {
		r := s.rng(t, 60+uint64(w))
		base := int64(w) * stripe
		wg.Go(func() {
			want := readRangeErr(img, base, stripe)
			if want == nil {
				errs <- fmt.Errorf("worker %d: reading its stripe at %d failed", w, base)
				return
			}
			buf := make([]byte, stripe)
			for i := 0; !stop.Load() || i < 8; i++ {
				off, n := randRange(r, stripe)
				if r.IntN(2) == 0 {
					fill(r, want[off:off+n])
					if m, err := img.WriteAt(want[off:off+n], base+off); err != nil || m != int(n) {
						errs <- fmt.Errorf("worker %d: WriteAt(%d at %d) = %d, %v while the image grows", w, n, base+off, m, err)
						return
					}
					continue
				}
				if m, err := img.ReadAt(buf[:n], base+off); err != nil || m != int(n) {
					errs <- fmt.Errorf("worker %d: ReadAt(%d at %d) = %d, %v while the image grows", w, n, base+off, m, err)
					return
				}
				if !bytes.Equal(buf[:n], want[off:off+n]) {
					errs <- fmt.Errorf("worker %d: %d bytes at %d changed while the image grew", w, n, base+off)
					return
				}
			}
		})
	}
	// A reader of the grown area: what Size says is readable, and reads
	// as zeros.
	wg.Go(func() {
		buf := make([]byte, 64<<10)
		for !stop.Load() {
			size := img.Size()
			if size <= old {
				time.Sleep(100 * time.Microsecond)
				continue
			}
			off := size - int64(len(buf))
			if off < old {
				off = old
			}
			n := size - off
			if m, err := img.ReadAt(buf[:n], off); err != nil || m != int(n) {
				errs <- fmt.Errorf("reader: ReadAt(%d at %d) = %d, %v after Size() = %d", n, off, m, err, size)
				return
			}
			if j := nonZero(buf[:n]); j >= 0 {
				errs <- fmt.Errorf("reader: byte %d of the grown area is not zero", off+int64(j))
				return
			}
		}
	})
	size := old
	for range grows {
		size += resizeStep
		if err := disk.Resize(img, size); err != nil {
			stop.Store(true)
			wg.Wait()
			t.Fatalf("Resize(%d) with calls in flight: %v", size, err)
		}
		time.Sleep(time.Millisecond)
	}
	stop.Store(true)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if got := img.Size(); got != size {
		t.Errorf("Size() = %d after growing to %d", got, size)
	}
	seen, cerrs := z.take()
	for _, e := range cerrs {
		t.Error(e)
	}
	if len(seen) != grows {
		t.Errorf("the watcher saw %d sizes, want %d: %v", len(seen), grows, seen)
	}
	for i := range seen {
		if want := old + int64(i+1)*resizeStep; seen[i] != want {
			t.Errorf("notification %d: size %d, want %d (in order)", i, seen[i], want)
		}
	}
	if j := nonZero(readRange(t, img, old, size-old, 1<<20)); j >= 0 {
		t.Errorf("byte %d of the grown area is not zero", old+int64(j))
	}
}

// readRangeErr reads [off, off+n), or returns nil on error (for
// goroutines, which must not call t.Fatal).
func readRangeErr(img disk.Image, off, n int64) []byte {
	b := make([]byte, n)
	if m, err := img.ReadAt(b, off); err != nil || m != int(n) {
		return nil
	}
	return b
}
