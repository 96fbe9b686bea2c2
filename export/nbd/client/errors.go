package client

import (
	"errors"
	"fmt"
	"syscall"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/export/nbd/internal/wire"
)

// Sentinel errors; test for them with errors.Is.
var (
	// ErrProtocol is matched by the errors of a server that broke the
	// protocol (bad magic, an oversized or inconsistent reply).
	ErrProtocol = wire.ErrProtocol
	// ErrDisconnected is matched by the errors of requests that failed
	// because the connection ended: dropped, or ended by the client after
	// a protocol error (which the error matches too).
	ErrDisconnected = errors.New("nbd client: connection lost")
	// ErrTLSRequired is matched by the *OptionError of a server that
	// requires TLS (NBD_REP_ERR_TLS_REQD) when Options.TLS is not set.
	ErrTLSRequired = errors.New("nbd client: the server requires TLS")
	// ErrTLSRefused is returned by Dial and New when Options.TLS is set
	// but the server refuses NBD_OPT_STARTTLS.
	ErrTLSRefused = errors.New("nbd client: the server refused TLS")
	// ErrUnknownExport is matched by the *OptionError of a server that
	// has no export of the name asked for (NBD_REP_ERR_UNKNOWN), and by
	// the error of a server that closed the connection on
	// NBD_OPT_EXPORT_NAME.
	ErrUnknownExport = errors.New("nbd client: no such export")
	// ErrOptionUnsupported is matched by the *OptionError of an option
	// the server does not know (NBD_REP_ERR_UNSUP).
	ErrOptionUnsupported = errors.New("nbd client: option not supported by the server")
)

// Error is an NBD error reply to a request: the error value (NBD_EIO,
// ...) and, with structured replies, the server's message.
//
// Error matches (errors.Is) the disk package's errors where the NBD
// error has a meaning there: disk.ErrReadOnly for NBD_EPERM,
// disk.ErrOutOfRange for NBD_EINVAL and NBD_ENOSPC to a request reaching
// past the end of the export, disk.ErrSlowZero for NBD_ENOTSUP to a
// request with NBD_CMD_FLAG_FAST_ZERO, disk.ErrNotSupported for other
// NBD_ENOTSUP, disk.ErrClosed for NBD_ESHUTDOWN; and the syscall.Errno
// of the same name (syscall.EIO for NBD_EIO).
type Error struct {
	Errno   uint32 // the NBD error value, e.g. wire.EIO (5)
	Message string // the server's message; "" with simple replies
	Command uint16 // the request's type (NBD_CMD_READ, ...)
	Flags   uint16 // the request's command flags
	Offset  uint64 // the request's offset
	Length  uint64 // the request's length
	// ErrorOffset is the offset an NBD_REPLY_TYPE_ERROR_OFFSET named;
	// -1 if none.
	ErrorOffset int64
	pastEnd     bool // the request reached past the end of the export
}

func (e *Error) Error() string {
	s := fmt.Sprintf("nbd: %s at %d+%d: %s", wire.CmdName(e.Command), e.Offset, e.Length, wire.ErrorName(e.Errno))
	if e.ErrorOffset >= 0 {
		s += fmt.Sprintf(" at offset %d", e.ErrorOffset)
	}
	if e.Message != "" {
		s += ": " + e.Message
	}
	return s
}

// Is reports whether target is the disk or syscall error e stands for
// (see Error).
func (e *Error) Is(target error) bool {
	switch target {
	case disk.ErrReadOnly:
		return e.Errno == wire.EPERM
	case disk.ErrOutOfRange:
		return e.pastEnd && (e.Errno == wire.EINVAL || e.Errno == wire.ENOSPC)
	case disk.ErrSlowZero:
		return e.Errno == wire.ENOTSUP && e.Flags&wire.CmdFlagFastZero != 0
	case disk.ErrNotSupported:
		return e.Errno == wire.ENOTSUP && e.Flags&wire.CmdFlagFastZero == 0
	case disk.ErrClosed:
		return e.Errno == wire.ESHUTDOWN
	}
	if errno, ok := target.(syscall.Errno); ok {
		return e.Errno != 0 && e.Errno == uint32(errno) && knownErrno(e.Errno)
	}
	return false
}

// knownErrno reports whether e is one of the spec's error values (which
// are Linux's errno values of the same names).
func knownErrno(e uint32) bool {
	switch e {
	case wire.EPERM, wire.EIO, wire.ENOMEM, wire.EINVAL, wire.ENOSPC, wire.EOVERFLOW, wire.ENOTSUP, wire.ESHUTDOWN:
		return true
	}
	return false
}

// OptionError is a server's error reply to an option of the handshake.
// It matches ErrTLSRequired (NBD_REP_ERR_TLS_REQD), ErrUnknownExport
// (NBD_REP_ERR_UNKNOWN) and ErrOptionUnsupported (NBD_REP_ERR_UNSUP).
type OptionError struct {
	Option  uint32 // the option, e.g. wire.OptGo
	Reply   uint32 // the error reply type, e.g. wire.RepErrUnknown
	Message string // the server's message
}

func (e *OptionError) Error() string {
	s := fmt.Sprintf("nbd: %s: %s", wire.OptName(e.Option), wire.RepName(e.Reply))
	if e.Message != "" {
		s += ": " + e.Message
	}
	return s
}

// Is reports whether target is the sentinel matching e's reply type.
func (e *OptionError) Is(target error) bool {
	switch target {
	case ErrTLSRequired:
		return e.Reply == wire.RepErrTLSReqd
	case ErrUnknownExport:
		return e.Reply == wire.RepErrUnknown
	case ErrOptionUnsupported:
		return e.Reply == wire.RepErrUnsup
	}
	return false
}

// protocolError returns an error matching ErrProtocol.
func protocolError(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrProtocol, fmt.Sprintf(format, args...))
}
