package hostfiletest

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
)

// MemBlockSize is the allocation granularity of a MemFile: like a file
// system block, a write allocates whole blocks and PunchHole frees only the
// blocks it covers entirely (it zeroes the rest).
const MemBlockSize = 4096

// MemMaxSize bounds a MemFile's length (1 TiB). Storage is sparse, so a
// large size costs nothing until written; the bound only turns a wild
// offset into an error instead of an overflow.
const MemMaxSize = 1 << 40

// ErrMemTooLarge is returned by a MemFile write or truncate that would make
// the file longer than MemMaxSize.
var ErrMemTooLarge = errors.New("hostfiletest: memory file larger than MemMaxSize")

// MemFile is an in-memory host file that can be "crashed". It keeps two
// states: the current content, which reads see, and the durable content as
// of the last Sync. Crash returns a new MemFile holding only the durable
// content, as a power cut would leave the disk; CrashKeeping also keeps a
// chosen subset of the unsynced operations, modelling a disk that wrote
// some of them (each one whole) before the cut.
//
// Content is stored sparsely in MemBlockSize blocks; unwritten blocks are
// holes, reported by SeekData and SeekHole.
//
// A MemFile implements disk.File, disk.HolePuncher, disk.ZeroRanger and
// disk.DataSeeker. It is safe for concurrent use.
type MemFile struct {
	name string

	mu      sync.Mutex
	cur     memState // what reads see
	durable memState // as of the last Sync
	pending []memOp  // operations since the last Sync, in order
	closed  bool
}

// memState is a sparse file image.
type memState struct {
	size   int64
	blocks map[int64][]byte // block index -> MemBlockSize bytes
}

type memOpKind uint8

const (
	memWrite memOpKind = iota
	memTruncate
	memPunch
	memZeroRange
)

// memOp is one unsynced mutation, kept so that a crash can replay it.
type memOp struct {
	kind memOpKind
	off  int64
	n    int64  // length (punch, zero range) or new size (truncate)
	data []byte // write payload (a private copy)
	// synced: made durable by itself (WriteAtSync): every crash keeps
	// it, replayed in order with the unsynced operations kept.
	synced bool
}

// NewMemFile returns a MemFile named name whose current and durable
// content is a copy of content (every block allocated).
func NewMemFile(name string, content []byte) *MemFile {
	m := &MemFile{name: name, cur: memState{blocks: map[int64][]byte{}}}
	m.cur.write(content, 0)
	m.durable = m.cur.clone()
	return m
}

// ReadAt implements io.ReaderAt with os.File's semantics: a read reaching
// past the end returns the bytes up to it and io.EOF.
func (m *MemFile) ReadAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return 0, m.errClosed("read")
	}
	if off < 0 {
		return 0, &os.PathError{Op: "read", Path: m.name, Err: errors.New("negative offset")}
	}
	if off >= m.cur.size {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	n := int(min(int64(len(p)), m.cur.size-off))
	m.cur.read(p[:n], off)
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// WriteAt implements io.WriterAt; a write past the end extends the file,
// leaving a hole before it.
func (m *MemFile) WriteAt(p []byte, off int64) (int, error) {
	return m.writeAt(p, off, false)
}

// writeAt implements WriteAt and WriteAtSync (synced).
func (m *MemFile) writeAt(p []byte, off int64, synced bool) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return 0, m.errClosed("write")
	}
	if off < 0 || off > MemMaxSize || int64(len(p)) > MemMaxSize-off {
		return 0, &os.PathError{Op: "write", Path: m.name, Err: ErrMemTooLarge}
	}
	m.cur.write(p, off)
	m.pending = append(m.pending, memOp{kind: memWrite, off: off, data: append([]byte(nil), p...), synced: synced})
	return len(p), nil
}

// WriteAtSync is WriteAt whose write is durable when it returns (as
// pwritev2 with RWF_DSYNC): every later crash keeps it, whatever becomes
// of the unsynced operations before it.
func (m *MemFile) WriteAtSync(p []byte, off int64) (int, error) {
	return m.writeAt(p, off, true)
}

