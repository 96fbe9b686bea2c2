package nbd

import (
	"context"
	"errors"
	"syscall"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/export/nbd/internal/wire"
)

// errno maps an error of the image onto the NBD error value a reply
// carries (the one place this is decided). write tells a write-like
// command (WRITE, WRITE_ZEROES), for which a range past the end is
// NBD_ENOSPC rather than NBD_EINVAL.
func errno(err error, write bool) uint32 {
	switch {
	case err == nil:
		return 0
	case errors.Is(err, disk.ErrReadOnly):
		return wire.EPERM
	case errors.Is(err, disk.ErrOutOfRange):
		if write {
			return wire.ENOSPC
		}
		return wire.EINVAL
	case errors.Is(err, disk.ErrSlowZero):
		return wire.ENOTSUP
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT), errors.Is(err, syscall.EFBIG):
		return wire.ENOSPC
	case errors.Is(err, disk.ErrClosed), errors.Is(err, context.Canceled):
		return wire.ESHUTDOWN
	case errors.Is(err, syscall.ENOMEM):
		return wire.ENOMEM
	}
	return wire.EIO
}

// reqError is a request's failure: the NBD error value and the message
// for a structured error chunk.
type reqError struct {
	errno uint32
	msg   string
}

// failWith returns the reqError for err.
func failWith(err error, write bool) *reqError {
	if err == nil {
		return nil
	}
	return &reqError{errno(err, write), err.Error()}
}

// invalid returns an NBD_EINVAL failure.
func invalid(msg string) *reqError { return &reqError{wire.EINVAL, msg} }
