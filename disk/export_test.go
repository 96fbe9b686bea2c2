package disk_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/imgloop/imgloop/disk"
)

// Fakes for the export helpers. bareImage (image_test.go) implements only
// disk.Image; the types below add one optional interface each, so that
// CapabilitiesOf's inference can be tested one interface at a time.

type discardImage struct{ bareImage }

func (discardImage) Discard(off, n int64) error { return nil }

type zeroImage struct{ bareImage }

func (zeroImage) WriteZeroes(off, n int64, flags disk.ZeroFlags) error { return nil }

type resizerImage struct{ bareImage }

func (resizerImage) Resize(size int64) error { return nil }

type notifierImage struct{ resizerImage }

func (notifierImage) NotifyResize(fn func(int64)) func() { return func() {} }

type fuaImage struct{ bareImage }

func (fuaImage) WriteAtFUA(p []byte, off int64) (int, error) { return len(p), nil }

type mapImage struct{ bareImage }

func (m mapImage) Map(off, n int64) (disk.Extent, error) {
	return disk.Extent{Offset: off, Length: n, Status: disk.StatusData, HostOffset: -1}, nil
}

// statedImage states its capabilities and limits, whatever it implements.
type statedImage struct {
	discardImage
	caps   disk.Capabilities
	limits disk.Limits
}

func (s statedImage) Capabilities() disk.Capabilities { return s.caps }
func (s statedImage) Limits() disk.Limits             { return s.limits }

// call is one call a recorder saw.
type call struct {
	op     string // "WriteAt", "WriteAtFUA", "Flush", "WriteZeroes", "Discard", "Map"
	off, n int64
	flags  disk.ZeroFlags
}

// recorder is an image that records the calls it gets, fails the ones
// fail names, and runs hook (if set) after each recorded call. It is safe
// for concurrent use (FlushContext flushes from a goroutine).
type recorder struct {
	size   int64
	limits disk.Limits
	fail   map[string]error
	hook   func(c call)

	mu    sync.Mutex
	calls []call
}

func (r *recorder) record(c call) error {
	r.mu.Lock()
	r.calls = append(r.calls, c)
	err := r.fail[c.op]
	r.mu.Unlock()
	if r.hook != nil {
		r.hook(c)
	}
	return err
}

// log returns the calls seen so far.
func (r *recorder) log() []call {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.calls)
}

func (r *recorder) ReadAt(p []byte, off int64) (int, error) { clear(p); return len(p), nil }
func (r *recorder) WriteAt(p []byte, off int64) (int, error) {
	if err := r.record(call{op: "WriteAt", off: off, n: int64(len(p))}); err != nil {
		return 0, err
	}
	return len(p), nil
}
func (r *recorder) Size() int64         { return r.size }
func (r *recorder) SectorSize() int     { return 512 }
func (r *recorder) Flush() error        { return r.record(call{op: "Flush"}) }
func (r *recorder) Close() error        { return nil }
func (r *recorder) Limits() disk.Limits { return r.limits }
func (r *recorder) WriteZeroes(off, n int64, flags disk.ZeroFlags) error {
	return r.record(call{op: "WriteZeroes", off: off, n: n, flags: flags})
}
func (r *recorder) Discard(off, n int64) error {
	return r.record(call{op: "Discard", off: off, n: n})
}

// fuaRecorder adds a native WriteAtFUA to a recorder.
type fuaRecorder struct{ *recorder }

func (f fuaRecorder) WriteAtFUA(p []byte, off int64) (int, error) {
	if err := f.record(call{op: "WriteAtFUA", off: off, n: int64(len(p))}); err != nil {
		return 0, err
	}
	return len(p), nil
}

// plainRecorder hides a recorder's optional interfaces (it is only an
// Image).
type plainRecorder struct{ r *recorder }

func (p plainRecorder) ReadAt(b []byte, off int64) (int, error)  { return p.r.ReadAt(b, off) }
func (p plainRecorder) WriteAt(b []byte, off int64) (int, error) { return p.r.WriteAt(b, off) }
func (p plainRecorder) Size() int64                              { return p.r.Size() }
func (p plainRecorder) SectorSize() int                          { return 512 }
func (p plainRecorder) Flush() error                             { return p.r.Flush() }
func (p plainRecorder) Close() error                             { return nil }