// Size returns the current length.
func (m *MemFile) Size() (int64, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return 0, m.errClosed("stat")
	}
	return m.cur.size, nil
}

// Sync makes every operation so far durable.
func (m *MemFile) Sync() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return m.errClosed("sync")
	}
	for _, op := range m.pending {
		m.durable.apply(op)
	}
	m.pending = nil
	return nil
}

// Truncate sets the length; growing adds a hole.
func (m *MemFile) Truncate(size int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return m.errClosed("truncate")
	}
	if size < 0 || size > MemMaxSize {
		return &os.PathError{Op: "truncate", Path: m.name, Err: ErrMemTooLarge}
	}
	op := memOp{kind: memTruncate, n: size}
	m.cur.apply(op)
	m.pending = append(m.pending, op)
	return nil
}

// Close marks the file closed; later calls fail with os.ErrClosed. Close
// does not sync: unsynced operations stay pending, and Crash still works.
func (m *MemFile) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return m.errClosed("close")
	}
	m.closed = true
	return nil
}

// Name returns the name given to NewMemFile.
func (m *MemFile) Name() string { return m.name }

// PunchHole makes [off, off+n) read as zeros without changing the size,
// freeing the blocks it covers entirely.
func (m *MemFile) PunchHole(off, n int64) error {
	return m.rangeOp("punch", memPunch, off, n)
}

// ZeroRange makes [off, off+n) read as zeros without changing the size;
// the range stays allocated.
func (m *MemFile) ZeroRange(off, n int64) error {
	return m.rangeOp("zero_range", memZeroRange, off, n)
}

func (m *MemFile) rangeOp(name string, kind memOpKind, off, n int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return m.errClosed(name)
	}
	if off < 0 || n < 0 || off > MemMaxSize || n > MemMaxSize-off {
		return &os.PathError{Op: name, Path: m.name, Err: fmt.Errorf("bad range %d+%d", off, n)}
	}
	op := memOp{kind: kind, off: off, n: n}
	m.cur.apply(op)
	m.pending = append(m.pending, op)
	return nil
}

// SeekData returns the first offset at or after off that lies in an
// allocated block, or io.EOF if there is none before the end.
func (m *MemFile) SeekData(off int64) (int64, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return 0, m.errClosed("seek_data")
	}
	if off < 0 {
		return 0, &os.PathError{Op: "seek_data", Path: m.name, Err: errors.New("negative offset")}
	}
	if off >= m.cur.size {
		return 0, io.EOF
	}
	first := int64(-1)
	for idx := range m.cur.blocks {
		if idx*MemBlockSize+MemBlockSize > off && (first < 0 || idx < first) {
			first = idx
		}
	}
	if first < 0 || first*MemBlockSize >= m.cur.size {
		return 0, io.EOF
	}
	return max(off, first*MemBlockSize), nil
}

// SeekHole returns the first offset at or after off that lies in a hole,
// or the size if there is none; off at or past the end yields io.EOF (the
// ENXIO of lseek).
func (m *MemFile) SeekHole(off int64) (int64, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return 0, m.errClosed("seek_hole")
	}
	if off < 0 {
		return 0, &os.PathError{Op: "seek_hole", Path: m.name, Err: errors.New("negative offset")}
	}
	if off >= m.cur.size {
		return 0, io.EOF
	}
	idx := off / MemBlockSize
	if _, ok := m.cur.blocks[idx]; !ok {
		return off, nil
	}
	for {
		idx++
		if idx*MemBlockSize >= m.cur.size {
			return m.cur.size, nil
		}
		if _, ok := m.cur.blocks[idx]; !ok {
			return idx * MemBlockSize, nil
		}
	}
}

// Bytes returns a copy of the current content.
func (m *MemFile) Bytes() []byte {
	m.mu.Lock()
	defer m.mu.Unlock()
	b := make([]byte, m.cur.size)
	m.cur.read(b, 0)
	return b
}

// DurableBytes returns a copy of the content a crash would leave at the
// least: as of the last Sync, with the writes made by WriteAtSync since.
func (m *MemFile) DurableBytes() []byte {
	st := m.crashState(func(int) bool { return false })
	b := make([]byte, st.size)
	st.read(b, 0)
	return b
}

