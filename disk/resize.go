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
// Resize is safe to call while other calls are in flight: it waits for
// them, and calls that start meanwhile wait for it and then see the new
// size. After a successful Resize, images that implement ResizeNotifier
// call their watchers with the new size. Errors
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
