package hostfiletest

import (
	"errors"
	"fmt"
	"io"
	"sync"
)

// File is the method set of disk.File, repeated here because this package
// does not import disk. Every disk.File is a File and the reverse.
type File interface {
	io.ReaderAt
	io.WriterAt
	Size() (int64, error)
	Sync() error
	Truncate(size int64) error
	Close() error
	Name() string
}

// Op names a kind of file operation that a Faulty counts and can fail.
type Op int

// The operations a Faulty counts.
const (
	OpRead Op = iota
	OpWrite
	OpSync
	OpTruncate
	OpPunchHole
	OpZeroRange
	OpSeek // SeekData and SeekHole
	OpSize
	OpClose
	numOps
)

var opNames = [numOps]string{"read", "write", "sync", "truncate", "punch_hole", "zero_range", "seek", "size", "close"}

func (o Op) String() string {
	if o >= 0 && o < numOps {
		return opNames[o]
	}
	return fmt.Sprintf("Op(%d)", int(o))
}

// ErrInjected is the error a Faulty returns for a failure set up with a nil
// error.
var ErrInjected = errors.New("hostfiletest: injected fault")

// Faulty wraps a File, counts its operations by kind, and fails chosen
// ones: tests sweep every failure point by failing the i-th write (or
// sync, ...) for i = 0, 1, ... until the workload no longer reaches i.
//
// Faulty always has the optional methods (PunchHole, ZeroRange, SeekData,
// SeekHole); when the wrapped file lacks one it returns an error matching
// errors.ErrUnsupported, as the OS does for a file system without it.
//
// Faulty is safe for concurrent use; the wrapped file must be too.
type Faulty struct {
	f File

	mu    sync.Mutex
	count [numOps]int64
	rules [numOps]faultRule
}

type faultRule struct {
	set    bool
	at     int64 // index (0-based, per kind) of the first failing operation
	sticky bool  // fail every operation from at on, not only the one at at
	err    error
}

// NewFaulty wraps f; no operation fails until a rule is set.
func NewFaulty(f File) *Faulty { return &Faulty{f: f} }

// FailAfter lets the operations of kind op numbered 0..n-1 (counting from the Faulty's creation or last Reset) succeed and
// fails every later one with err (ErrInjected if nil), like a disk that
// died. The wrapped file is not called for a failed operation.
func (f *Faulty) FailAfter(op Op, n int64, err error) {
	f.setRule(op, faultRule{set: true, at: n, sticky: true, err: err})
}

// FailNth fails only the operation of kind op numbered n (0-based) with err
// (ErrInjected if nil); the ones before and after it succeed.
func (f *Faulty) FailNth(op Op, n int64, err error) {
	f.setRule(op, faultRule{set: true, at: n, err: err})
}

func (f *Faulty) setRule(op Op, r faultRule) {
	if r.err == nil {
		r.err = ErrInjected
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.rules[op] = r
}

// Reset clears every rule and counter.
func (f *Faulty) Reset() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.count = [numOps]int64{}
	f.rules = [numOps]faultRule{}
}

// Count returns how many operations of kind op were attempted (failed ones
// included).
func (f *Faulty) Count(op Op) int64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.count[op]
}

// Unwrap returns the wrapped file.
func (f *Faulty) Unwrap() File { return f.f }

// check counts one operation of kind op and returns the error it must
// fail with, or nil.
func (f *Faulty) check(op Op) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	i := f.count[op]
	f.count[op]++
	r := f.rules[op]
	if !r.set || i < r.at || (!r.sticky && i != r.at) {
		return nil
	}
	return fmt.Errorf("%s #%d on %s: %w", op, i, f.f.Name(), r.err)
}

// ReadAt implements io.ReaderAt.
func (f *Faulty) ReadAt(p []byte, off int64) (int, error) {
	if err := f.check(OpRead); err != nil {
		return 0, err
	}
	return f.f.ReadAt(p, off)
}

// WriteAt implements io.WriterAt.
func (f *Faulty) WriteAt(p []byte, off int64) (int, error) {
	if err := f.check(OpWrite); err != nil {
		return 0, err
	}
	return f.f.WriteAt(p, off)
}