// Pending returns the number of operations (writes, truncates, hole
// punches) since the last Sync; CrashKeeping numbers them 0..Pending()-1.
func (m *MemFile) Pending() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.pending)
}

// Crash returns a new, open MemFile holding what a power cut would leave:
// the content as of the last Sync. m itself is unchanged.
func (m *MemFile) Crash() *MemFile {
	return m.CrashKeeping(func(int) bool { return false })
}

// CrashKeeping is Crash, except that the unsynced operations i for which
// keep(i) is true are also applied, in their original order, on top of the
// durable content (with the writes WriteAtSync made durable).
func (m *MemFile) CrashKeeping(keep func(i int) bool) *MemFile {
	st := m.crashState(keep)
	return &MemFile{name: m.name, cur: st, durable: st.clone()}
}

// crashState returns the durable content with the pending operations
// that keep selects, and those made durable by WriteAtSync, applied in
// order.
func (m *MemFile) crashState(keep func(i int) bool) memState {
	m.mu.Lock()
	defer m.mu.Unlock()
	st := m.durable.clone()
	for i, op := range m.pending {
		if op.synced || keep(i) {
			st.apply(op)
		}
	}
	return st
}

func (m *MemFile) errClosed(op string) error {
	return &os.PathError{Op: op, Path: m.name, Err: os.ErrClosed}
}

func (s *memState) clone() memState {
	c := memState{size: s.size, blocks: make(map[int64][]byte, len(s.blocks))}
	for idx, b := range s.blocks {
		c.blocks[idx] = append([]byte(nil), b...)
	}
	return c
}

func (s *memState) apply(op memOp) {
	switch op.kind {
	case memWrite:
		s.write(op.data, op.off)
	case memTruncate:
		s.truncate(op.n)
	case memPunch:
		s.zero(op.off, op.n, true)
	case memZeroRange:
		s.zero(op.off, op.n, false)
	}
}

// read fills p from off; p must lie within the size.
func (s *memState) read(p []byte, off int64) {
	for len(p) > 0 {
		idx, in := off/MemBlockSize, off%MemBlockSize
		k := min(int64(len(p)), MemBlockSize-in)
		if b, ok := s.blocks[idx]; ok {
			copy(p[:k], b[in:])
		} else {
			clear(p[:k])
		}
		p, off = p[k:], off+k
	}
}

func (s *memState) write(p []byte, off int64) {
	if len(p) == 0 {
		return
	}
	s.size = max(s.size, off+int64(len(p)))
	for len(p) > 0 {
		idx, in := off/MemBlockSize, off%MemBlockSize
		k := min(int64(len(p)), MemBlockSize-in)
		b, ok := s.blocks[idx]
		if !ok {
			b = make([]byte, MemBlockSize)
			s.blocks[idx] = b
		}
		copy(b[in:], p[:k])
		p, off = p[k:], off+k
	}
}

// zero makes [off, off+n) ∩ [0, size) read as zeros; with punch it frees
// the blocks covered entirely.
func (s *memState) zero(off, n int64, punch bool) {
	end := min(off+n, s.size)
	for off < end {
		idx, in := off/MemBlockSize, off%MemBlockSize
		k := min(end-off, MemBlockSize-in)
		if b, ok := s.blocks[idx]; ok {
			if punch && k == MemBlockSize {
				delete(s.blocks, idx)
			} else {
				clear(b[in : in+k])
			}
		} else if !punch {
			s.blocks[idx] = make([]byte, MemBlockSize)
		}
		off += k
	}
}

func (s *memState) truncate(size int64) {
	if size < s.size {
		last := (size + MemBlockSize - 1) / MemBlockSize // first block wholly past the end
		for idx := range s.blocks {
			if idx >= last {
				delete(s.blocks, idx)
			}
		}
		if in := size % MemBlockSize; in != 0 {
			if b, ok := s.blocks[size/MemBlockSize]; ok {
				clear(b[in:])
			}
		}
	}
	s.size = size
}
