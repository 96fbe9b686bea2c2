package raw

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"

	"github.com/imgloop/imgloop/disk"
)

// Name is the driver's format name.
const Name = "raw"

// sectorSize is the logical sector size raw images present.
const sectorSize = 512

// Driver is the raw format driver.
type Driver struct{}

func init() { disk.MustRegister(Driver{}) }

// Name returns "raw".
func (Driver) Name() string { return Name }

// Probe returns 1 for every header: raw is the fallback format.
func (Driver) Probe(header []byte) int { return 1 }

// Open opens f as a raw image (see the package Open).
func (Driver) Open(f disk.File, opts disk.OpenOptions) (disk.Image, error) {
	return Open(f, opts)
}

// Image is an open raw image. Its methods are safe for concurrent use.
type Image struct {
	f        disk.File
	size     int64
	readOnly bool
	probed   bool
	closed   atomic.Bool

	// guard serialises the probing check with writes to the first sector
	// of a probed image; nothing else takes it.
	guard sync.Mutex
}

var (
	_ disk.Image      = (*Image)(nil)
	_ disk.Discarder  = (*Image)(nil)
	_ disk.ZeroWriter = (*Image)(nil)
	_ disk.Mapper     = (*Image)(nil)
	_ disk.Describer  = (*Image)(nil)
)

// Open returns a raw image over f, whose virtual size is f's size now. On
// success the image owns f; on error the caller still does. It fails if
// the file's size cannot be read, and with an *disk.UnsupportedError if
// opts names an internal snapshot (raw has none).
func Open(f disk.File, opts disk.OpenOptions) (*Image, error) {
	if opts.Snapshot != "" {
		return nil, &disk.UnsupportedError{Format: Name, Feature: "internal snapshots"}
	}
	size, err := f.Size()
	if err != nil {
		return nil, fmt.Errorf("raw: size of %s: %w", f.Name(), err)
	}
	return &Image{f: f, size: size, readOnly: opts.ReadOnly, probed: opts.Probed}, nil
}

// Size returns the virtual disk size: the host file's size at Open.
func (img *Image) Size() int64 { return img.size }

// SectorSize returns 512.
func (img *Image) SectorSize() int { return sectorSize }

// Info describes the image for `imgloop info`.
func (img *Image) Info() disk.Info {
	return disk.Info{Format: Name, VirtualSize: img.size}
}

// ReadAt reads len(p) bytes at off. Errors: disk.ErrClosed,
// disk.ErrOutOfRange, io.ErrUnexpectedEOF when the file has shrunk, and
// the host file's errors.
func (img *Image) ReadAt(p []byte, off int64) (int, error) {
	if img.closed.Load() {
		return 0, fmt.Errorf("raw: read: %w", disk.ErrClosed)
	}
	if err := disk.CheckRange(off, int64(len(p)), img.size); err != nil {
		return 0, fmt.Errorf("raw: read: %w", err)
	}
	n, err := img.f.ReadAt(p, off)
	if n == len(p) {
		return n, nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	return n, img.hostErr("read", off+int64(n), err)
}

// WriteAt writes p at off. Errors: disk.ErrClosed, disk.ErrReadOnly,
// disk.ErrOutOfRange, ErrProbedFormatChange, and the host file's errors.
func (img *Image) WriteAt(p []byte, off int64) (int, error) {
	if err := img.checkWrite("write", off, int64(len(p))); err != nil {
		return 0, err
	}
	if img.probed && off < sectorSize && len(p) > 0 {
		img.guard.Lock()
		defer img.guard.Unlock()
		if err := img.checkProbe(off, p, int64(len(p))); err != nil {
			return 0, err
		}
	}
	n, err := img.f.WriteAt(p, off)
	if err != nil {
		return n, img.hostErr("write", off+int64(n), err)
	}
	if n < len(p) {
		return n, img.hostErr("write", off+int64(n), io.ErrShortWrite)
	}
	return n, nil
}

// Flush makes completed writes durable (the host file's Sync; nothing for
// a read-only image). Errors: disk.ErrClosed and the host file's errors.
func (img *Image) Flush() error {
	if img.closed.Load() {
		return fmt.Errorf("raw: flush: %w", disk.ErrClosed)
	}
	if img.readOnly {
		return nil
	}
	if err := img.f.Sync(); err != nil {
		return img.hostErr("flush", -1, err)
	}
	return nil
}

// Close flushes and closes the host file; a second Close returns
// disk.ErrClosed. The file is closed even when the flush fails, and the
// flush error is returned.
func (img *Image) Close() error {
	if !img.closed.CompareAndSwap(false, true) {
		return fmt.Errorf("raw: close: %w", disk.ErrClosed)
	}
	var ferr error
	if !img.readOnly {
		if err := img.f.Sync(); err != nil {
			ferr = img.hostErr("flush", -1, err)
		}
	}
	if err := img.f.Close(); err != nil && ferr == nil {
		ferr = img.hostErr("close", -1, err)
	}
	return ferr
}

// checkWrite validates a mutation of [off, off+n).
func (img *Image) checkWrite(op string, off, n int64) error {
	if img.closed.Load() {
		return fmt.Errorf("raw: %s: %w", op, disk.ErrClosed)
	}
	if img.readOnly {
		return fmt.Errorf("raw: %s: %w", op, disk.ErrReadOnly)
	}
	if err := disk.CheckRange(off, n, img.size); err != nil {
		return fmt.Errorf("raw: %s: %w", op, err)
	}
	return nil
}

// hostErr wraps an error of the host file with context. An I/O error that
// raced with Close is reported as disk.ErrClosed.
func (img *Image) hostErr(op string, off int64, err error) error {
	if img.closed.Load() && errors.Is(err, os.ErrClosed) {
		return fmt.Errorf("raw: %s: %w", op, disk.ErrClosed)
	}
	if off >= 0 {
		return fmt.Errorf("raw: %s %s at offset %d: %w", op, img.f.Name(), off, err)
	}
	return fmt.Errorf("raw: %s %s: %w", op, img.f.Name(), err)
}
