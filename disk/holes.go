package disk

import (
	"errors"
	"io"
)

// HostRun reports what the host file f holds at off: whether the run of
// bytes starting there is a hole (reads as zeros without stored data),
// and how long that run is, at most n bytes. It asks f's DataSeeker
// (SEEK_DATA / SEEK_HOLE), as QEMU's file-posix block status does; a
// range past the end of the file is a hole. known is false, with no
// error, when f cannot tell (no DataSeeker, or the file system does not
// support seeking data): callers then treat the range as data.
func HostRun(f File, off, n int64) (hole bool, length int64, known bool, err error) {
	ds, ok := f.(DataSeeker)
	if !ok || n <= 0 {
		return false, n, false, nil
	}
	data, err := ds.SeekData(off)
	switch {
	case errors.Is(err, io.EOF):
		return true, n, true, nil // a hole up to the end of the file, and past it
	case errors.Is(err, errors.ErrUnsupported):
		return false, n, false, nil
	case err != nil:
		return false, 0, false, err
	case data > off:
		return true, min(data-off, n), true, nil
	}
	end, err := ds.SeekHole(off)
	switch {
	case errors.Is(err, errors.ErrUnsupported), errors.Is(err, io.EOF):
		// io.EOF: the file shrank since SeekData; report data.
		return false, n, false, nil
	case err != nil:
		return false, 0, false, err
	case end > off:
		return false, min(end-off, n), true, nil
	}
	return false, n, true, nil
}
