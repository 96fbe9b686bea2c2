package disk

import (
	"io"
)

// File is the host file under a driver: the image file itself, a backing
// file, or an external data file. The hostfile package provides the OS
// implementation and test doubles (a crashable in-memory file, a wrapper
// that fails chosen operations).
type File interface {
	io.ReaderAt
	io.WriterAt
	// Size is the file's current length in bytes.
	Size() (int64, error)
	// Sync makes completed writes durable.
	Sync() error
	// Truncate sets the file's length.
	Truncate(size int64) error
	Close() error
	// Name is the file's path (for messages and for resolving relative
	// backing file names); "" for anonymous files.
	Name() string
}

// HolePuncher is implemented by files that can deallocate a range, which
// then reads as zeros (fallocate PUNCH_HOLE|KEEP_SIZE).
type HolePuncher interface {
	PunchHole(off, n int64) error
}

// DataSeeker is implemented by files that know where their holes are
// (lseek SEEK_DATA / SEEK_HOLE). SeekData returns the first data offset at
// or after off (io.EOF if none); SeekHole the first hole offset at or after
// off (the file size if there is none; io.EOF if off is at or past the end).
type DataSeeker interface {
	SeekData(off int64) (int64, error)
	SeekHole(off int64) (int64, error)
}

// RangeOpsReporter is implemented by files that know whether their
// PunchHole and ZeroRange methods work (a wrapper over a file that has
// neither has the methods all the same); drivers then state honest
// capabilities. Files that do not implement it are taken to support
// what they have methods for until a call says otherwise.
type RangeOpsReporter interface {
	CanPunchHole() bool
	CanZeroRange() bool
}

// ZeroRanger is implemented by files that can make a range read as zeros
// while keeping it allocated (fallocate ZERO_RANGE|KEEP_SIZE). An error
// matching errors.ErrUnsupported means the host cannot do it; callers then
// write zero bytes instead.
type ZeroRanger interface {
	ZeroRange(off, n int64) error
}

// WritebackStarter is implemented by files that can start writing a
// range back to the disk without waiting for it (sync_file_range
// SYNC_FILE_RANGE_WRITE): writers of large ranges call it so that the
// next Sync has less left to do. It is a hint: errors are not reported.
type WritebackStarter interface {
	StartWriteback(off, n int64)
}

// SyncWriter is implemented by files that can make one write durable by
// itself (pwritev2 with RWF_DSYNC): cheaper than a write followed by a
// Sync of the whole file when other writes are pending.
type SyncWriter interface {
	WriteAtSync(p []byte, off int64) (int, error)
}
