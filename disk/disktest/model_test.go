package disktest

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"runtime"
	"slices"
	"testing"
	"time"

	"github.com/imgloop/imgloop/disk"
)

func TestModelConformance(t *testing.T) {
	for _, size := range []int64{0, 1, 511, 4096, 1<<20 + 3} {
		content := make([]byte, size)
		fill(rand.New(rand.NewPCG(uint64(size), 1)), content)
		t.Run(fmt.Sprintf("%d bytes", size), func(t *testing.T) {
			Run(t, func(t *testing.T) disk.Image { return NewModelFrom(content) }, Options{Model: content})
		})
	}
	t.Run("no model", func(t *testing.T) {
		Run(t, func(t *testing.T) disk.Image { return NewModel(3 << 20) }, Options{Seed: 7})
	})
	content := make([]byte, 3<<20+1000)
	fill(rand.New(rand.NewPCG(2, 2)), content)
	clear(content[1<<20 : 2<<20]) // holes to discard over
	for _, c := range []struct {
		name string
		mo   ModelOptions
		opts Options
	}{
		{"read-only", ModelOptions{ReadOnly: true}, Options{ReadOnly: true, Model: content}},
		{"discard 512, sampled", ModelOptions{DiscardAlignment: 512}, Options{Model: content, MaxRead: 1 << 20}},
		{"discard 1MiB", ModelOptions{DiscardAlignment: 1 << 20}, Options{Model: content}},
	} {
		t.Run(c.name, func(t *testing.T) {
			Run(t, func(t *testing.T) disk.Image { return NewModelWith(content, c.mo) }, c.opts)
		})
	}
	// The parallel cases over a larger area than MaxRead.
	t.Run("ParallelSize", func(t *testing.T) {
		Run(t, func(t *testing.T) disk.Image { return NewModel(6 << 20) }, Options{ParallelSize: 5 << 20, MaxRead: 1 << 20})
	})
}

func TestModelDiscardAndMap(t *testing.T) {
	content := make([]byte, 10000)
	for i := range content {
		content[i] = 0xee
	}
	clear(content[4096:8192]) // unit 1 starts as a hole
	m := NewModelWith(content, ModelOptions{DiscardAlignment: 4096})
	extents := func() []disk.Extent {
		var list []disk.Extent
		if err := disk.Extents(m, 0, m.Size(), func(e disk.Extent) error { list = append(list, e); return nil }); err != nil {
			t.Fatal(err)
		}
		return list
	}
	data := disk.StatusData | disk.StatusAllocated
	hole := disk.StatusZero | disk.StatusAllocated
	want := []disk.Extent{
		{Offset: 0, Length: 4096, Status: data, HostOffset: -1},
		{Offset: 4096, Length: 4096, Status: hole, HostOffset: -1},
		{Offset: 8192, Length: 1808, Status: data, HostOffset: -1},
	}
	if got := extents(); !slices.Equal(got, want) {
		t.Fatalf("extents as opened:\n%+v\nwant\n%+v", got, want)
	}
	// No whole unit: nothing changes.
	if err := m.Discard(100, 4000); err != nil {
		t.Fatal(err)
	}
	if got := m.Bytes(); !bytes.Equal(got, content) {
		t.Fatal("a discard without a whole unit changed the model")
	}
	// [0, 4096) is whole; [8192, 10000) is the disk's last, partial
	// unit and the range reaches the end: whole too.
	if err := m.Discard(0, 5000); err != nil {
		t.Fatal(err)
	}
	if err := m.Discard(8000, 2000); err != nil {
		t.Fatal(err)
	}
	want = []disk.Extent{{Offset: 0, Length: 10000, Status: hole, HostOffset: -1}}
	if got := extents(); !slices.Equal(got, want) {
		t.Fatalf("extents after discards:\n%+v\nwant\n%+v", got, want)
	}
	if i := nonZero(m.Bytes()); i >= 0 {
		t.Fatalf("byte %d not zero after discarding every unit", i)
	}
	// A write allocates the units it touches; WriteZeroes with
	// ZeroNoUnmap allocates, without it deallocates whole units.
	if _, err := m.WriteAt([]byte{1}, 4095); err != nil {
		t.Fatal(err)
	}
	if err := m.WriteZeroes(8192, 100, disk.ZeroNoUnmap); err != nil {
		t.Fatal(err)
	}
	want = []disk.Extent{
		{Offset: 0, Length: 4096, Status: data, HostOffset: -1},
		{Offset: 4096, Length: 4096, Status: hole, HostOffset: -1},
		{Offset: 8192, Length: 1808, Status: data, HostOffset: -1},
	}
	if got := extents(); !slices.Equal(got, want) {
		t.Fatalf("extents after writes:\n%+v\nwant\n%+v", got, want)
	}
	if err := m.WriteZeroes(0, 4096, 0); err != nil {
		t.Fatal(err)
	}
	if e, err := m.Map(0, 100); err != nil || e.Status != hole {
		t.Fatalf("Map after WriteZeroes of a whole unit = %+v, %v", e, err)
	}
	// Resize grows with holes and notifies.
	var seen []int64
	stop := m.NotifyResize(func(size int64) { seen = append(seen, size) })
	if err := m.Resize(20000); err != nil {
		t.Fatal(err)
	}
	stop()
	if err := m.Resize(5000); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(seen, []int64{20000}) || m.Size() != 5000 {
		t.Fatalf("resize: watcher saw %v, size %d", seen, m.Size())
	}
	if err := m.Resize(-1); err == nil {
		t.Fatal("Resize(-1) succeeded")
	}
	// Read-only: every write-like call refused, reads and Flush work.
	ro := NewModelWith(content, ModelOptions{ReadOnly: true})
	for name, err := range map[string]error{
		"Discard":     ro.Discard(0, 4096),
		"WriteZeroes": ro.WriteZeroes(0, 4096, 0),
		"Resize":      ro.Resize(4096),
	} {
		if !errors.Is(err, disk.ErrReadOnly) {
			t.Errorf("%s on a read-only model: %v", name, err)
		}
	}
	if _, err := ro.WriteAtFUA([]byte{1}, 0); !errors.Is(err, disk.ErrReadOnly) {
		t.Errorf("WriteAtFUA on a read-only model: %v", err)
	}
	if err := ro.Flush(); err != nil {
		t.Errorf("Flush on a read-only model: %v", err)
	}
}

