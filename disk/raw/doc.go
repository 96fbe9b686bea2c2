// Package raw is imgloop's raw format driver: the virtual disk is the host
// file's bytes, one for one, with nothing around them. Importing the
// package registers the driver under the name "raw".
//
// Raw probes as 1 for every header, so it is the fallback when no other
// driver recognises an image. The virtual size is the file size when the
// image was opened (QEMU rounds a size that is not a multiple of 512 up to
// the next sector and reads zeros there; imgloop presents the file's exact
// length).
//
// # Concurrency
//
// All methods are safe for concurrent use. Reads and writes go straight to
// pread/pwrite without a lock; Close sets an atomic flag that later calls
// check. Only writes touching the first sector of a probed image take a
// mutex (see Security), so that the check and the write are atomic with
// respect to each other.
//
// # Errors
//
// ReadAt and WriteAt refuse requests outside [0, Size) with an error
// matching disk.ErrOutOfRange; a read that the host file serves short (the
// file shrank after Open) fails with io.ErrUnexpectedEOF. Writes to an
// image opened read-only return disk.ErrReadOnly; every method after Close
// returns disk.ErrClosed. Discard returns disk.ErrNotSupported when the
// host file cannot punch holes. Host errors are wrapped with the file
// name.
//
// # Security
//
// A raw image's first sector is guest data, so a guest could write a
// qcow2 header there and make the next probing open interpret the file as
// qcow2, for example with a host file of its choosing as backing file. As
// in QEMU, when the format was probed (disk.OpenOptions.Probed), a write,
// WriteZeroes or Discard that touches the first 512 bytes is refused with
// an error matching both ErrProbedFormatChange and disk.ErrNotSupported if
// the first sector would afterwards be detected as another format. Opening
// the image with Format "raw" lifts the restriction.
package raw
