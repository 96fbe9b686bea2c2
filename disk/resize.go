package disk

import "fmt"

// Resizer is implemented by images whose virtual size can change (the
// seed's resize, qemu-img resize).
//
// Resize sets the virtual disk size to size bytes. Growing makes the new
// area read as zeros (or, where the format defines it so, as the backing
// file's data past the old end). Shrinking drops the end of the disk;
// drivers may refuse it when data lies past the new end (qcow2 does).
//
// Resize must not run concurrently with any other call on the same
// Image (reads and writes included): callers quiesce I/O first. Errors
// match ErrReadOnly for an image opened read-only, ErrClosed after
// Close, and ErrNotSupported (through *UnsupportedError) for images
// whose format features prevent the resize.
type Resizer interface {
	Resize(size int64) error
}

// Resize calls img's Resize, or returns an error matching
// ErrNotSupported when img cannot change size.
func Resize(img Image, size int64) error {
	if r, ok := img.(Resizer); ok {
		return r.Resize(size)
	}
	return fmt.Errorf("resize: %w", ErrNotSupported)
}
