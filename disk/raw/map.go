package raw

import (
	"errors"
	"fmt"
	"io"

	"github.com/imgloop/imgloop/disk"
)

// Map returns the extent at off, at most n bytes long, as `qemu-img map`
// reports raw files: holes of the host file (found with SEEK_DATA and
// SEEK_HOLE where the file offers them) are StatusZero|StatusAllocated,
// the rest StatusData|StatusAllocated; both at depth 0 with HostOffset =
// off in the host file. A file that cannot seek data maps as all data.
// Errors: disk.ErrClosed, disk.ErrOutOfRange (also for n == 0), and the
// host file's errors.
func (img *Image) Map(off, n int64) (disk.Extent, error) {
	t, err := img.enter("map")
	if err != nil {
		return disk.Extent{}, err
	}
	defer img.ops.Exit(t)
	if err := disk.CheckRange(off, n, img.size.Load()); err != nil || n == 0 {
		if err == nil {
			err = fmt.Errorf("%w: empty map request at %d", disk.ErrOutOfRange, off)
		}
		return disk.Extent{}, fmt.Errorf("raw: map: %w", err)
	}
	e := disk.Extent{Offset: off, Length: n, Status: disk.StatusData | disk.StatusAllocated,
		HostOffset: off, HostFile: img.f.Name()}
	ds, ok := img.f.(disk.DataSeeker)
	if !ok {
		return e, nil
	}
	data, err := ds.SeekData(off)
	switch {
	case errors.Is(err, io.EOF):
		// A hole up to the end of the file (or the file shrank).
		e.Status = disk.StatusZero | disk.StatusAllocated
		return e, nil
	case errors.Is(err, errors.ErrUnsupported):
		return e, nil
	case err != nil:
		return disk.Extent{}, img.hostErr("seek data", off, err)
	case data > off:
		e.Status = disk.StatusZero | disk.StatusAllocated
		e.Length = min(data-off, n)
		return e, nil
	}
	hole, err := ds.SeekHole(off)
	switch {
	case errors.Is(err, errors.ErrUnsupported), errors.Is(err, io.EOF):
		// io.EOF: the file shrank since SeekData; report data.
		return e, nil
	case err != nil:
		return disk.Extent{}, img.hostErr("seek hole", off, err)
	case hole > off:
		e.Length = min(hole-off, n)
	}
	return e, nil
}
