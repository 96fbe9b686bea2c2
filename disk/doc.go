// Package disk is imgloop's format subsystem: the Image interface that every
// disk image format driver implements, the registry of drivers, and the typed
// errors that callers branch on.
//
// It is the Go counterpart of the loop device's "file format subsystem"
// (drivers register a name and an operations table; an instance is opened,
// used, and closed). A driver lives in its own package (disk/raw,
// disk/qcow2) and registers itself from an init function; programs import
// the drivers they want for their side effect and then call Open.
//
// # Lifecycle
//
// Open returns an initialised Image or an error; a failed Open leaves no
// open file behind. Close flushes, releases the host file(s), and every later
// call returns ErrClosed.
//
// # Locking
//
// Open locks the host files of an image (the image file, its backing
// files, an external data file) as QEMU does, with OFD locks on the bytes
// of QEMU's protocol (block/file-posix.c), so that imgloop and QEMU
// processes using one image exclude each other: a read-write open refuses
// every other writer and reader, a read-only open refuses writers
// (OpenOptions.ShareWrite and ForceShare relax that as qemu-img info and
// -U do), and backing files are shared by their readers. Close releases
// the locks. See lock.go and OpenOptions.Access.
//
// # Concurrency
//
// Every method of an Image is safe for concurrent use. ReadAt calls never
// serialise behind one image-wide lock. The registry is guarded by a mutex.
//
// # Errors
//
// Malformed images yield a *FormatError (errors.Is(err, ErrFormat) holds),
// images using a feature imgloop does not implement yield an
// *UnsupportedError, images of a format (or format version) imgloop
// recognises but has no driver for yield an *UnsupportedFormatError (for
// both, errors.Is(err, ErrNotSupported) holds), and operations a driver
// does not offer return ErrNotSupported. Writes to a read-only image
// return ErrReadOnly, I/O after Close returns ErrClosed, requests outside the
// virtual disk return ErrOutOfRange. An Open that another process's
// locks prevent returns a *LockError (errors.Is(err, ErrLocked) holds).
//
// # Security
//
// Image files are untrusted input: drivers validate every offset and size
// they read against the file size and the format's limits before using it to
// index or allocate. Probe detects formats as QEMU does, from the first
// sector and the file name only, never from data a raw image's guest could
// have written elsewhere (see Sample).
package disk
