package convert

import (
	"os"

	"golang.org/x/sys/unix"
)

// WriteBehind is an io.WriterAt over an *os.File that starts writing each
// written range back to the device as soon as it is written
// (sync_file_range SYNC_FILE_RANGE_WRITE, which does not wait for the
// I/O). The device then works while the conversion goes on, and the final
// fsync finds little left to write: converting 1 GiB, that fsync
// otherwise costs about half a second here, all of it after the copy.
type WriteBehind struct {
	f *os.File
}

// NewWriteBehind returns a WriteBehind writing to f.
func NewWriteBehind(f *os.File) *WriteBehind { return &WriteBehind{f: f} }

// WriteAt writes p at off, then starts the range's write-back. A failure
// to start write-back is not an error: the final fsync still covers it.
func (w *WriteBehind) WriteAt(p []byte, off int64) (int, error) {
	n, err := w.f.WriteAt(p, off)
	if n > 0 {
		_ = unix.SyncFileRange(int(w.f.Fd()), off, int64(n), unix.SYNC_FILE_RANGE_WRITE)
	}
	return n, err
}