func TestLimitsOf(t *testing.T) {
	defaults := disk.Limits{MinTransfer: 1, PreferredTransfer: 4096, MaxTransfer: disk.DefaultMaxTransfer,
		DiscardAlignment: 4096, ZeroAlignment: 4096}
	full := disk.Limits{MinTransfer: 512, PreferredTransfer: 65536, MaxTransfer: 2 << 20,
		DiscardAlignment: 1 << 20, DiscardMax: 1 << 30, ZeroAlignment: 512, ZeroMax: 64 << 20}
	tests := []struct {
		name string
		img  disk.Image
		want disk.Limits
	}{
		{"no Limiter", bareImage{size: 1 << 20}, defaults},
		{"states nothing", statedImage{}, defaults},
		{"negative values are unstated", statedImage{limits: disk.Limits{MinTransfer: -1, PreferredTransfer: -4096,
			MaxTransfer: -1, DiscardAlignment: -1, ZeroAlignment: -1, DiscardMax: 0, ZeroMax: 0}}, defaults},
		{"everything passes through", statedImage{limits: full}, full},
		{"small minimum keeps preferred 4096", statedImage{limits: disk.Limits{MinTransfer: 512}},
			disk.Limits{MinTransfer: 512, PreferredTransfer: 4096, MaxTransfer: disk.DefaultMaxTransfer,
				DiscardAlignment: 4096, ZeroAlignment: 4096}},
		{"large minimum raises preferred", statedImage{limits: disk.Limits{MinTransfer: 8192}},
			disk.Limits{MinTransfer: 8192, PreferredTransfer: 8192, MaxTransfer: disk.DefaultMaxTransfer,
				DiscardAlignment: 8192, ZeroAlignment: 8192}},
		{"alignments default to preferred", statedImage{limits: disk.Limits{PreferredTransfer: 65536}},
			disk.Limits{MinTransfer: 1, PreferredTransfer: 65536, MaxTransfer: disk.DefaultMaxTransfer,
				DiscardAlignment: 65536, ZeroAlignment: 65536}},
		{"stated alignments kept", statedImage{limits: disk.Limits{DiscardAlignment: 512, ZeroAlignment: 1 << 20, ZeroMax: 1 << 30}},
			disk.Limits{MinTransfer: 1, PreferredTransfer: 4096, MaxTransfer: disk.DefaultMaxTransfer,
				DiscardAlignment: 512, ZeroAlignment: 1 << 20, ZeroMax: 1 << 30}},
		// The default preferred size must not exceed a stated maximum:
		// Min <= Preferred <= Max always.
		{"small maximum caps the default preferred", statedImage{limits: disk.Limits{MaxTransfer: 1024}},
			disk.Limits{MinTransfer: 1, PreferredTransfer: 1024, MaxTransfer: 1024,
				DiscardAlignment: 1024, ZeroAlignment: 1024}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := disk.LimitsOf(tt.img); got != tt.want {
				t.Fatalf("LimitsOf =\n%+v\nwant\n%+v", got, tt.want)
			}
		})
	}
}

func TestCapabilitiesOf(t *testing.T) {
	all := disk.Capabilities{Flush: true, Discard: true, Zero: true, FUA: true, Resize: true, Extents: true, Depth: true}
	tests := []struct {
		name string
		img  disk.Image
		want disk.Capabilities
	}{
		// Inferred from the interfaces the type implements.
		{"bare image", bareImage{}, disk.Capabilities{Flush: true}},
		{"Discarder", discardImage{}, disk.Capabilities{Flush: true, Discard: true}},
		{"ZeroWriter", zeroImage{}, disk.Capabilities{Flush: true, Zero: true}},
		{"Resizer without ResizeNotifier", resizerImage{}, disk.Capabilities{Flush: true}},
		{"Resizer and ResizeNotifier", notifierImage{}, disk.Capabilities{Flush: true, Resize: true}},
		{"Mapper", mapImage{}, disk.Capabilities{Flush: true, Extents: true}},
		{"FUAWriter", fuaImage{}, disk.Capabilities{Flush: true, FUA: true}},
		// Stated capabilities win over the interfaces.
		{"stated everything", statedImage{caps: all}, all},
		{"stated nothing on a Discarder", statedImage{}, disk.Capabilities{}},
		{"stated Discard only", statedImage{caps: disk.Capabilities{Discard: true}}, disk.Capabilities{Discard: true}},
		// Read-only masks every write-side capability, keeps the rest.
		{"read-only masks", statedImage{caps: disk.Capabilities{ReadOnly: true, Flush: true, Discard: true, Zero: true,
			FUA: true, Resize: true, Extents: true, Depth: true}},
			disk.Capabilities{ReadOnly: true, Extents: true, Depth: true}},
		{"read-only plain", statedImage{caps: disk.Capabilities{ReadOnly: true}}, disk.Capabilities{ReadOnly: true}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := disk.CapabilitiesOf(tt.img); got != tt.want {
				t.Fatalf("CapabilitiesOf =\n%+v\nwant\n%+v", got, tt.want)
			}
		})
	}
}

