package disktest

import (
	"fmt"
	"sync"

	"github.com/imgloop/imgloop/disk"
)

// Model is the simplest disk.Image: a byte slice. Discard and WriteZeroes
// make their range read as zeros. It is the reference for differential
// tests; it is safe for concurrent use.
type Model struct {
	mu     sync.RWMutex
	data   []byte
	closed bool
}

var (
	_ disk.Image      = (*Model)(nil)
	_ disk.Discarder  = (*Model)(nil)
	_ disk.ZeroWriter = (*Model)(nil)
)

// NewModel returns a model of size zero bytes.
func NewModel(size int64) *Model { return &Model{data: make([]byte, size)} }

// NewModelFrom returns a model holding a copy of content.
func NewModelFrom(content []byte) *Model {
	return &Model{data: append([]byte(nil), content...)}
}

// Bytes returns a copy of the model's content.
func (m *Model) Bytes() []byte {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return append([]byte(nil), m.data...)
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
	if err := m.check("write", off, int64(len(p))); err != nil {
		return 0, err
	}
	return copy(m.data[off:], p), nil
}

// modelUnit is the model's discard alignment (disk.LimitsOf's default).
const modelUnit = 4096

// Discard zeroes the whole modelUnit blocks of [off, off+n) (the last,
// partial block of the disk counts as whole), as disk.Discarder asks.
func (m *Model) Discard(off, n int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.check("discard", off, n); err != nil {
		return err
	}
	size := int64(len(m.data))
	a, b := (off+modelUnit-1)/modelUnit*modelUnit, (off+n)/modelUnit*modelUnit
	if off+n == size {
		b = size
	}
	if a < b {
		clear(m.data[a:b])
	}
	return nil
}

// WriteZeroes zeroes [off, off+n); flags make no difference to a model.
func (m *Model) WriteZeroes(off, n int64, _ disk.ZeroFlags) error {
	return m.zero("write zeroes", off, n)
}

func (m *Model) zero(op string, off, n int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.check(op, off, n); err != nil {
		return err
	}
	clear(m.data[off : off+n])
	return nil
}

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

// Close marks the model closed; its content stays readable with Bytes.
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