// WriteAtSync writes durably to the wrapped file (its WriteAtSync, else a
// write and a Sync); it counts, and can fail, as a write and as a sync.
func (f *Faulty) WriteAtSync(p []byte, off int64) (int, error) {
	if err := f.check(OpWrite); err != nil {
		return 0, err
	}
	if err := f.check(OpSync); err != nil {
		return 0, err
	}
	if sw, ok := f.f.(interface {
		WriteAtSync(p []byte, off int64) (int, error)
	}); ok {
		return sw.WriteAtSync(p, off)
	}
	n, err := f.f.WriteAt(p, off)
	if err != nil {
		return n, err
	}
	return n, f.f.Sync()
}

// Size returns the wrapped file's size.
func (f *Faulty) Size() (int64, error) {
	if err := f.check(OpSize); err != nil {
		return 0, err
	}
	return f.f.Size()
}

// Sync syncs the wrapped file.
func (f *Faulty) Sync() error {
	if err := f.check(OpSync); err != nil {
		return err
	}
	return f.f.Sync()
}

// Truncate truncates the wrapped file.
func (f *Faulty) Truncate(size int64) error {
	if err := f.check(OpTruncate); err != nil {
		return err
	}
	return f.f.Truncate(size)
}

// Close closes the wrapped file. A failed Close still closes it, as
// close(2) releases the descriptor even when it reports an error.
func (f *Faulty) Close() error {
	err := f.check(OpClose)
	cerr := f.f.Close()
	if err != nil {
		return err
	}
	return cerr
}

// Name returns the wrapped file's name.
func (f *Faulty) Name() string { return f.f.Name() }

// PunchHole punches a hole in the wrapped file if it can.
func (f *Faulty) PunchHole(off, n int64) error {
	if err := f.check(OpPunchHole); err != nil {
		return err
	}
	if h, ok := f.f.(interface{ PunchHole(off, n int64) error }); ok {
		return h.PunchHole(off, n)
	}
	return fmt.Errorf("punch hole on %s: %w", f.f.Name(), errors.ErrUnsupported)
}

// CanPunchHole reports whether the wrapped file can punch holes.
func (f *Faulty) CanPunchHole() bool {
	if r, ok := f.f.(interface{ CanPunchHole() bool }); ok {
		return r.CanPunchHole()
	}
	_, ok := f.f.(interface{ PunchHole(off, n int64) error })
	return ok
}

// CanZeroRange reports whether the wrapped file can zero ranges.
func (f *Faulty) CanZeroRange() bool {
	if r, ok := f.f.(interface{ CanZeroRange() bool }); ok {
		return r.CanZeroRange()
	}
	_, ok := f.f.(interface{ ZeroRange(off, n int64) error })
	return ok
}

// ZeroRange zeroes a range of the wrapped file if it can.
func (f *Faulty) ZeroRange(off, n int64) error {
	if err := f.check(OpZeroRange); err != nil {
		return err
	}
	if z, ok := f.f.(interface{ ZeroRange(off, n int64) error }); ok {
		return z.ZeroRange(off, n)
	}
	return fmt.Errorf("zero range on %s: %w", f.f.Name(), errors.ErrUnsupported)
}

type dataSeeker interface {
	SeekData(off int64) (int64, error)
	SeekHole(off int64) (int64, error)
}

// SeekData forwards to the wrapped file if it can seek data.
func (f *Faulty) SeekData(off int64) (int64, error) {
	if err := f.check(OpSeek); err != nil {
		return 0, err
	}
	if s, ok := f.f.(dataSeeker); ok {
		return s.SeekData(off)
	}
	return 0, fmt.Errorf("seek data on %s: %w", f.f.Name(), errors.ErrUnsupported)
}

// SeekHole forwards to the wrapped file if it can seek holes.
func (f *Faulty) SeekHole(off int64) (int64, error) {
	if err := f.check(OpSeek); err != nil {
		return 0, err
	}
	if s, ok := f.f.(dataSeeker); ok {
		return s.SeekHole(off)
	}
	return 0, fmt.Errorf("seek hole on %s: %w", f.f.Name(), errors.ErrUnsupported)
}