func TestWriteAtFlags(t *testing.T) {
	errWrite, errFlush, errFUA := errors.New("write failed"), errors.New("flush failed"), errors.New("fua failed")
	tests := []struct {
		name   string
		native bool // the image implements FUAWriter
		flags  disk.WriteFlags
		fail   map[string]error
		wantN  int
		err    error
		want   []string // the calls, in order
	}{
		{"no flags", false, 0, nil, 4, nil, []string{"WriteAt"}},
		{"no flags on a FUAWriter", true, 0, nil, 4, nil, []string{"WriteAt"}},
		{"FUA native", true, disk.WriteFUA, nil, 4, nil, []string{"WriteAtFUA"}},
		{"FUA native error", true, disk.WriteFUA, map[string]error{"WriteAtFUA": errFUA}, 0, errFUA, []string{"WriteAtFUA"}},
		{"FUA fallback", false, disk.WriteFUA, nil, 4, nil, []string{"WriteAt", "Flush"}},
		{"FUA fallback write error: no flush", false, disk.WriteFUA, map[string]error{"WriteAt": errWrite}, 0, errWrite, []string{"WriteAt"}},
		{"FUA fallback flush error", false, disk.WriteFUA, map[string]error{"Flush": errFlush}, 4, errFlush, []string{"WriteAt", "Flush"}},
		{"no flags write error", false, 0, map[string]error{"WriteAt": errWrite}, 0, errWrite, []string{"WriteAt"}},
		{"unknown flag bits are ignored", false, 1 << 7, nil, 4, nil, []string{"WriteAt"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := &recorder{size: 4096, fail: tt.fail}
			var img disk.Image = plainRecorder{r}
			if tt.native {
				img = fuaRecorder{r}
			}
			n, err := disk.WriteAtFlags(img, []byte("data"), 100, tt.flags)
			if n != tt.wantN || !errors.Is(err, tt.err) || (tt.err == nil && err != nil) {
				t.Errorf("WriteAtFlags = %d, %v; want %d, %v", n, err, tt.wantN, tt.err)
			}
			var ops []string
			for _, c := range r.log() {
				ops = append(ops, c.op)
				if c.op != "Flush" && (c.off != 100 || c.n != 4) {
					t.Errorf("%s(%d bytes at %d), want 4 bytes at 100", c.op, c.n, c.off)
				}
			}
			if !slices.Equal(ops, tt.want) {
				t.Errorf("calls %v, want %v", ops, tt.want)
			}
		})
	}
}

func TestZeroAndDiscardHelpers(t *testing.T) {
	tests := []struct {
		name  string
		do    func(img disk.Image) error
		img   disk.Image
		err   error
		notIs error // the error must not match this
	}{
		{"WriteZeroes, no ZeroWriter", func(img disk.Image) error { return disk.WriteZeroes(img, 0, 512, 0) },
			bareImage{size: 4096}, disk.ErrNotSupported, disk.ErrSlowZero},
		{"WriteZeroes NoUnmap, no ZeroWriter", func(img disk.Image) error { return disk.WriteZeroes(img, 0, 512, disk.ZeroNoUnmap) },
			bareImage{size: 4096}, disk.ErrNotSupported, disk.ErrSlowZero},
		{"WriteZeroes FUA, no ZeroWriter", func(img disk.Image) error { return disk.WriteZeroes(img, 0, 512, disk.ZeroFUA) },
			bareImage{size: 4096}, disk.ErrNotSupported, disk.ErrSlowZero},
		// ZeroFast asked not to fall back to writing zeros: the error
		// says "slow", and a caller testing for ErrNotSupported (to fall
		// back) must not match it.
		{"WriteZeroes ZeroFast, no ZeroWriter", func(img disk.Image) error { return disk.WriteZeroes(img, 0, 512, disk.ZeroFast) },
			bareImage{size: 4096}, disk.ErrSlowZero, disk.ErrNotSupported},
		{"WriteZeroes ZeroFast|NoUnmap|FUA, no ZeroWriter", func(img disk.Image) error {
			return disk.WriteZeroes(img, 0, 512, disk.ZeroFast|disk.ZeroNoUnmap|disk.ZeroFUA)
		}, bareImage{size: 4096}, disk.ErrSlowZero, disk.ErrNotSupported},
		{"WriteZeroes ZeroFast on a ZeroWriter", func(img disk.Image) error { return disk.WriteZeroes(img, 0, 512, disk.ZeroFast) },
			zeroImage{bareImage{size: 4096}}, nil, nil},
		{"Discard, no Discarder", func(img disk.Image) error { return disk.Discard(img, 0, 512) },
			bareImage{size: 4096}, disk.ErrNotSupported, nil},
		{"Discard on a Discarder", func(img disk.Image) error { return disk.Discard(img, 0, 512) },
			discardImage{bareImage{size: 4096}}, nil, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.do(tt.img)
			if !errors.Is(err, tt.err) || (tt.err == nil && err != nil) {
				t.Fatalf("error %v, want %v", err, tt.err)
			}
			if tt.notIs != nil && errors.Is(err, tt.notIs) {
				t.Fatalf("error %v matches %v", err, tt.notIs)
			}
		})
	}
	if errors.Is(disk.ErrSlowZero, disk.ErrNotSupported) || errors.Is(disk.ErrNotSupported, disk.ErrSlowZero) {
		t.Error("ErrSlowZero and ErrNotSupported match each other")
	}
	// The flags reach the driver unchanged.
	r := &recorder{size: 1 << 20}
	flags := disk.ZeroFast | disk.ZeroNoUnmap | disk.ZeroFUA
	if err := disk.WriteZeroes(r, 512, 1024, flags); err != nil {
		t.Fatal(err)
	}
	if got, want := r.log(), []call{{op: "WriteZeroes", off: 512, n: 1024, flags: flags}}; !slices.Equal(got, want) {
		t.Fatalf("calls %+v, want %+v", got, want)
	}
}

