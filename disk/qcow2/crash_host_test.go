package qcow2_test

// The crash sweeps' host-file layers: a plain in-memory file, and a recorder
// of mutating host operations that can replay them (see crash_test.go).

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"

	"github.com/imgloop/imgloop/disk/hostfile/hostfiletest"
)

// crashBuf is a plain in-memory disk.File (no crash model): the cheap
// file the surviving bytes are reopened and checked in.
type crashBuf struct {
	name   string
	mu     sync.Mutex
	b      []byte
	closed bool
}

func (c *crashBuf) ReadAt(p []byte, off int64) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if off < 0 {
		return 0, errors.New("crashBuf: negative offset")
	}
	if off >= int64(len(c.b)) {
		return 0, io.EOF
	}
	n := copy(p, c.b[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (c *crashBuf) WriteAt(p []byte, off int64) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return 0, os.ErrClosed
	}
	if off < 0 || off+int64(len(p)) > hostfiletest.MemMaxSize {
		return 0, errors.New("crashBuf: bad offset")
	}
	if end := off + int64(len(p)); end > int64(len(c.b)) {
		c.b = append(c.b, make([]byte, end-int64(len(c.b)))...)
	}
	return copy(c.b[off:], p), nil
}

func (c *crashBuf) Size() (int64, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return int64(len(c.b)), nil
}

func (c *crashBuf) Sync() error { return nil }

func (c *crashBuf) Truncate(size int64) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if size < 0 || size > hostfiletest.MemMaxSize {
		return errors.New("crashBuf: bad size")
	}
	if size <= int64(len(c.b)) {
		c.b = c.b[:size]
	} else {
		c.b = append(c.b, make([]byte, size-int64(len(c.b)))...)
	}
	return nil
}

func (c *crashBuf) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	return nil
}

func (c *crashBuf) Name() string { return c.name }

// crashHostOp is one mutating host file operation.
type crashHostOp struct {
	kind   hostfiletest.Op // OpWrite, OpSync, OpTruncate, OpPunchHole, OpZeroRange
	off, n int64
	data   []byte
}

// crashRecorder wraps a MemFile and logs its mutating operations.
type crashRecorder struct {
	*hostfiletest.MemFile
	mu  sync.Mutex
	ops []crashHostOp
}

func (c *crashRecorder) log(op crashHostOp) {
	c.mu.Lock()
	c.ops = append(c.ops, op)
	c.mu.Unlock()
}

// count is the number of operations logged so far.
func (c *crashRecorder) count() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.ops)
}

func (c *crashRecorder) WriteAt(p []byte, off int64) (int, error) {
	n, err := c.MemFile.WriteAt(p, off)
	if err == nil {
		c.log(crashHostOp{kind: hostfiletest.OpWrite, off: off, data: append([]byte(nil), p...)})
	}
	return n, err
}

func (c *crashRecorder) Sync() error {
	err := c.MemFile.Sync()
	if err == nil {
		c.log(crashHostOp{kind: hostfiletest.OpSync})
	}
	return err
}

func (c *crashRecorder) Truncate(size int64) error {
	err := c.MemFile.Truncate(size)
	if err == nil {
		c.log(crashHostOp{kind: hostfiletest.OpTruncate, n: size})
	}
	return err
}

func (c *crashRecorder) PunchHole(off, n int64) error {
	err := c.MemFile.PunchHole(off, n)
	if err == nil {
		c.log(crashHostOp{kind: hostfiletest.OpPunchHole, off: off, n: n})
	}
	return err
}

func (c *crashRecorder) ZeroRange(off, n int64) error {
	err := c.MemFile.ZeroRange(off, n)
	if err == nil {
		c.log(crashHostOp{kind: hostfiletest.OpZeroRange, off: off, n: n})
	}
	return err
}

// replay applies op to m.
func (op *crashHostOp) replay(m *hostfiletest.MemFile) error {
	switch op.kind {
	case hostfiletest.OpWrite:
		_, err := m.WriteAt(op.data, op.off)
		return err
	case hostfiletest.OpSync:
		return m.Sync()
	case hostfiletest.OpTruncate:
		return m.Truncate(op.n)
	case hostfiletest.OpPunchHole:
		return m.PunchHole(op.off, op.n)
	case hostfiletest.OpZeroRange:
		return m.ZeroRange(op.off, op.n)
	}
	return fmt.Errorf("unknown op %v", op.kind)
}
