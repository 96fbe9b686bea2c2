package disktest

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/imgloop/imgloop/disk"
)

// The concurrency cases: parallel writes over an area large enough to
// grow a driver's metadata, writes, zeroing and discards racing reads
// that must never see another range's data, and Close with calls in
// flight. Run under -race they also check the image for data races.

// parallelArea returns how many bytes at the start of img the parallel
// write cases use (Options.ParallelSize).
func (s *suite) parallelArea(t *testing.T, img disk.Image) int64 {
	size := img.Size()
	area := s.opts.ParallelSize
	if area <= 0 {
		area = min(size, s.opts.MaxRead)
	}
	if area > size {
		t.Logf("Options.ParallelSize %d is more than the image's %d bytes: using the whole image", area, size)
		area = size
	}
	return area
}

// parallelChunk is the size of the pieces of the area that the parallel
// cases hand to their workers round-robin: a multiple of 8 (the stamp
// size of ParallelMixed) but of no sector or cluster size, so that
// neighbouring workers share clusters and the driver must order their
// allocations.
const parallelChunk = 36<<10 + 104

// chunks splits area into n-way round-robin chunks: it returns the chunk
// size (at most parallelChunk, a multiple of 8) and how many there are.
func chunks(area int64, workers int) (chunk, count int64) {
	chunk = parallelChunk
	if area < int64(workers)*chunk {
		chunk = alignDown(area/int64(workers), 8)
	}
	if chunk == 0 {
		return 0, 0
	}
	return chunk, area / chunk
}