func TestSizeWatchers(t *testing.T) {
	var w disk.SizeWatchers // the zero value is ready
	w.Notify(1)             // no watchers: nothing happens
	var mu sync.Mutex
	got := map[string][]int64{}
	watch := func(name string) func() {
		return w.Add(func(size int64) {
			mu.Lock()
			defer mu.Unlock()
			got[name] = append(got[name], size)
		})
	}
	stopA := watch("a")
	stopB := watch("b")
	w.Notify(100)
	stopA()
	stopA() // a second stop does nothing
	w.Notify(200)
	stopC := watch("c")
	w.Notify(300)
	stopB()
	stopC()
	w.Notify(400)
	want := map[string][]int64{"a": {100}, "b": {100, 200, 300}, "c": {300}}
	for name, sizes := range want {
		if !slices.Equal(got[name], sizes) {
			t.Errorf("watcher %s saw %v, want %v", name, got[name], sizes)
		}
	}
	if len(got) != len(want) {
		t.Errorf("watchers %v, want %v", got, want)
	}

	// The same function added twice is two watchers.
	var n int
	var w2 disk.SizeWatchers
	fn := func(int64) { n++ }
	s1, s2 := w2.Add(fn), w2.Add(fn)
	w2.Notify(1)
	s1()
	w2.Notify(2)
	s2()
	w2.Notify(3)
	if n != 3 {
		t.Errorf("a function added twice was called %d times, want 3 (2 + 1)", n)
	}
}