// TestModelCloseWaits checks that Close waits for a call in flight.
func TestModelCloseWaits(t *testing.T) {
	m := NewModel(4096)
	m.mu.RLock() // a call in flight
	closed := make(chan error, 1)
	go func() { closed <- m.Close() }()
	select {
	case <-closed:
		t.Fatal("Close returned with a call in flight")
	case <-time.After(50 * time.Millisecond):
	}
	m.mu.RUnlock()
	if err := <-closed; err != nil {
		t.Fatal(err)
	}
	if _, err := m.ReadAt(make([]byte, 1), 0); !errors.Is(err, disk.ErrClosed) {
		t.Fatalf("ReadAt after Close: %v", err)
	}
}

func TestRandomOpsModelAgainstModel(t *testing.T) {
	for seed := uint64(1); seed <= 3; seed++ {
		RandomOps(t, seed, NewModel(2<<20+100), NewModel(2<<20+100), 500)
	}
}

// brokenImage forgets one byte of every write: RandomOps must catch it.
type brokenImage struct{ *Model }

func (b brokenImage) WriteAt(p []byte, off int64) (int, error) {
	if len(p) > 1 {
		return b.Model.WriteAt(p[:len(p)-1], off)
	}
	return b.Model.WriteAt(p, off)
}

func TestRandomOpsCatchesDivergence(t *testing.T) {
	ft := &fakeT{TB: t}
	done := make(chan struct{})
	go func() {
		defer close(done)
		RandomOps(ft, 1, brokenImage{NewModel(1 << 20)}, NewModel(1<<20), 300)
	}()
	<-done
	if !ft.failed {
		t.Fatal("RandomOps did not notice a driver that drops bytes")
	}
}

// fakeT records a Fatal instead of failing the real test.
type fakeT struct {
	testing.TB
	failed bool
}

func (f *fakeT) Helper() {}
func (f *fakeT) Fatalf(format string, args ...any) {
	f.failed = true
	f.TB.Logf("(expected) "+format, args...)
	runtime.Goexit()
}
