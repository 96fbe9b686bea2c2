package raw

import (
	"fmt"

	"github.com/imgloop/imgloop/disk"
)

var _ disk.Resizer = (*Image)(nil)

// Resize sets the virtual size to size bytes by truncating the host file,
// as QEMU's raw driver does: growing adds a hole that reads as zeros,
// shrinking drops the data past the new end. Any size of zero bytes or
// more is accepted (raw images need not be a multiple of 512 bytes). The
// new length is synced before Resize returns.
//
// Resize waits for the calls in flight, and calls made meanwhile wait
// for it; afterwards the functions registered with NotifyResize are
// called with the new size. Errors: disk.ErrClosed, disk.ErrReadOnly,
// and the host file's errors (for example EFBIG past the file system's
// limit), wrapped.
func (img *Image) Resize(size int64) error {
	if img.closed.Load() {
		return fmt.Errorf("raw: resize: %w", disk.ErrClosed)
	}
	img.ops.Lock()
	err := img.resize(size)
	img.ops.Unlock()
	if err != nil {
		return err
	}
	img.resized.Notify(size)
	return nil
}

var _ disk.ResizeNotifier = (*Image)(nil)

// NotifyResize registers fn to be called after each successful Resize
// (disk.ResizeNotifier).
func (img *Image) NotifyResize(fn func(size int64)) (stop func()) { return img.resized.Add(fn) }

// resize is Resize under the exclusive side of img.ops.
func (img *Image) resize(size int64) error {
	if img.closed.Load() {
		return fmt.Errorf("raw: resize: %w", disk.ErrClosed)
	}
	if img.readOnly {
		return fmt.Errorf("raw: resize: %w", disk.ErrReadOnly)
	}
	if size < 0 {
		return fmt.Errorf("raw: resize: negative size %d", size)
	}
	if err := img.f.Truncate(size); err != nil {
		return img.hostErr("resize", -1, err)
	}
	img.size.Store(size)
	if err := img.f.Sync(); err != nil {
		return img.hostErr("resize", -1, err)
	}
	return nil
}
