package raw

import (
	"fmt"

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
	hole, length, _, err := disk.HostRun(img.f, off, n)
	if err != nil {
		return disk.Extent{}, img.hostErr("seek data", off, err)
	}
	e.Length = length
	if hole {
		e.Status = disk.StatusZero | disk.StatusAllocated
	}
	return e, nil
}