// TestSizeWatchersConcurrent adds, notifies and stops from many goroutines
// at once: run under -race it checks SizeWatchers' locking. A watcher that
// is registered for a whole Notify call sees it.
func TestSizeWatchersConcurrent(t *testing.T) {
	var w disk.SizeWatchers
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for g := range 8 {
		wg.Go(func() {
			for i := range 200 {
				var seen []int64
				var mu sync.Mutex
				stop := w.Add(func(size int64) {
					mu.Lock()
					seen = append(seen, size)
					mu.Unlock()
				})
				size := int64(g*1000 + i)
				w.Notify(size)
				stop()
				mu.Lock()
				ok := slices.Contains(seen, size)
				mu.Unlock()
				if !ok {
					errs <- fmt.Errorf("goroutine %d: watcher missed Notify(%d) made while it was registered", g, size)
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
	// Everything was stopped: nothing is called any more.
	w.Add(func(int64) {})() // add and stop one more on the used set
	called := false
	stop := w.Add(func(int64) { called = true })
	stop()
	w.Notify(1)
	if called {
		t.Error("a stopped watcher was called")
	}
}

// pieces returns the [off, off+n) of the calls named op.
func pieces(calls []call, op string) [][2]int64 {
	var p [][2]int64
	for _, c := range calls {
		if c.op == op {
			p = append(p, [2]int64{c.off, c.n})
		}
	}
	return p
}

// checkPieces checks the properties of every split: the pieces cover
// [off, off+n) exactly and in order, none is longer than step, and every
// cut between two pieces is aligned (when an aligned cut fits in a step).
func checkPieces(t *testing.T, got [][2]int64, off, n, align, step int64) {
	t.Helper()
	next := off
	for i, p := range got {
		if p[0] != next {
			t.Fatalf("piece %d starts at %d, want %d (pieces %v)", i, p[0], next, got)
		}
		if p[1] > step {
			t.Fatalf("piece %d is %d bytes, more than the step %d", i, p[1], step)
		}
		if i > 0 && align <= step && p[0]%align != 0 {
			t.Fatalf("piece %d starts at %d, not a multiple of %d", i, p[0], align)
		}
		if i < len(got)-1 && p[1] <= 0 {
			t.Fatalf("piece %d is empty (pieces %v)", i, got)
		}
		next = p[0] + p[1]
	}
	if next != off+n {
		t.Fatalf("pieces end at %d, want %d", next, off+n)
	}
}

const gib = int64(1) << 30

func TestZeroContextPieces(t *testing.T) {
	tests := []struct {
		name        string
		limits      disk.Limits
		off, n      int64
		flags       disk.ZeroFlags
		want        [][2]int64
		wantFlags   disk.ZeroFlags // flags each piece gets
		wantFlushes int
	}{
		{"small range: one piece", disk.Limits{}, 100, 5000, 0, [][2]int64{{100, 5000}}, 0, 0},
		{"empty range: one empty call", disk.Limits{}, 4096, 0, 0, [][2]int64{{4096, 0}}, 0, 0},
		{"exactly a GiB", disk.Limits{}, 0, gib, 0, [][2]int64{{0, gib}}, 0, 0},
		{"GiB pieces, aligned", disk.Limits{}, 0, 3*gib + 4096, 0,
			[][2]int64{{0, gib}, {gib, gib}, {2 * gib, gib}, {3 * gib, 4096}}, 0, 0},
		{"odd head and tail", disk.Limits{}, 100, 2 * gib, 0,
			[][2]int64{{100, gib - 100}, {gib, gib}, {2 * gib, 100}}, 0, 0},
		{"ZeroMax", disk.Limits{ZeroAlignment: 4096, ZeroMax: 3 * 4096}, 1000, 10 * 4096, 0,
			[][2]int64{{1000, 3*4096 - 1000}, {3 * 4096, 3 * 4096}, {6 * 4096, 3 * 4096}, {9 * 4096, 4096 + 1000}}, 0, 0},
		{"ZeroMax not a multiple of the alignment", disk.Limits{ZeroAlignment: 4096, ZeroMax: 2*4096 + 100}, 0, 5 * 4096, 0,
			[][2]int64{{0, 2 * 4096}, {2 * 4096, 2 * 4096}, {4 * 4096, 4096}}, 0, 0},
		{"alignment larger than the GiB step", disk.Limits{ZeroAlignment: 2 * gib}, 0, 3 * gib, 0,
			[][2]int64{{0, gib}, {gib, gib}, {2 * gib, gib}}, 0, 0},
		{"NoUnmap passes to every piece", disk.Limits{ZeroAlignment: 512, ZeroMax: 1024}, 0, 2048, disk.ZeroNoUnmap,
			[][2]int64{{0, 1024}, {1024, 1024}}, disk.ZeroNoUnmap, 0},
		{"FUA: pieces without it, one Flush at the end", disk.Limits{ZeroAlignment: 512, ZeroMax: 1024}, 0, 3000,
			disk.ZeroFUA | disk.ZeroNoUnmap, [][2]int64{{0, 1024}, {1024, 1024}, {2048, 952}}, disk.ZeroNoUnmap, 1},
		{"Fast: one call, whatever the limits", disk.Limits{ZeroAlignment: 512, ZeroMax: 1024}, 100, 3 * gib,
			disk.ZeroFast, [][2]int64{{100, 3 * gib}}, disk.ZeroFast, 0},
		{"Fast with FUA: one call, the driver does the FUA", disk.Limits{ZeroMax: 1024}, 0, 5000,
			disk.ZeroFast | disk.ZeroFUA, [][2]int64{{0, 5000}}, disk.ZeroFast | disk.ZeroFUA, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := &recorder{size: 8 * gib, limits: tt.limits}
			if err := disk.ZeroContext(context.Background(), r, tt.off, tt.n, tt.flags); err != nil {
				t.Fatal(err)
			}
			calls := r.log()
			got := pieces(calls, "WriteZeroes")
			if !slices.Equal(got, tt.want) {
				t.Fatalf("pieces %v, want %v", got, tt.want)
			}
			if tt.flags&disk.ZeroFast == 0 {
				l := disk.LimitsOf(r)
				step := gib
				if l.ZeroMax > 0 {
					step = min(step, l.ZeroMax)
				}
				checkPieces(t, got, tt.off, tt.n, l.ZeroAlignment, step)
			}
			for _, c := range calls {
				if c.op == "WriteZeroes" && c.flags != tt.wantFlags {
					t.Errorf("piece at %d got flags %#x, want %#x", c.off, c.flags, tt.wantFlags)
				}
			}
			if f := len(pieces(calls, "Flush")); f != tt.wantFlushes {
				t.Errorf("%d Flush calls, want %d", f, tt.wantFlushes)
			}
			if tt.wantFlushes > 0 && calls[len(calls)-1].op != "Flush" {
				t.Errorf("the Flush is not the last call: %+v", calls)
			}
		})
	}
}

func TestDiscardContextPieces(t *testing.T) {
	tests := []struct {
		name   string
		limits disk.Limits
		off, n int64
		want   [][2]int64
	}{
		{"small range", disk.Limits{DiscardAlignment: 65536}, 1000, 5000, [][2]int64{{1000, 5000}}},
		{"GiB pieces, odd head and tail", disk.Limits{DiscardAlignment: 65536}, 65536 + 1, 2 * gib,
			[][2]int64{{65537, gib - 1}, {gib + 65536, gib}, {2*gib + 65536, 1}}},
		{"DiscardMax", disk.Limits{DiscardAlignment: 1 << 20, DiscardMax: 4 << 20}, 512, 9 << 20,
			[][2]int64{{512, 4<<20 - 512}, {4 << 20, 4 << 20}, {8 << 20, 1<<20 + 512}}},
		{"ZeroMax does not apply", disk.Limits{DiscardAlignment: 4096, ZeroMax: 4096}, 0, 3 * 4096,
			[][2]int64{{0, 3 * 4096}}},
		// The default alignment is the preferred transfer size.
		{"default alignment", disk.Limits{PreferredTransfer: 1 << 20, DiscardMax: 3<<20 + 100}, 100, 7 << 20,
			[][2]int64{{100, 3<<20 - 100}, {3 << 20, 3 << 20}, {6 << 20, 1<<20 + 100}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := &recorder{size: 8 * gib, limits: tt.limits}
			if err := disk.DiscardContext(context.Background(), r, tt.off, tt.n); err != nil {
				t.Fatal(err)
			}
			calls := r.log()
			got := pieces(calls, "Discard")
			if !slices.Equal(got, tt.want) {
				t.Fatalf("pieces %v, want %v", got, tt.want)
			}
			if len(got) != len(calls) {
				t.Fatalf("calls %+v: only Discards expected", calls)
			}
			l := disk.LimitsOf(r)
			step := gib
			if l.DiscardMax > 0 {
				step = min(step, l.DiscardMax)
			}
			checkPieces(t, got, tt.off, tt.n, l.DiscardAlignment, step)
		})
	}
	if err := disk.DiscardContext(context.Background(), bareImage{size: 1 << 20}, 0, 4096); !errors.Is(err, disk.ErrNotSupported) {
		t.Fatalf("DiscardContext without a Discarder = %v, want ErrNotSupported", err)
	}
}

// TestContextCancelStopsPieces cancels the context from inside the k-th
// piece: the helpers stop before the next one with the context's error.
func TestContextCancelStopsPieces(t *testing.T) {
	limits := disk.Limits{ZeroAlignment: 4096, ZeroMax: 4096, DiscardAlignment: 4096, DiscardMax: 4096}
	ops := []struct {
		name string
		op   string
		do   func(ctx context.Context, img disk.Image) error
	}{
		{"ZeroContext", "WriteZeroes", func(ctx context.Context, img disk.Image) error {
			return disk.ZeroContext(ctx, img, 0, 10*4096, 0)
		}},
		{"ZeroContext FUA", "WriteZeroes", func(ctx context.Context, img disk.Image) error {
			return disk.ZeroContext(ctx, img, 0, 10*4096, disk.ZeroFUA)
		}},
		{"DiscardContext", "Discard", func(ctx context.Context, img disk.Image) error {
			return disk.DiscardContext(ctx, img, 0, 10*4096)
		}},
	}
	for _, o := range ops {
		for _, k := range []int{0, 1, 3, 9} { // 0: cancelled before the call
			t.Run(fmt.Sprintf("%s/after %d", o.name, k), func(t *testing.T) {
				ctx, cancel := context.WithCancel(context.Background())
				defer cancel()
				var seen int
				r := &recorder{size: 1 << 20, limits: limits}
				r.hook = func(c call) {
					if c.op == o.op {
						seen++
						if seen == k {
							cancel()
						}
					}
				}
				if k == 0 {
					cancel()
				}
				err := o.do(ctx, r)
				if !errors.Is(err, context.Canceled) {
					t.Fatalf("error %v, want context.Canceled", err)
				}
				calls := r.log()
				if got := len(pieces(calls, o.op)); got != k {
					t.Fatalf("%d pieces done, want %d", got, k)
				}
				if f := len(pieces(calls, "Flush")); f != 0 {
					t.Fatalf("%d Flush calls after a cancel, want 0", f)
				}
			})
		}
	}
	// The last piece done, the cancel comes too late to stop anything
	// but ZeroFUA's flush.
	t.Run("ZeroContext FUA cancelled in the last piece", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		r := &recorder{size: 1 << 20, limits: limits}
		r.hook = func(c call) {
			if c.op == "WriteZeroes" && c.off == 9*4096 {
				cancel()
			}
		}
		if err := disk.ZeroContext(ctx, r, 0, 10*4096, disk.ZeroFUA); !errors.Is(err, context.Canceled) {
			t.Fatalf("error %v, want context.Canceled", err)
		}
	})
	t.Run("ZeroFast cancelled before", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		r := &recorder{size: 1 << 20, limits: limits}
		if err := disk.ZeroContext(ctx, r, 0, 10*4096, disk.ZeroFast); !errors.Is(err, context.Canceled) {
			t.Fatalf("error %v, want context.Canceled", err)
		}
		if calls := r.log(); len(calls) != 0 {
			t.Fatalf("calls %+v after a cancel, want none", calls)
		}
	})
	t.Run("deadline", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), -time.Second)
		defer cancel()
		r := &recorder{size: 1 << 20, limits: limits}
		if err := disk.DiscardContext(ctx, r, 0, 4096); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("error %v, want context.DeadlineExceeded", err)
		}
	})
}

