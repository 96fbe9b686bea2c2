package disktest

import (
	"fmt"
	"sync"

	"github.com/imgloop/imgloop/disk"
)

// Model is the simplest disk.Image: a byte slice, with the allocation of
// each unit of ModelOptions.DiscardAlignment tracked as a raw file on a
// file system tracks its blocks. It implements the whole export API as
// the reference the conformance suite and differential tests hold drivers
// to:
//
//   - WriteAt (and WriteAtFUA) allocates the units it touches;
//   - Discard deallocates the whole units of its range, which then read
//     as zeros, and leaves the unaligned head and tail as they are (the
//     disk's last unit, when partial, counts as whole for a range that
//     reaches the end of the disk);
//   - WriteZeroes zeroes any range at once (it is always fast: ZeroFast
//     never fails), deallocating the whole units unless ZeroNoUnmap is
//     set, which allocates them instead;
//   - Map reports allocated units as data and the others as zeros;
//   - Resize changes the size at once, even with calls in flight, and
//     NotifyResize reports it;
//   - Close waits for the calls in flight; later calls get ErrClosed.
//
// Flushes and FUA cost nothing: a model is always durable. It is safe for
// concurrent use.
type Model struct {
	opts ModelOptions

	// resizeMu orders each Resize with its notification, so that
	// watchers see sizes in the order they took effect.
	resizeMu sync.Mutex
	watchers disk.SizeWatchers

	mu     sync.RWMutex
	data   []byte
	alloc  []bool // per unit of opts.DiscardAlignment: allocated
	closed bool
}

// ModelOptions configure a Model; the zero value gives the defaults.
type ModelOptions struct {
	// DiscardAlignment is the model's allocation unit: the unit Discard
	// deallocates and Map reports. A power of two; 0 means 4096.
	DiscardAlignment int64
	// ReadOnly makes every write-like call fail with disk.ErrReadOnly
	// (Flush succeeds), as an image opened read-only does.
	ReadOnly bool
}

var (
	_ disk.Image          = (*Model)(nil)
	_ disk.Discarder      = (*Model)(nil)
	_ disk.ZeroWriter     = (*Model)(nil)
	_ disk.Mapper         = (*Model)(nil)
	_ disk.Limiter        = (*Model)(nil)
	_ disk.Capabler       = (*Model)(nil)
	_ disk.FUAWriter      = (*Model)(nil)
	_ disk.Resizer        = (*Model)(nil)
	_ disk.ResizeNotifier = (*Model)(nil)
)

// NewModel returns a writable model of size zero bytes, all unallocated,
// with the default options.
func NewModel(size int64) *Model { return NewModelWith(make([]byte, size), ModelOptions{}) }

// NewModelFrom returns a writable model holding a copy of content, with
// the default options.
func NewModelFrom(content []byte) *Model { return NewModelWith(content, ModelOptions{}) }

// NewModelWith returns a model holding a copy of content. The units of
// content that are all zeros start unallocated, the others allocated. It
// panics if opts.DiscardAlignment is not a power of two.
func NewModelWith(content []byte, opts ModelOptions) *Model {
	if opts.DiscardAlignment == 0 {
		opts.DiscardAlignment = 4096
	}
	if a := opts.DiscardAlignment; a < 0 || a&(a-1) != 0 {
		panic(fmt.Sprintf("disktest: ModelOptions.DiscardAlignment %d is not a power of two", a))
	}
	m := &Model{opts: opts, data: append([]byte(nil), content...)}
	m.alloc = make([]bool, m.units(int64(len(m.data))))
	for u := range m.alloc {
		lo, hi := m.unitRange(int64(u))
		for _, c := range m.data[lo:hi] {
			if c != 0 {
				m.alloc[u] = true
				break
			}
		}
	}
	return m
}

// Bytes returns a copy of the model's content.
func (m *Model) Bytes() []byte {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return append([]byte(nil), m.data...)
}

// Limits returns the model's block limits: any byte range for reads,
// writes and zeroing, DiscardAlignment as the preferred size and the
// unit of discard.
func (m *Model) Limits() disk.Limits {
	return disk.Limits{
		MinTransfer:       1,
		PreferredTransfer: max(512, m.opts.DiscardAlignment),
		MaxTransfer:       disk.DefaultMaxTransfer,
		DiscardAlignment:  m.opts.DiscardAlignment,
		ZeroAlignment:     1,
	}
}

// Capabilities returns what the model does: everything but backing
// depth, or, read-only, only reads and the extent map.
func (m *Model) Capabilities() disk.Capabilities {
	if m.opts.ReadOnly {
		return disk.Capabilities{ReadOnly: true, Extents: true}
	}
	return disk.Capabilities{Flush: true, Discard: true, Zero: true, FUA: true, Resize: true, Extents: true}
}

// ReadAt reads len(p) bytes at off.
func (m *Model) ReadAt(p []byte, off int64) (int, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if err := m.check("read", off, int64(len(p))); err != nil {
		return 0, err
	}
	return copy(p, m.data[off:]), nil
}

// WriteAt writes p at off.
func (m *Model) WriteAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.checkWrite("write", off, int64(len(p))); err != nil {
		return 0, err
	}
	m.allocate(off, int64(len(p)))
	return copy(m.data[off:], p), nil
}

// WriteAtFUA is WriteAt: a model is always durable.
func (m *Model) WriteAtFUA(p []byte, off int64) (int, error) { return m.WriteAt(p, off) }

