package disktest

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"sync"
	"testing"

	"github.com/imgloop/imgloop/disk"
)

// Options say what Run may expect of the images it is given.
type Options struct {
	// ReadOnly: the image was opened read-only. Its capabilities must
	// say so, and every write-like call (WriteAt, Discard, WriteZeroes,
	// Resize and their export forms) must fail with disk.ErrReadOnly;
	// the write tests are replaced by checks of that.
	ReadOnly bool
	// Model is the image's expected content as opened (len(Model) ==
	// Size()), nil if unknown; without it reads are checked against
	// each other.
	Model []byte
	// DiscardKeepsData: the whole units a Discard deallocates need not
	// read as zeros afterwards (e.g. they fall through to a backing
	// file, as in a qcow2 version 2 image); they may read as anything.
	// By default they must read as zeros. Either way the rest of the
	// range must read as before.
	DiscardKeepsData bool
	// SlowZero: WriteZeroes with disk.ZeroFast may fail with
	// disk.ErrSlowZero even on ranges aligned to Limits.ZeroAlignment of
	// an image whose capabilities claim Zero (a format that must write
	// zeros where the range does not read as zeros already, e.g. qcow2
	// version 2, which has no zero clusters). By default such a range
	// must be zeroed fast.
	SlowZero bool
	// ParallelSize is how many bytes at the start of the image the
	// parallel write cases (ParallelWrite, ParallelMixed) write over;
	// 0 means min(Size, MaxRead). Drivers whose metadata grows with
	// allocation open an image of at least this size and set it large
	// enough for the writes to grow it concurrently (for qcow2 with
	// 512-byte clusters, 16 MiB grows L2 tables, refcount blocks and the
	// refcount table; 1-2 MiB images with 64 KiB clusters never do).
	ParallelSize int64
	// MaxRead bounds how many bytes a whole-image check reads (default
	// 64 MiB); larger images are checked by sampling.
	MaxRead int64
	// Seed seeds the random offsets and data (default 1); failures print
	// it.
	Seed uint64
}

// Run runs the conformance suite: each subtest calls open for a fresh
// image, which Run closes at the end of the subtest (open registers the
// cleanup of whatever else it made, e.g. with t.TempDir). Images may be
// modified by the write subtests. A case for a capability the image does
// not claim (disk.CapabilitiesOf) skips, saying so.
func Run(t *testing.T, open func(t *testing.T) disk.Image, opts Options) {
	if opts.MaxRead <= 0 {
		opts.MaxRead = 64 << 20
	}
	if opts.Seed == 0 {
		opts.Seed = 1
	}
	s := &suite{open: open, opts: opts}
	t.Logf("disktest seed %d (Options.Seed)", opts.Seed)
	t.Run("Geometry", s.geometry)
	t.Run("Limits", s.limits)
	t.Run("Capabilities", s.capabilities)
	t.Run("Read", s.read)
	t.Run("ParallelRead", s.parallelRead)
	t.Run("OutOfRange", s.outOfRange)
	t.Run("Extents", s.extents)
	t.Run("ContextCancelled", s.contextCancelled)
	if opts.ReadOnly {
		t.Run("ReadOnly", s.readOnly)
	} else {
		t.Run("RoundTrip", s.roundTrip)
		t.Run("ParallelWrite", s.parallelWrite)
		t.Run("ParallelMixed", s.parallelMixed)
		t.Run("Zeroes", s.zeroes)
		t.Run("FastZero", s.fastZero)
		t.Run("FUA", s.fua)
		t.Run("Discard", s.discard)
		t.Run("ExtentsAfterWrites", s.extentsAfterWrites)
		t.Run("Context", s.contextHelpers)
		t.Run("Resize", s.resize)
		t.Run("ResizeInFlight", s.resizeInFlight)
	}
	t.Run("Close", s.close)
	t.Run("CloseInFlight", s.closeInFlight)
}

type suite struct {
	open func(t *testing.T) disk.Image
	opts Options
}

// image opens a fresh image that is closed when t ends.
func (s *suite) image(t *testing.T) disk.Image {
	t.Helper()
	img := s.open(t)
	if img == nil {
		t.Fatal("open returned a nil image")
	}
	t.Cleanup(func() { img.Close() })
	return img
}

func (s *suite) rng(t *testing.T, salt uint64) *rand.Rand {
	return rand.New(rand.NewPCG(s.opts.Seed, salt))
}