func TestContextPieceErrors(t *testing.T) {
	boom := errors.New("boom")
	limits := disk.Limits{ZeroAlignment: 4096, ZeroMax: 4096, DiscardAlignment: 4096, DiscardMax: 4096}
	// The first piece fails: no second piece, no flush.
	r := &recorder{size: 1 << 20, limits: limits, fail: map[string]error{"WriteZeroes": boom}}
	if err := disk.ZeroContext(context.Background(), r, 0, 3*4096, disk.ZeroFUA); !errors.Is(err, boom) {
		t.Fatalf("ZeroContext = %v, want the piece's error", err)
	}
	if calls := r.log(); len(calls) != 1 {
		t.Fatalf("calls after a failed piece: %+v, want one", calls)
	}
	r = &recorder{size: 1 << 20, limits: limits, fail: map[string]error{"Discard": boom}}
	if err := disk.DiscardContext(context.Background(), r, 0, 3*4096); !errors.Is(err, boom) {
		t.Fatalf("DiscardContext = %v, want the piece's error", err)
	}
	if calls := r.log(); len(calls) != 1 {
		t.Fatalf("calls after a failed piece: %+v, want one", calls)
	}
	// ZeroFUA's flush fails.
	r = &recorder{size: 1 << 20, limits: limits, fail: map[string]error{"Flush": boom}}
	if err := disk.ZeroContext(context.Background(), r, 0, 3*4096, disk.ZeroFUA); !errors.Is(err, boom) {
		t.Fatalf("ZeroContext with a failing flush = %v, want the flush's error", err)
	}
	// ZeroContext without a ZeroWriter: ErrNotSupported, or ErrSlowZero
	// with ZeroFast.
	if err := disk.ZeroContext(context.Background(), bareImage{size: 1 << 20}, 0, 4096, 0); !errors.Is(err, disk.ErrNotSupported) {
		t.Fatalf("ZeroContext without a ZeroWriter = %v, want ErrNotSupported", err)
	}
	if err := disk.ZeroContext(context.Background(), bareImage{size: 1 << 20}, 0, 4096, disk.ZeroFast); !errors.Is(err, disk.ErrSlowZero) {
		t.Fatalf("ZeroContext(ZeroFast) without a ZeroWriter = %v, want ErrSlowZero", err)
	}
}