// Discard deallocates the whole units of [off, off+n): they read as
// zeros. The rest of the range is left as it is.
func (m *Model) Discard(off, n int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.checkWrite("discard", off, n); err != nil {
		return err
	}
	a, b := m.wholeUnits(off, n)
	m.deallocate(a, b)
	return nil
}

// WriteZeroes zeroes [off, off+n): the whole units are deallocated, or,
// with disk.ZeroNoUnmap, allocated; the partial ones keep their
// allocation. ZeroFast and ZeroFUA make no difference to a model.
func (m *Model) WriteZeroes(off, n int64, flags disk.ZeroFlags) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.checkWrite("write zeroes", off, n); err != nil {
		return err
	}
	clear(m.data[off : off+n])
	if flags&disk.ZeroNoUnmap != 0 {
		m.allocate(off, n)
		return nil
	}
	a, b := m.wholeUnits(off, n)
	m.deallocate(a, b)
	return nil
}

// Map returns the extent at off, at most n bytes long: allocated units
// as StatusData, the others as StatusZero, both StatusAllocated (the
// model defines every byte) at depth 0, without a host offset.
func (m *Model) Map(off, n int64) (disk.Extent, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if err := m.check("map", off, n); err != nil {
		return disk.Extent{}, err
	}
	if n == 0 {
		return disk.Extent{}, fmt.Errorf("model: map: %w: empty request at %d", disk.ErrOutOfRange, off)
	}
	a := m.opts.DiscardAlignment
	u := off / a
	state := m.alloc[u]
	end := off + n
	next := (u + 1) * a
	for next < end && m.alloc[next/a] == state {
		next += a
	}
	e := disk.Extent{Offset: off, Length: min(next, end) - off, HostOffset: -1}
	if state {
		e.Status = disk.StatusData | disk.StatusAllocated
	} else {
		e.Status = disk.StatusZero | disk.StatusAllocated
	}
	return e, nil
}

// Resize sets the size: growing adds unallocated zeros, shrinking drops
// the end. It waits for the calls in flight; calls that start meanwhile
// wait for it. The watchers are called after it, in order.
func (m *Model) Resize(size int64) error {
	m.resizeMu.Lock()
	defer m.resizeMu.Unlock()
	if err := m.resize(size); err != nil {
		return err
	}
	m.watchers.Notify(size)
	return nil
}

func (m *Model) resize(size int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.checkWrite("resize", 0, 0); err != nil {
		return err
	}
	if size < 0 {
		return fmt.Errorf("model: resize: negative size %d", size)
	}
	old := int64(len(m.data))
	if size < old {
		m.data = m.data[:size]
		m.alloc = m.alloc[:m.units(size)]
		return nil
	}
	m.data = append(m.data, make([]byte, size-old)...)
	m.alloc = append(m.alloc, make([]bool, m.units(size)-int64(len(m.alloc)))...)
	return nil
}

// NotifyResize calls fn with the new size after each successful Resize.
func (m *Model) NotifyResize(fn func(size int64)) (stop func()) { return m.watchers.Add(fn) }

// Size returns the model's size.
func (m *Model) Size() int64 {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return int64(len(m.data))
}

// SectorSize returns 512.
func (m *Model) SectorSize() int { return 512 }

// Flush does nothing but check for Close.
func (m *Model) Flush() error {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.check("flush", 0, 0)
}

// Close waits for the calls in flight and marks the model closed; its
// content stays readable with Bytes.
func (m *Model) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return fmt.Errorf("model: close: %w", disk.ErrClosed)
	}
	m.closed = true
	return nil
}

// check is called with m.mu held.
func (m *Model) check(op string, off, n int64) error {
	if m.closed {
		return fmt.Errorf("model: %s: %w", op, disk.ErrClosed)
	}
	if err := disk.CheckRange(off, n, int64(len(m.data))); err != nil {
		return fmt.Errorf("model: %s: %w", op, err)
	}
	return nil
}

// checkWrite is check for the write-like calls.
func (m *Model) checkWrite(op string, off, n int64) error {
	if m.closed {
		return fmt.Errorf("model: %s: %w", op, disk.ErrClosed)
	}
	if m.opts.ReadOnly {
		return fmt.Errorf("model: %s: %w", op, disk.ErrReadOnly)
	}
	return m.check(op, off, n)
}

// units returns how many allocation units a disk of size bytes has.
func (m *Model) units(size int64) int64 {
	a := m.opts.DiscardAlignment
	return (size + a - 1) / a
}

// unitRange returns the bytes of unit u, cut at the end of the disk.
func (m *Model) unitRange(u int64) (lo, hi int64) {
	a := m.opts.DiscardAlignment
	return u * a, min((u+1)*a, int64(len(m.data)))
}

// wholeUnits returns the units [a, b) wholly inside [off, off+n); a
// range reaching the end of the disk covers its last, partial unit.
func (m *Model) wholeUnits(off, n int64) (a, b int64) {
	al := m.opts.DiscardAlignment
	end := off + n
	a, b = (off+al-1)/al, end/al
	if end == int64(len(m.data)) {
		b = (end + al - 1) / al
	}
	return a, b
}

// allocate marks the units [off, off+n) touches allocated.
func (m *Model) allocate(off, n int64) {
	if n == 0 {
		return
	}
	al := m.opts.DiscardAlignment
	for u := off / al; u <= (off+n-1)/al; u++ {
		m.alloc[u] = true
	}
}

// deallocate zeroes and deallocates the units [a, b).
func (m *Model) deallocate(a, b int64) {
	for u := a; u < b; u++ {
		lo, hi := m.unitRange(u)
		clear(m.data[lo:hi])
		m.alloc[u] = false
	}
}