// reference returns the image's whole content: the model, or one read of
// the image when it is at most MaxRead bytes; nil otherwise.
func (s *suite) reference(t *testing.T, img disk.Image) []byte {
	t.Helper()
	if s.opts.Model != nil {
		if int64(len(s.opts.Model)) != img.Size() {
			t.Fatalf("Options.Model has %d bytes, image Size is %d", len(s.opts.Model), img.Size())
		}
		return append([]byte(nil), s.opts.Model...)
	}
	if img.Size() > s.opts.MaxRead {
		return nil
	}
	return readRange(t, img, 0, img.Size(), 1<<20)
}

// readRange reads [off, off+n) in pieces of at most chunk bytes.
func readRange(t testing.TB, img disk.Image, off, n, chunk int64) []byte {
	t.Helper()
	b := make([]byte, n)
	for i := int64(0); i < n; i += chunk {
		k := min(chunk, n-i)
		if m, err := img.ReadAt(b[i:i+k], off+i); err != nil || m != int(k) {
			t.Fatalf("ReadAt(%d bytes at %d) = %d, %v", k, off+i, m, err)
		}
	}
	return b
}

// randRange picks a request inside a disk of size bytes: lengths favour
// the sizes that matter (sub-sector, sector, a few KiB, up to 1 MiB) and
// offsets favour sector and cluster edges.
func randRange(r *rand.Rand, size int64) (off, n int64) {
	if size == 0 {
		return 0, 0
	}
	switch r.IntN(4) {
	case 0:
		n = r.Int64N(1025)
	case 1:
		n = 512 * (1 + r.Int64N(16))
	case 2:
		n = r.Int64N(64<<10 + 1)
	default:
		n = r.Int64N(1<<20 + 1)
	}
	n = min(n, size)
	switch r.IntN(4) {
	case 0: // straddle a 64 KiB boundary
		b := (r.Int64N(size/(64<<10)+1) * (64 << 10))
		off = b - r.Int64N(n+1)
	case 1:
		off = r.Int64N(size/512+1) * 512
	case 2:
		off = size - n
	default:
		off = r.Int64N(size - n + 1)
	}
	off = max(0, min(off, size-n))
	return off, n
}

func fill(r *rand.Rand, b []byte) {
	for len(b) >= 8 {
		binary.LittleEndian.PutUint64(b, r.Uint64())
		b = b[8:]
	}
	for i := range b {
		b[i] = byte(r.Uint32())
	}
}

// wantEqual fails t if got differs from want, naming the first difference.
func wantEqual(t testing.TB, what string, off int64, got, want []byte) {
	t.Helper()
	if bytes.Equal(got, want) {
		return
	}
	i := 0
	for i < len(got) && i < len(want) && got[i] == want[i] {
		i++
	}
	t.Fatalf("%s: %d bytes at %d differ first at disk offset %d (got %#x, want %#x)",
		what, len(want), off, off+int64(i), at(got, i), at(want, i))
}

func at(b []byte, i int) any {
	if i < len(b) {
		return b[i]
	}
	return "end"
}

func (s *suite) geometry(t *testing.T) {
	img := s.image(t)
	size, ss := img.Size(), img.SectorSize()
	if size < 0 {
		t.Fatalf("Size() = %d", size)
	}
	if ss < 512 || ss&(ss-1) != 0 {
		t.Fatalf("SectorSize() = %d, want a power of two >= 512", ss)
	}
	if img.Size() != size || img.SectorSize() != ss {
		t.Fatal("Size or SectorSize changed between calls")
	}
	if s.opts.Model != nil && int64(len(s.opts.Model)) != size {
		t.Fatalf("Size() = %d, Options.Model has %d bytes", size, len(s.opts.Model))
	}
	if d, ok := img.(disk.Describer); ok {
		info := d.Info()
		if info.VirtualSize != size {
			t.Errorf("Info().VirtualSize = %d, Size() = %d", info.VirtualSize, size)
		}
		if info.Format == "" {
			t.Error("Info().Format is empty")
		}
	}
}