// blockingFlush is an image whose Flush waits for release.
type blockingFlush struct {
	bareImage
	started chan struct{}
	release chan struct{}
	err     error
}

func (b *blockingFlush) Flush() error {
	close(b.started)
	<-b.release
	return b.err
}

func TestFlushContext(t *testing.T) {
	boom := errors.New("boom")
	t.Run("background", func(t *testing.T) {
		r := &recorder{size: 4096, fail: map[string]error{"Flush": boom}}
		if err := disk.FlushContext(context.Background(), r); !errors.Is(err, boom) {
			t.Fatalf("FlushContext = %v, want the flush's error", err)
		}
		if n := len(r.log()); n != 1 {
			t.Fatalf("%d calls, want one Flush", n)
		}
	})
	t.Run("cancellable, not cancelled", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		r := &recorder{size: 4096}
		if err := disk.FlushContext(ctx, r); err != nil {
			t.Fatal(err)
		}
		r.fail = map[string]error{"Flush": boom}
		if err := disk.FlushContext(ctx, r); !errors.Is(err, boom) {
			t.Fatalf("FlushContext = %v, want the flush's error", err)
		}
	})
	t.Run("cancelled before", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		r := &recorder{size: 4096}
		if err := disk.FlushContext(ctx, r); !errors.Is(err, context.Canceled) {
			t.Fatalf("FlushContext = %v, want context.Canceled", err)
		}
		if calls := r.log(); len(calls) != 0 {
			t.Fatalf("calls %+v, want no Flush", calls)
		}
	})
	t.Run("cancelled while flushing returns at once", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		img := &blockingFlush{bareImage: bareImage{size: 4096}, started: make(chan struct{}), release: make(chan struct{})}
		done := make(chan error, 1)
		go func() { done <- disk.FlushContext(ctx, img) }()
		<-img.started
		cancel()
		select {
		case err := <-done:
			if !errors.Is(err, context.Canceled) {
				t.Fatalf("FlushContext = %v, want context.Canceled", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("FlushContext did not return on cancel while the flush was blocked")
		}
		close(img.release) // the flush finishes in the background
	})
}