func (s *suite) parallelWrite(t *testing.T) {
	img := s.image(t)
	area := s.parallelArea(t, img)
	const workers = 8
	chunk, count := chunks(area, workers)
	if count < workers {
		t.Skip("image too small for 8 workers")
	}
	t.Logf("%d workers writing %d chunks of %d bytes round-robin over %d bytes", workers, count, chunk, count*chunk)
	content := make([][]byte, count) // each chunk's expected content, written by its worker only
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		r := s.rng(t, 200+uint64(w))
		wg.Go(func() {
			var mine []int64
			for i := int64(w); i < count; i += workers {
				mine = append(mine, i)
			}
			r.Shuffle(len(mine), func(a, b int) { mine[a], mine[b] = mine[b], mine[a] })
			var written []int64
			for _, i := range mine {
				base := i * chunk
				data := make([]byte, chunk)
				fill(r, data)
				// Allocating writes: the chunk in one to three pieces.
				cuts := []int64{0, r.Int64N(chunk + 1), r.Int64N(chunk + 1), chunk}
				if cuts[1] > cuts[2] {
					cuts[1], cuts[2] = cuts[2], cuts[1]
				}
				for k := 0; k < 3; k++ {
					lo, hi := cuts[k], cuts[k+1]
					if lo == hi {
						continue
					}
					if _, err := img.WriteAt(data[lo:hi], base+lo); err != nil {
						errs <- fmt.Errorf("worker %d: WriteAt(%d at %d): %v", w, hi-lo, base+lo, err)
						return
					}
				}
				content[i] = data
				written = append(written, i)
				// Rewrites of chunks written before (the in-place path),
				// racing the other workers' allocations.
				if r.IntN(4) == 0 {
					j := written[r.IntN(len(written))]
					off, n := randRange(r, chunk)
					fill(r, content[j][off:off+n])
					if _, err := img.WriteAt(content[j][off:off+n], j*chunk+off); err != nil {
						errs <- fmt.Errorf("worker %d: rewrite WriteAt(%d at %d): %v", w, n, j*chunk+off, err)
						return
					}
				}
				if r.IntN(32) == 0 {
					if err := img.Flush(); err != nil {
						errs <- fmt.Errorf("worker %d: Flush: %v", w, err)
						return
					}
				}
			}
			got := make([]byte, chunk)
			for _, i := range mine {
				if _, err := img.ReadAt(got, i*chunk); err != nil {
					errs <- fmt.Errorf("worker %d: ReadAt(%d at %d): %v", w, chunk, i*chunk, err)
					return
				}
				if !bytes.Equal(got, content[i]) {
					errs <- fmt.Errorf("worker %d: chunk at %d does not read back", w, i*chunk)
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if t.Failed() {
		return
	}
	// Once all are done, no worker's writes have damaged another's.
	for i := int64(0); i < count; i++ {
		wantEqual(t, "after the parallel writes", i*chunk, readRange(t, img, i*chunk, chunk, chunk), content[i])
	}
	if err := img.Flush(); err != nil {
		t.Fatalf("Flush: %v", err)
	}
}

// stamper makes ParallelMixed's data: every 8-byte word at disk offset o
// holds a generation byte, then 7 bytes that depend only on o and are
// never zero. A read racing writes, zeroing and discards of its range
// may see, byte by byte, the old data, the new data or zeros, and so
// each byte but the first of a word is either zero or o's; data of any
// other offset shows.
type stamper struct{ salt uint64 }

// word returns the stamp of the word at o (a multiple of 8) for gen.
func (s stamper) word(o int64, gen byte) [8]byte {
	x := (uint64(o)/8 + 1) * 0x9e3779b97f4a7c15
	x ^= s.salt
	x ^= x >> 29
	x *= 0xbf58476d1ce4e5b9
	var w [8]byte
	binary.LittleEndian.PutUint64(w[:], x)
	w[0] = gen
	for i := 1; i < 8; i++ {
		if w[i] == 0 {
			w[i] = 1
		}
	}
	return w
}

// fill stamps b, which starts at disk offset off (both multiples of 8).
func (s stamper) fill(b []byte, off int64, gen byte) {
	for i := 0; i+8 <= len(b); i += 8 {
		w := s.word(off+int64(i), gen)
		copy(b[i:], w[:])
	}
}

// check returns the disk offset of the first byte of b (read at off, a
// multiple of 8) that is neither zero nor off's stamp, or -1.
func (s stamper) check(b []byte, off int64) int64 {
	for i := 0; i+8 <= len(b); i += 8 {
		w := s.word(off+int64(i), 0)
		for j := 1; j < 8; j++ {
			if c := b[i+j]; c != 0 && c != w[j] {
				return off + int64(i+j)
			}
		}
	}
	return -1
}

// parallelMixed has writers mix writes, write-zeroes, discards, flushes
// and reads on chunks of their own, each checked exactly against a model
// of the chunk, while readers read anywhere and check that every byte is
// one a legal interleaving could give: never another range's data (the
// bug where a read racing a discard returned the bytes of a far-away
// write that reused the discarded range's host clusters).
func (s *suite) parallelMixed(t *testing.T) {
	img := s.image(t)
	area := s.parallelArea(t, img)
	size := img.Size()
	const writers, readers = 4, 3
	chunk, count := chunks(area, writers)
	if count < writers {
		t.Skip("image too small for 4 writers")
	}
	c, l := disk.CapabilitiesOf(img), disk.LimitsOf(img)
	discard := c.Discard && !s.opts.DiscardKeepsData
	if c.Discard && !discard {
		t.Log("no discards: Options.DiscardKeepsData (discarded ranges may show data this case does not know)")
	}
	_, zeroer := img.(disk.ZeroWriter)
	st := stamper{salt: s.opts.Seed}
	used := count * chunk
	t.Logf("%d writers on %d chunks of %d bytes, %d readers, over %d bytes", writers, count, chunk, readers, used)
	// Stamp the whole area first: from now on every byte is zero or its
	// offset's.
	content := make([][]byte, count)
	for i := range content {
		content[i] = make([]byte, chunk)
		st.fill(content[i], int64(i)*chunk, 1)
		if _, err := img.WriteAt(content[i], int64(i)*chunk); err != nil {
			t.Fatalf("WriteAt(%d at %d): %v", chunk, int64(i)*chunk, err)
		}
	}
	var wg sync.WaitGroup
	var writing atomic.Int32
	writing.Store(writers)
	errs := make(chan error, writers+readers)
	for w := range writers {
		r := s.rng(t, 300+uint64(w))
		wg.Go(func() {
			defer writing.Add(-1)
			var mine []int64
			for i := int64(w); i < count; i += writers {
				mine = append(mine, i)
			}
			canZero := zeroer
			buf := make([]byte, chunk)
			ops := max(200, 4*len(mine))
			for op := range ops {
				i := mine[r.IntN(len(mine))]
				base := i * chunk
				off, n := randRange(r, chunk)
				off, n = alignDown(off, 8), alignUp(n, 8)
				n = min(n, chunk-off)
				model := content[i][off : off+n]
				switch p := r.IntN(100); {
				case p < 40:
					st.fill(model, base+off, byte(1+op%255))
					if _, err := img.WriteAt(model, base+off); err != nil {
						errs <- fmt.Errorf("writer %d: WriteAt(%d at %d): %v", w, n, base+off, err)
						return
					}
				case p < 52 && canZero:
					flags := disk.ZeroFlags(0)
					if r.IntN(2) == 0 {
						flags = disk.ZeroNoUnmap
					}
					err := disk.WriteZeroes(img, base+off, n, flags)
					if errors.Is(err, disk.ErrNotSupported) {
						canZero = false
						continue
					}
					if err != nil {
						errs <- fmt.Errorf("writer %d: WriteZeroes(%d, %d, %#x): %v", w, base+off, n, flags, err)
						return
					}
					clear(model)
				case p < 64 && discard && base+off+n < size:
					if err := disk.Discard(img, base+off, n); err != nil {
						errs <- fmt.Errorf("writer %d: Discard(%d, %d): %v", w, base+off, n, err)
						return
					}
					a, b := alignUp(base+off, l.DiscardAlignment), alignDown(base+off+n, l.DiscardAlignment)
					if a < b {
						clear(content[i][a-base : b-base])
					}
				case p < 67:
					if err := img.Flush(); err != nil {
						errs <- fmt.Errorf("writer %d: Flush: %v", w, err)
						return
					}
				default:
					if _, err := img.ReadAt(buf[:n], base+off); err != nil {
						errs <- fmt.Errorf("writer %d: ReadAt(%d at %d): %v", w, n, base+off, err)
						return
					}
					if !bytes.Equal(buf[:n], model) {
						j := 0
						for buf[j] == model[j] {
							j++
						}
						errs <- fmt.Errorf("writer %d: its own %d bytes at %d differ from its model at %d (got %#x, want %#x)",
							w, n, base+off, base+off+int64(j), buf[j], model[j])
						return
					}
				}
			}
		})
	}
	for rd := range readers {
		r := s.rng(t, 400+uint64(rd))
		wg.Go(func() {
			buf := make([]byte, 128<<10)
			reads := 0
			for writing.Load() > 0 || reads < 10 {
				off, n := randRange(r, used)
				off, n = alignDown(off, 8), alignDown(min(n, int64(len(buf))), 8)
				if _, err := img.ReadAt(buf[:n], off); err != nil {
					errs <- fmt.Errorf("reader %d: ReadAt(%d at %d): %v", rd, n, off, err)
					return
				}
				reads++
				if bad := st.check(buf[:n], off); bad >= 0 {
					word := alignDown(bad, 8)
					errs <- fmt.Errorf("reader %d: ReadAt(%d at %d) returned at %d the bytes % x, neither zeros nor the data of that offset "+
						"(another range's data?)", rd, n, off, word, buf[word-off:word-off+8])
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if t.Failed() {
		return
	}
	for i := int64(0); i < count; i++ {
		wantEqual(t, "after the mixed workload", i*chunk, readRange(t, img, i*chunk, chunk, chunk), content[i])
	}
	if err := img.Flush(); err != nil {
		t.Fatalf("Flush: %v", err)
	}
}

// closedCalls makes every call of img's API once, for checks after
// Close, and returns their errors by name.
func closedCalls(img disk.Image, size int64) map[string]error {
	buf := make([]byte, min(size, 512))
	n := int64(len(buf))
	bg := context.Background()
	calls := map[string]error{}
	_, calls["ReadAt"] = img.ReadAt(buf, 0)
	_, calls["WriteAt"] = img.WriteAt(buf, 0)
	_, calls["WriteAtFlags(0)"] = disk.WriteAtFlags(img, buf, 0, 0)
	_, calls["WriteAtFlags(WriteFUA)"] = disk.WriteAtFlags(img, buf, 0, disk.WriteFUA)
	if f, ok := img.(disk.FUAWriter); ok {
		_, calls["WriteAtFUA"] = f.WriteAtFUA(buf, 0)
	}
	calls["Flush"] = img.Flush()
	calls["FlushContext"] = disk.FlushContext(bg, img)
	if _, ok := img.(disk.Discarder); ok {
		calls["Discard"] = disk.Discard(img, 0, n)
		calls["DiscardContext"] = disk.DiscardContext(bg, img, 0, n)
	}
	if _, ok := img.(disk.ZeroWriter); ok {
		calls["WriteZeroes"] = disk.WriteZeroes(img, 0, n, 0)
		calls["WriteZeroes(ZeroFast)"] = disk.WriteZeroes(img, 0, n, disk.ZeroFast)
		calls["ZeroContext"] = disk.ZeroContext(bg, img, 0, n, 0)
	}
	if _, ok := img.(disk.Mapper); ok && size > 0 {
		_, calls["Map"] = disk.Map(img, 0, size)
		calls["ExtentsContext"] = disk.ExtentsContext(bg, img, 0, size, func(disk.Extent) error { return nil })
	}
	if _, ok := img.(disk.Resizer); ok {
		calls["Resize"] = disk.Resize(img, size+resizeStep)
	}
	return calls
}

func (s *suite) close(t *testing.T) {
	img := s.open(t)
	if img == nil {
		t.Fatal("open returned a nil image")
	}
	size := img.Size()
	if err := img.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	calls := closedCalls(img, size)
	calls["second Close"] = img.Close()
	for name, err := range calls {
		if !errors.Is(err, disk.ErrClosed) {
			t.Errorf("%s after Close: %v, want ErrClosed", name, err)
		}
	}
	// None of these may panic after Close.
	_ = img.Size()
	_ = img.SectorSize()
	_ = disk.LimitsOf(img)
	_ = disk.CapabilitiesOf(img)
	if d, ok := img.(disk.Describer); ok {
		_ = d.Info()
	}
}

// inFlightOp is one kind of call closeInFlight makes in a loop.
type inFlightOp struct {
	name string
	do   func(r *rand.Rand, buf []byte) error
}

// closeInFlight closes the image while goroutines call it in a loop:
// every call returns nil or an error matching ErrClosed, Close returns
// nil, and every call after it returns ErrClosed.
func (s *suite) closeInFlight(t *testing.T) {
	img := s.open(t)
	if img == nil {
		t.Fatal("open returned a nil image")
	}
	closed := false
	t.Cleanup(func() {
		if !closed {
			img.Close()
		}
	})
	size := img.Size()
	if size == 0 {
		t.Skip("empty image")
	}
	area := min(size, 4<<20)
	rangeIn := func(r *rand.Rand) (int64, int64) {
		off, n := randRange(r, area)
		return off, min(n, 64<<10)
	}
	ops := []inFlightOp{
		{"ReadAt", func(r *rand.Rand, buf []byte) error {
			off, n := rangeIn(r)
			_, err := img.ReadAt(buf[:n], off)
			return err
		}},
		{"Flush", func(*rand.Rand, []byte) error { return img.Flush() }},
	}
	if _, ok := img.(disk.Mapper); ok {
		ops = append(ops, inFlightOp{"Map", func(r *rand.Rand, _ []byte) error {
			off, n := rangeIn(r)
			if n == 0 {
				off, n = min(off, area-1), 1
			}
			_, err := disk.Map(img, off, n)
			return err
		}})
	}
	if !s.opts.ReadOnly {
		ops = append(ops,
			inFlightOp{"WriteAt", func(r *rand.Rand, buf []byte) error {
				off, n := rangeIn(r)
				fill(r, buf[:n])
				_, err := img.WriteAt(buf[:n], off)
				return err
			}},
			inFlightOp{"WriteAtFlags(WriteFUA)", func(r *rand.Rand, buf []byte) error {
				off, n := rangeIn(r)
				_, err := disk.WriteAtFlags(img, buf[:n], off, disk.WriteFUA)
				return err
			}})
		if _, ok := img.(disk.ZeroWriter); ok {
			ops = append(ops, inFlightOp{"WriteZeroes", func(r *rand.Rand, _ []byte) error {
				off, n := rangeIn(r)
				return disk.WriteZeroes(img, off, n, 0)
			}})
		}
		if _, ok := img.(disk.Discarder); ok {
			ops = append(ops, inFlightOp{"Discard", func(r *rand.Rand, _ []byte) error {
				off, n := rangeIn(r)
				return disk.Discard(img, off, n)
			}})
		}
	}
	// Each op works before Close; ops the image refuses are left out.
	r := s.rng(t, 500)
	buf := make([]byte, 64<<10)
	var live []inFlightOp
	for _, op := range ops {
		err := op.do(r, buf)
		if errors.Is(err, disk.ErrNotSupported) && (op.name == "WriteZeroes" || op.name == "Discard") {
			t.Logf("%s: %v: left out", op.name, err)
			continue
		}
		if err != nil {
			t.Fatalf("%s before Close: %v", op.name, err)
		}
		live = append(live, op)
	}
	var (
		calls    atomic.Int64
		after    atomic.Bool // Close has returned
		wg       sync.WaitGroup
		errMu    sync.Mutex
		failures []string
	)
	fail := func(format string, args ...any) {
		errMu.Lock()
		defer errMu.Unlock()
		if len(failures) < 20 {
			failures = append(failures, fmt.Sprintf(format, args...))
		}
	}
	for g := range 2 * len(live) {
		op := live[g%len(live)]
		r := s.rng(t, 600+uint64(g))
		wg.Go(func() {
			buf := make([]byte, 64<<10)
			for i := 0; ; i++ {
				late := after.Load()
				err := op.do(r, buf)
				calls.Add(1)
				switch {
				case err == nil && late:
					fail("%s started after Close returned and succeeded", op.name)
					return
				case err == nil:
					continue
				case !errors.Is(err, disk.ErrClosed):
					fail("%s with Close in flight: %v, want nil or ErrClosed", op.name, err)
					return
				}
				// Closed: so are all later calls.
				for range 3 {
					if err := op.do(r, buf); !errors.Is(err, disk.ErrClosed) {
						fail("%s after an ErrClosed: %v, want ErrClosed", op.name, err)
						return
					}
				}
				return
			}
		})
	}
	deadline := time.Now().Add(5 * time.Second)
	for calls.Load() < int64(50*len(live)) && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	done := make(chan error, 1)
	go func() { done <- img.Close() }()
	select {
	case err := <-done:
		closed = true
		after.Store(true)
		if err != nil {
			t.Errorf("Close with calls in flight: %v", err)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("Close with calls in flight did not return in 60s")
	}
	wg.Wait()
	for _, f := range failures {
		t.Error(f)
	}
	t.Logf("%d calls made", calls.Load())
	for name, err := range closedCalls(img, size) {
		if !errors.Is(err, disk.ErrClosed) {
			t.Errorf("%s after Close (with calls in flight): %v, want ErrClosed", name, err)
		}
	}
}