func (s *suite) read(t *testing.T) {
	img := s.image(t)
	ref := s.reference(t, img)
	r := s.rng(t, 1)
	size := img.Size()
	for i := 0; i < 200; i++ {
		off, n := randRange(r, size)
		got := make([]byte, n)
		if m, err := img.ReadAt(got, off); err != nil || m != int(n) {
			t.Fatalf("read %d: ReadAt(%d bytes at %d) = %d, %v", i, n, off, m, err)
		}
		if ref != nil {
			wantEqual(t, fmt.Sprintf("read %d", i), off, got, ref[off:off+n])
			continue
		}
		// No reference: the same range read in other pieces must agree.
		chunk := 1 + r.Int64N(max(n, 1))
		wantEqual(t, fmt.Sprintf("read %d in %d-byte pieces", i, chunk), off, readRange(t, img, off, n, chunk), got)
	}
	if size > 0 {
		// A read of exactly the last byte and of the whole first sector.
		last := make([]byte, 1)
		if _, err := img.ReadAt(last, size-1); err != nil {
			t.Fatalf("ReadAt(1 byte at %d): %v", size-1, err)
		}
		if ref != nil && last[0] != ref[size-1] {
			t.Fatalf("last byte = %#x, want %#x", last[0], ref[size-1])
		}
	}
	if m, err := img.ReadAt(nil, size); m != 0 || err != nil {
		t.Fatalf("ReadAt(0 bytes at Size) = %d, %v; want 0, nil", m, err)
	}
}