// countingMapper maps fixed 1000-byte extents of alternating status and
// counts its Map calls.
type countingMapper struct {
	bareImage
	mu    sync.Mutex
	calls int
}

func (c *countingMapper) Map(off, n int64) (disk.Extent, error) {
	c.mu.Lock()
	c.calls++
	c.mu.Unlock()
	if err := disk.CheckRange(off, n, c.size); err != nil {
		return disk.Extent{}, err
	}
	s := disk.StatusData | disk.StatusAllocated
	if off/1000%2 == 1 {
		s = disk.StatusZero
	}
	return disk.Extent{Offset: off, Length: min(n, 1000-off%1000), Status: s, HostOffset: -1}, nil
}

func TestExtentsContext(t *testing.T) {
	t.Run("walks like Extents", func(t *testing.T) {
		img := &countingMapper{bareImage: bareImage{size: 10000}}
		var got, want []disk.Extent
		if err := disk.ExtentsContext(context.Background(), img, 500, 5000, func(e disk.Extent) error {
			got = append(got, e)
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		if err := disk.Extents(img, 500, 5000, func(e disk.Extent) error { want = append(want, e); return nil }); err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(got, want) || len(got) != 6 {
			t.Fatalf("ExtentsContext = %+v, Extents = %+v", got, want)
		}
	})
	t.Run("cancelled before", func(t *testing.T) {
		img := &countingMapper{bareImage: bareImage{size: 10000}}
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		called := false
		err := disk.ExtentsContext(ctx, img, 0, 10000, func(disk.Extent) error { called = true; return nil })
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("ExtentsContext = %v, want context.Canceled", err)
		}
		if called || img.calls != 0 {
			t.Fatalf("cancelled walk: fn called %v, %d Map calls", called, img.calls)
		}
	})
	t.Run("cancelled during the walk", func(t *testing.T) {
		img := &countingMapper{bareImage: bareImage{size: 10000}}
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		var got []disk.Extent
		err := disk.ExtentsContext(ctx, img, 0, 10000, func(e disk.Extent) error {
			got = append(got, e)
			if len(got) == 2 {
				cancel()
			}
			return nil
		})
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("ExtentsContext = %v, want context.Canceled", err)
		}
		// The second extent is delivered when Map has returned the
		// third: one more Map, then the walk stops.
		if len(got) != 2 || img.calls != 3 {
			t.Fatalf("after cancel: %d extents delivered, %d Map calls; want 2 and 3", len(got), img.calls)
		}
	})
	t.Run("image without Mapper", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		if err := disk.ExtentsContext(ctx, bareImage{size: 4096}, 0, 4096, func(disk.Extent) error { return nil }); !errors.Is(err, context.Canceled) {
			t.Fatalf("ExtentsContext = %v, want context.Canceled", err)
		}
	})
}
