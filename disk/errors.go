package disk

import (
	"errors"
	"fmt"
)

// Sentinel errors; test for them with errors.Is.
var (
	// ErrNotSupported is returned for an operation the driver does not offer
	// (for example Discard on a read-only format) and is matched by
	// *UnsupportedError.
	ErrNotSupported = errors.New("operation not supported")
	// ErrReadOnly is returned by writes to an image opened read-only.
	ErrReadOnly = errors.New("image is read-only")
	// ErrClosed is returned by every method of an Image after Close.
	ErrClosed = errors.New("image is closed")
	// ErrFormat is matched by every *FormatError.
	ErrFormat = errors.New("invalid image format")
	// ErrCorrupt marks an image whose metadata is inconsistent; it is
	// matched by *FormatError values whose Corrupt field is set.
	ErrCorrupt = errors.New("image is corrupt")
	// ErrOutOfRange is returned for a request that reaches past the end of
	// the virtual disk or starts at a negative offset.
	ErrOutOfRange = errors.New("request out of range")
	// ErrUnknownFormat is returned by Lookup and Open for a format name no
	// driver registered, and by Detect when no driver recognises an image.
	ErrUnknownFormat = errors.New("unknown image format")
)

// FormatError reports malformed image data: what was wrong and where.
type FormatError struct {
	Format  string // driver name, e.g. "qcow2"
	Offset  int64  // byte offset in the image file of the bad data; -1 if none
	What    string // what was wrong, e.g. "l1_size 4294967295 exceeds limit"
	Corrupt bool   // the image's metadata is inconsistent (see ErrCorrupt)
	Err     error  // underlying cause, if any
}

func (e *FormatError) Error() string {
	s := ""
	if e.Format != "" {
		s = e.Format + ": "
	}
	if e.Offset >= 0 {
		s += fmt.Sprintf("at offset %#x: ", e.Offset)
	}
	s += e.What
	if e.Err != nil {
		s += ": " + e.Err.Error()
	}
	return s
}

// Unwrap returns the underlying cause.
func (e *FormatError) Unwrap() error { return e.Err }

// Is reports whether target is ErrFormat, or ErrCorrupt for a corruption.
func (e *FormatError) Is(target error) bool {
	return target == ErrFormat || (e.Corrupt && target == ErrCorrupt)
}

// UnsupportedError reports an image that uses a feature imgloop does not
// implement (for example encryption).
type UnsupportedError struct {
	Format  string // driver name
	Feature string // the feature's name, from the image where it names it
}

func (e *UnsupportedError) Error() string {
	return fmt.Sprintf("%s: unsupported feature: %s", e.Format, e.Feature)
}

// Is reports whether target is ErrNotSupported.
func (e *UnsupportedError) Is(target error) bool { return target == ErrNotSupported }

// UnsupportedFormatError reports an image in a format imgloop recognises
// but cannot read: one of the formats QEMU probes that has no driver here
// (VHD, VMDK, VDI, ...), or a version of a format that its driver does
// not read (qcow2 version 4). It matches ErrNotSupported. Opening the
// file with Format "raw" still reads its bytes.
type UnsupportedFormatError struct {
	Path   string // the image file; "" where not known
	Format string // QEMU's name of the format, as qemu-img -f takes it: "vpc", "qcow", "qcow2"
	Title  string // what the format is usually called ("VHD"); "" shows Format alone
	// Version is the version the image declares, when its format has a
	// driver that does not read that version; "" for a format without a
	// driver.
	Version string
}

func (e *UnsupportedFormatError) Error() string {
	s := ""
	if e.Path != "" {
		s = e.Path + ": "
	}
	if e.Version != "" {
		return s + fmt.Sprintf("unsupported %s version %s", e.Format, e.Version)
	}
	name := e.Format
	if e.Title != "" && e.Title != e.Format {
		name = e.Title + " (" + e.Format + ")"
	}
	return s + name + " image: not supported yet; use -f raw to read its bytes"
}

// Is reports whether target is ErrNotSupported.
func (e *UnsupportedFormatError) Is(target error) bool { return target == ErrNotSupported }

// CheckRange returns ErrOutOfRange (wrapped with the request) unless
// 0 <= off and off+n <= size without overflow.
func CheckRange(off, n, size int64) error {
	if off < 0 || n < 0 || off > size || n > size-off {
		return fmt.Errorf("%w: offset %d length %d, disk size %d", ErrOutOfRange, off, n, size)
	}
	return nil
}
