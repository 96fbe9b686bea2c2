package raw

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/disk/internal/gate"
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
	size     atomic.Int64
	readOnly bool
	probed   bool
	block    int64 // the host file system's block size
	closed   atomic.Bool
	// noPunch and noZeroRange are set once the host file refused to
	// punch a hole or zero a range (its file system cannot).
	noPunch, noZeroRange atomic.Bool

	// ops admits every call (shared); Close and Resize take it
	// exclusively, so that they wait for the calls in flight.
	ops gate.Gate
	// resized tells the resize watchers.
	resized disk.SizeWatchers

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
	_ disk.Limiter    = (*Image)(nil)
	_ disk.Capabler   = (*Image)(nil)
	_ disk.FUAWriter  = (*Image)(nil)
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
	img := &Image{f: f, readOnly: opts.ReadOnly, probed: opts.Probed, block: blockSize(f)}
	img.size.Store(size)
	return img, nil
}

// blockSize returns the block size of the file system holding f (its
// st_blksize), 4096 when it cannot tell.
func blockSize(f disk.File) int64 {
	if of, ok := f.(interface{ File() *os.File }); ok {
		if fi, err := of.File().Stat(); err == nil {
			if st, ok := fi.Sys().(*syscall.Stat_t); ok && st.Blksize > 0 && st.Blksize&(st.Blksize-1) == 0 {
				return int64(st.Blksize)
			}
		}
	}
	return 4096
}

// enter admits a call (see Image.ops); after Close it returns
// disk.ErrClosed, wrapped for op.
func (img *Image) enter(op string) (gate.Token, error) {
	if img.closed.Load() {
		return 0, fmt.Errorf("raw: %s: %w", op, disk.ErrClosed)
	}
	t := img.ops.Enter()
	if img.closed.Load() {
		img.ops.Exit(t)
		return 0, fmt.Errorf("raw: %s: %w", op, disk.ErrClosed)
	}
	return t, nil
}

// Size returns the virtual disk size: the host file's size at Open, or
// as set by Resize.
func (img *Image) Size() int64 { return img.size.Load() }

// Limits returns the image's block limits: any byte range can be read
// or written; the file system's block is the preferred size and the unit
// Discard punches.
func (img *Image) Limits() disk.Limits {
	return disk.Limits{
		MinTransfer:       1,
		PreferredTransfer: max(img.block, 512),
		MaxTransfer:       disk.DefaultMaxTransfer,
		DiscardAlignment:  img.block,
		ZeroAlignment:     img.block,
	}
}

// Capabilities says what the image does (disk.Capabler): opened
// read-write, it flushes, resizes, writes durably one write at a time
// where the host file can (FUA), and discards and zeroes where the host
// file can punch holes or zero ranges.
func (img *Image) Capabilities() disk.Capabilities {
	c := disk.Capabilities{ReadOnly: img.readOnly, Extents: true}
	if img.readOnly {
		return c
	}
	punch, zero := img.canPunch(), img.canZeroRange()
	_, syncs := img.f.(disk.SyncWriter)
	c.Flush, c.Resize, c.FUA = true, true, syncs
	c.Discard, c.Zero = punch, punch || zero
	return c
}

// SectorSize returns 512.
func (img *Image) SectorSize() int { return sectorSize }

// canPunch reports whether the host file punches holes, as far as is
// known (see disk.RangeOpsReporter).
func (img *Image) canPunch() bool {
	if _, ok := img.f.(disk.HolePuncher); !ok || img.noPunch.Load() {
		return false
	}
	if r, ok := img.f.(disk.RangeOpsReporter); ok {
		return r.CanPunchHole()
	}
	return true
}

// canZeroRange reports whether the host file zeroes ranges, as far as
// is known.
func (img *Image) canZeroRange() bool {
	if _, ok := img.f.(disk.ZeroRanger); !ok || img.noZeroRange.Load() {
		return false
	}
	if r, ok := img.f.(disk.RangeOpsReporter); ok {
		return r.CanZeroRange()
	}
	return true
}

// Info describes the image for `imgloop info`.
func (img *Image) Info() disk.Info {
	return disk.Info{Format: Name, VirtualSize: img.size.Load()}
}

// ReadAt reads len(p) bytes at off. Errors: disk.ErrClosed,
// disk.ErrOutOfRange, io.ErrUnexpectedEOF when the file has shrunk, and
// the host file's errors.
func (img *Image) ReadAt(p []byte, off int64) (int, error) {
	t, err := img.enter("read")
	if err != nil {
		return 0, err
	}
	defer img.ops.Exit(t)
	if err := disk.CheckRange(off, int64(len(p)), img.size.Load()); err != nil {
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
	return img.write(p, off, false)
}

// WriteAtFUA is WriteAt whose data is durable when it returns
// (disk.FUAWriter): only this write is synced (pwritev2 with RWF_DSYNC)
// where the host file can, else the file is synced after it.
func (img *Image) WriteAtFUA(p []byte, off int64) (int, error) {
	return img.write(p, off, true)
}

// write implements WriteAt and WriteAtFUA.
func (img *Image) write(p []byte, off int64, fua bool) (int, error) {
	t, err := img.enter("write")
	if err != nil {
		return 0, err
	}
	defer img.ops.Exit(t)
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
	var n int
	sw, direct := img.f.(disk.SyncWriter)
	if fua && direct {
		n, err = sw.WriteAtSync(p, off)
	} else {
		n, err = img.f.WriteAt(p, off)
	}
	if err == nil && n == len(p) && fua && !direct {
		if err := img.f.Sync(); err != nil {
			return n, img.hostErr("flush", -1, err)
		}
	}
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
	t, err := img.enter("flush")
	if err != nil {
		return err
	}
	defer img.ops.Exit(t)
	return img.flush()
}

// flush is Flush for a caller already admitted.
func (img *Image) flush() error {
	if img.readOnly {
		return nil
	}
	if err := img.f.Sync(); err != nil {
		return img.hostErr("flush", -1, err)
	}
	return nil
}

// Close waits for the calls in flight, then flushes and closes the host
// file; calls made after it, and a second Close, return disk.ErrClosed.
// The file is closed even when the flush fails, and the flush error is
// returned.
func (img *Image) Close() error {
	if !img.closed.CompareAndSwap(false, true) {
		return fmt.Errorf("raw: close: %w", disk.ErrClosed)
	}
	img.ops.Lock()
	defer img.ops.Unlock()
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

// checkWrite validates a mutation of [off, off+n) by an admitted call.
func (img *Image) checkWrite(op string, off, n int64) error {
	if img.readOnly {
		return fmt.Errorf("raw: %s: %w", op, disk.ErrReadOnly)
	}
	if err := disk.CheckRange(off, n, img.size.Load()); err != nil {
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