func (s *suite) parallelRead(t *testing.T) {
	img := s.image(t)
	ref := s.reference(t, img)
	size := img.Size()
	if ref == nil {
		// Sample a window to use as the reference.
		ref = readRange(t, img, 0, min(size, s.opts.MaxRead), 1<<20)
		size = int64(len(ref))
	}
	const workers, reads = 8, 64
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := 0; w < workers; w++ {
		r := s.rng(t, 100+uint64(w))
		wg.Go(func() {
			buf := make([]byte, 1<<20)
			for i := 0; i < reads; i++ {
				off, n := randRange(r, size)
				if m, err := img.ReadAt(buf[:n], off); err != nil || m != int(n) {
					errs <- fmt.Errorf("worker %d read %d: ReadAt(%d at %d) = %d, %v", w, i, n, off, m, err)
					return
				}
				if !bytes.Equal(buf[:n], ref[off:off+n]) {
					errs <- fmt.Errorf("worker %d read %d: %d bytes at %d differ from the reference", w, i, n, off)
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
}

func (s *suite) outOfRange(t *testing.T) {
	img := s.image(t)
	size := img.Size()
	cases := []struct {
		name string
		off  int64
		n    int
	}{
		{"at end", size, 1},
		{"straddles end", size - 1, 2},
		{"past end", size + 512, 512},
		{"negative", -1, 1},
		{"negative empty", -1, 0},
		{"huge offset", math.MaxInt64, 1},
		{"huge offset empty", math.MaxInt64, 0},
		{"overflow", math.MaxInt64 - 1, 4},
	}
	for _, c := range cases {
		buf := make([]byte, c.n)
		if _, err := img.ReadAt(buf, c.off); !errors.Is(err, disk.ErrOutOfRange) {
			t.Errorf("%s: ReadAt(%d bytes at %d) error = %v, want ErrOutOfRange", c.name, c.n, c.off, err)
		}
		_, err := img.WriteAt(buf, c.off)
		if !errors.Is(err, disk.ErrOutOfRange) && !(s.opts.ReadOnly && errors.Is(err, disk.ErrReadOnly)) {
			t.Errorf("%s: WriteAt(%d bytes at %d) error = %v, want ErrOutOfRange", c.name, c.n, c.off, err)
		}
		okErr := func(err error) bool {
			return errors.Is(err, disk.ErrOutOfRange) || errors.Is(err, disk.ErrNotSupported) ||
				(s.opts.ReadOnly && errors.Is(err, disk.ErrReadOnly))
		}
		if err := disk.Discard(img, c.off, int64(c.n)); !okErr(err) {
			t.Errorf("%s: Discard(%d, %d) error = %v, want ErrOutOfRange", c.name, c.off, c.n, err)
		}
		if err := disk.WriteZeroes(img, c.off, int64(c.n), 0); !okErr(err) {
			t.Errorf("%s: WriteZeroes(%d, %d) error = %v, want ErrOutOfRange", c.name, c.off, c.n, err)
		}
		if c.n > 0 {
			if _, err := disk.Map(img, c.off, int64(c.n)); !errors.Is(err, disk.ErrOutOfRange) {
				t.Errorf("%s: Map(%d, %d) error = %v, want ErrOutOfRange", c.name, c.off, c.n, err)
			}
		}
	}
}

// checkExtents checks that the extents of img cover [0, Size) in order
// and that (sampled) StatusZero ranges read as zeros. It returns them.
func (s *suite) checkExtents(t *testing.T, img disk.Image) []disk.Extent {
	t.Helper()
	size := img.Size()
	var list []disk.Extent
	next := int64(0)
	err := disk.Extents(img, 0, size, func(e disk.Extent) error {
		if e.Offset != next || e.Length <= 0 || e.Length > size-e.Offset {
			return fmt.Errorf("extent %+v after %d bytes covered (disk size %d)", e, next, size)
		}
		if e.Status&disk.StatusData != 0 && e.Status&disk.StatusAllocated == 0 {
			return fmt.Errorf("extent %+v has data but is not allocated", e)
		}
		next = e.Offset + e.Length
		list = append(list, e)
		return nil
	})
	if err != nil {
		t.Fatalf("Extents: %v", err)
	}
	if next != size {
		t.Fatalf("extents cover [0, %d), disk size %d", next, size)
	}
	budget := s.opts.MaxRead
	for _, e := range list {
		if e.Status&disk.StatusZero == 0 || budget <= 0 {
			continue
		}
		for _, r := range [][2]int64{
			{e.Offset, min(e.Length, 1<<20)},
			{e.Offset + e.Length - min(e.Length, 1<<20), min(e.Length, 1<<20)},
		} {
			b := readRange(t, img, r[0], r[1], 1<<20)
			budget -= r[1]
			if i := bytes.IndexFunc(b, func(c rune) bool { return c != 0 }); i >= 0 {
				t.Fatalf("extent %+v is StatusZero but byte %d is not zero", e, r[0]+int64(i))
			}
		}
	}
	return list
}

func (s *suite) extents(t *testing.T) {
	img := s.image(t)
	s.checkExtents(t, img)
	r := s.rng(t, 2)
	size := img.Size()
	for i := 0; i < 100 && size > 0; i++ {
		off, n := randRange(r, size)
		if n == 0 {
			continue
		}
		e, err := disk.Map(img, off, n)
		if err != nil {
			t.Fatalf("Map(%d, %d): %v", off, n, err)
		}
		if e.Offset != off || e.Length <= 0 || e.Length > n {
			t.Fatalf("Map(%d, %d) = %+v", off, n, e)
		}
	}
}

// writeCheck writes data at off and checks, by reading a margin around
// it, that exactly that range changed. expected, if not nil, is the
// whole disk and is updated.
func writeCheck(t *testing.T, img disk.Image, what string, off int64, data, expected []byte) {
	t.Helper()
	size := img.Size()
	lo, hi := max(0, off-1024), min(size, off+int64(len(data))+1024)
	want := readRange(t, img, lo, hi-lo, 1<<20)
	copy(want[off-lo:], data)
	if m, err := img.WriteAt(data, off); err != nil || m != len(data) {
		t.Fatalf("%s: WriteAt(%d bytes at %d) = %d, %v", what, len(data), off, m, err)
	}
	wantEqual(t, what+": read back", lo, readRange(t, img, lo, hi-lo, 1<<20), want)
	if expected != nil {
		copy(expected[off:], data)
	}
}

func (s *suite) roundTrip(t *testing.T) {
	img := s.image(t)
	size := img.Size()
	if size == 0 {
		t.Skip("empty image")
	}
	expected := s.reference(t, img)
	r := s.rng(t, 3)
	type req struct{ off, n int64 }
	fixed := []req{
		{0, 512}, {1, 511}, {511, 2}, {0, 1}, {4095, 4098}, {512, 4096},
		{64<<10 - 100, 300}, {64<<10 - 512, 1024}, {2<<20 - 7, 14}, {1<<20 - 1, 64<<10 + 2},
		{size - 1, 1}, {size - 512, 512}, {size - 4097, 4097}, {size / 2, 0},
	}
	for i := 0; i < 50; i++ {
		off, n := randRange(r, size)
		fixed = append(fixed, req{off, n})
	}
	for i, q := range fixed {
		if q.off < 0 || q.off >= size {
			continue
		}
		q.n = min(q.n, size-q.off)
		data := make([]byte, q.n)
		fill(r, data)
		writeCheck(t, img, fmt.Sprintf("write %d", i), q.off, data, expected)
	}
	if err := img.Flush(); err != nil {
		t.Fatalf("Flush: %v", err)
	}
	if expected != nil {
		wantEqual(t, "whole disk after writes", 0, readRange(t, img, 0, size, 1<<20), expected)
	}
}

// zeroOp is one way of zeroing a range (Discard, which leaves unaligned
// parts alone, has its own case).
type zeroOp struct {
	name string
	do   func(img disk.Image, off, n int64) error
}

func (s *suite) zeroOps() []zeroOp {
	return []zeroOp{
		{"WriteZeroes", func(img disk.Image, off, n int64) error { return disk.WriteZeroes(img, off, n, 0) }},
		{"WriteZeroesNoUnmap", func(img disk.Image, off, n int64) error {
			return disk.WriteZeroes(img, off, n, disk.ZeroNoUnmap)
		}},
	}
}

func (s *suite) zeroes(t *testing.T) {
	for _, op := range s.zeroOps() {
		t.Run(op.name, func(t *testing.T) {
			img := s.image(t)
			size := img.Size()
			if size == 0 {
				t.Skip("empty image")
			}
			r := s.rng(t, 4)
			// Fill the start with data so that zeroing has something to do.
			head := min(size, 4<<20)
			data := make([]byte, head)
			fill(r, data)
			if _, err := img.WriteAt(data, 0); err != nil {
				t.Fatalf("WriteAt: %v", err)
			}
			type req struct{ off, n int64 }
			reqs := []req{{0, 512}, {4096, 64 << 10}, {1000, 3000}, {100<<10 + 7, 300<<10 + 5}, {size / 2, 0}, {size - 1, 1}}
			for i := 0; i < 20; i++ {
				off, n := randRange(r, head)
				reqs = append(reqs, req{off, n})
			}
			for i, q := range reqs {
				if q.off < 0 || q.off >= size {
					continue
				}
				q.n = min(q.n, size-q.off)
				lo, hi := max(0, q.off-1024), min(size, q.off+q.n+1024)
				want := readRange(t, img, lo, hi-lo, 1<<20)
				err := op.do(img, q.off, q.n)
				if errors.Is(err, disk.ErrNotSupported) {
					if i == 0 {
						t.Skipf("%s: %v", op.name, err)
					}
					t.Fatalf("%s(%d, %d): ErrNotSupported after earlier calls succeeded: %v", op.name, q.off, q.n, err)
				}
				if err != nil {
					t.Fatalf("%s(%d, %d): %v", op.name, q.off, q.n, err)
				}
				got := readRange(t, img, lo, hi-lo, 1<<20)
				clear(want[q.off-lo : q.off-lo+q.n])
				wantEqual(t, fmt.Sprintf("%s %d", op.name, i), lo, got, want)
			}
			if err := img.Flush(); err != nil {
				t.Fatalf("Flush: %v", err)
			}
		})
	}
}

func (s *suite) extentsAfterWrites(t *testing.T) {
	img := s.image(t)
	size := img.Size()
	if size == 0 {
		t.Skip("empty image")
	}
	r := s.rng(t, 5)
	var written [][2]int64
	for i := 0; i < 20; i++ {
		off, n := randRange(r, size)
		data := make([]byte, n)
		fill(r, data)
		data = bytes.ReplaceAll(data, []byte{0}, []byte{1}) // no zero byte: never StatusZero
		if _, err := img.WriteAt(data, off); err != nil {
			t.Fatalf("WriteAt: %v", err)
		}
		written = append(written, [2]int64{off, n})
		if i%3 == 2 {
			off, n = randRange(r, size)
			if err := disk.WriteZeroes(img, off, n, 0); err != nil && !errors.Is(err, disk.ErrNotSupported) {
				t.Fatalf("WriteZeroes: %v", err)
			}
			if err := disk.Discard(img, off, n); err != nil && !errors.Is(err, disk.ErrNotSupported) {
				t.Fatalf("Discard: %v", err)
			}
			written = append(written, [2]int64{-1, 0})
		}
	}
	list := s.checkExtents(t, img)
	// The last write must not be reported as zeros (earlier ones may have
	// been zeroed since).
	last := written[len(written)-1]
	if last[0] < 0 {
		last = written[len(written)-2]
	}
	for _, e := range list {
		if e.Status&disk.StatusZero != 0 && e.Offset < last[0]+last[1] && last[0] < e.Offset+e.Length {
			t.Fatalf("extent %+v is StatusZero but overlaps data written at [%d, %d)", e, last[0], last[0]+last[1])
		}
	}
}
