// Package hostfile is the file layer under imgloop's format drivers: the
// OS file and its locks. Test doubles (a crashable in-memory file, a
// wrapper that fails a chosen operation) are in package hostfiletest.
//
// Every type here satisfies disk.File (and, where the operation exists,
// disk.HolePuncher and disk.DataSeeker); this package does not import disk,
// so that disk can import it.
//
// # Concurrency
//
// All methods are safe for concurrent use.
//
// # Locking
//
// OSFile.Lock takes QEMU's image locks (lock.go): OFD locks on the bytes
// that stand for the permissions an open holds and those it refuses to
// share, so that imgloop and QEMU processes using one image exclude each
// other as QEMU processes do. Create takes a creator's locks before it
// truncates.
package hostfile

import (
	"errors"
	"io"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// OSFile is a host file backed by an *os.File.
type OSFile struct {
	f *os.File

	lockMu sync.Mutex // guards lock
	lock   lockState
}

// Open opens path read-only or read-write.
func Open(path string, readOnly bool) (*OSFile, error) {
	flag := os.O_RDWR
	if readOnly {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, err
	}
	return &OSFile{f: f}, nil
}

// Create creates (or truncates) path for reading and writing. As QEMU's
// file creation (block/file-posix.c raw_co_create) it first takes a
// creator's locks, holding PermWrite and PermResize and refusing to share
// PermResize, and truncates only then: a file another process uses is
// left as it is. The locks are held until Close (or a later Lock).
//
// Errors: the *fs.PathError of the open, a *LockError (ErrLocked) when
// another user of the file conflicts, the truncation's error.
func Create(path string) (*OSFile, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, err
	}
	o := &OSFile{f: f}
	if err := o.Lock(PermWrite|PermResize, PermAll&^PermResize); err != nil {
		f.Close()
		return nil, err
	}
	if err := f.Truncate(0); err != nil {
		f.Close()
		return nil, err
	}
	return o, nil
}

// New wraps an open *os.File; the OSFile takes ownership of it.
func New(f *os.File) *OSFile { return &OSFile{f: f} }

// StartWriteback starts writing [off, off+n) back to the disk without
// waiting (sync_file_range SYNC_FILE_RANGE_WRITE).
func (o *OSFile) StartWriteback(off, n int64) {
	_ = unix.SyncFileRange(int(o.f.Fd()), off, n, unix.SYNC_FILE_RANGE_WRITE)
}

// File returns the underlying *os.File.
func (o *OSFile) File() *os.File { return o.f }

// ReadAt implements io.ReaderAt.
func (o *OSFile) ReadAt(p []byte, off int64) (int, error) { return o.f.ReadAt(p, off) }

// WriteAt implements io.WriterAt.
func (o *OSFile) WriteAt(p []byte, off int64) (int, error) { return o.f.WriteAt(p, off) }

// Size returns the file's length.
func (o *OSFile) Size() (int64, error) {
	fi, err := o.f.Stat()
	if err != nil {
		return 0, err
	}
	return fi.Size(), nil
}

// WriteAtSync writes p at off and makes it durable before returning
// (pwritev2 with RWF_DSYNC: only this write is flushed, not the file's
// other dirty pages). Kernels without RWF_DSYNC get a write and an
// fdatasync.
func (o *OSFile) WriteAtSync(p []byte, off int64) (int, error) {
	fd := int(o.f.Fd())
	done := 0
	for done < len(p) {
		n, err := unix.Pwritev2(fd, [][]byte{p[done:]}, off+int64(done), unix.RWF_DSYNC)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EOPNOTSUPP || err == unix.ENOSYS || err == unix.EINVAL:
			if _, err := o.f.WriteAt(p[done:], off+int64(done)); err != nil {
				return done, err
			}
			return len(p), o.Sync()
		case err != nil:
			return done, &os.PathError{Op: "pwritev2", Path: o.f.Name(), Err: err}
		case n == 0:
			return done, &os.PathError{Op: "pwritev2", Path: o.f.Name(), Err: io.ErrShortWrite}
		}
		done += n
	}
	return done, nil
}

// Sync makes written data durable (fdatasync).
func (o *OSFile) Sync() error {
	return ignoreEINTR(func() error { return unix.Fdatasync(int(o.f.Fd())) }, "fdatasync", o.f.Name())
}

// Truncate sets the file's length.
func (o *OSFile) Truncate(size int64) error { return o.f.Truncate(size) }

// Close closes the file.
func (o *OSFile) Close() error { return o.f.Close() }

// Name returns the path the file was opened with.
func (o *OSFile) Name() string { return o.f.Name() }

// PunchHole deallocates [off, off+n) without changing the file size.
func (o *OSFile) PunchHole(off, n int64) error {
	return ignoreEINTR(func() error {
		return unix.Fallocate(int(o.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
	}, "fallocate", o.f.Name())
}

// ZeroRange makes [off, off+n) read as zeros while keeping it allocated
// and the file size unchanged (fallocate ZERO_RANGE|KEEP_SIZE). File
// systems without it fail with an error matching errors.ErrUnsupported.
func (o *OSFile) ZeroRange(off, n int64) error {
	return ignoreEINTR(func() error {
		return unix.Fallocate(int(o.f.Fd()), unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, off, n)
	}, "fallocate", o.f.Name())
}

// SeekData returns the first data offset at or after off, or io.EOF.
func (o *OSFile) SeekData(off int64) (int64, error) {
	pos, err := unix.Seek(int(o.f.Fd()), off, unix.SEEK_DATA)
	if errors.Is(err, unix.ENXIO) {
		return 0, io.EOF
	}
	if err != nil {
		return 0, &os.PathError{Op: "seek_data", Path: o.f.Name(), Err: err}
	}
	return pos, nil
}

// SeekHole returns the first hole offset at or after off (the file size if
// there is none), or io.EOF if off is at or past the end.
func (o *OSFile) SeekHole(off int64) (int64, error) {
	pos, err := unix.Seek(int(o.f.Fd()), off, unix.SEEK_HOLE)
	if errors.Is(err, unix.ENXIO) {
		return 0, io.EOF
	}
	if err != nil {
		return 0, &os.PathError{Op: "seek_hole", Path: o.f.Name(), Err: err}
	}
	return pos, nil
}

func ignoreEINTR(fn func() error, op, path string) error {
	for {
		err := fn()
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return &os.PathError{Op: op, Path: path, Err: err}
		}
		return nil
	}
}
