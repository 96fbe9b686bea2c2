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
// Resize must not run concurrently with other calls on img. Errors:
// disk.ErrClosed, disk.ErrReadOnly, and the host file's errors (for
// example EFBIG past the file system's limit), wrapped.
func (img *Image) Resize(size int64) error {
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
	img.size = size
	if err := img.f.Sync(); err != nil {
		return img.hostErr("resize", -1, err)
	}
	return nil
}
