package raw

import (
	"errors"
	"fmt"
	"io"

	"github.com/imgloop/imgloop/disk"
)

// ErrProbedFormatChange is returned (together with disk.ErrNotSupported,
// both match with errors.Is) for a write to the first sector of an image
// whose format was probed, when the write would make the image probe as
// another format. Open the image with Format "raw" to allow such writes.
var ErrProbedFormatChange = errors.New("write would change the probed format of a raw image")

// checkProbe reports whether writing data (or, if data is nil, zeros) over
// [off, off+n) would leave a first sector that Detect assigns to another
// driver or to a format without one. Only the first sector is guarded,
// as in QEMU: detection never rests on the rest of the file (see
// disk.Sample). The caller holds img.guard and has checked the range.
func (img *Image) checkProbe(off int64, data []byte, n int64) error {
	var sector [sectorSize]byte
	have := min(img.size.Load(), sectorSize)
	if m, err := img.f.ReadAt(sector[:have], 0); m < int(have) {
		if err == nil || errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return img.hostErr("read first sector", int64(m), err)
	}
	end := min(off+n, have)
	if data != nil {
		copy(sector[off:end], data)
	} else {
		clear(sector[off:end])
	}
	d, err := disk.Detect(sector[:have])
	var other string
	var ufe *disk.UnsupportedFormatError
	switch {
	case errors.As(err, &ufe):
		// A format without a driver (VMDK, LUKS, ...): QEMU's guard
		// refuses those too, and the image would no longer open.
		other = ufe.Format
	case err != nil || d.Name() == Name:
		// No driver claims the sector (raw is not registered, which
		// cannot happen once this package is imported) or raw wins.
		return nil
	default:
		other = d.Name()
	}
	return fmt.Errorf("raw: write at offset %d: sector 0 would probe as %q: %w: %w",
		off, other, ErrProbedFormatChange, disk.ErrNotSupported)
}
