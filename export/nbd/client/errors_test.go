package client

import (
	"errors"
	"syscall"
	"testing"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/export/nbd/internal/wire"
)

func TestErrorIs(t *testing.T) {
	cases := []struct {
		name  string
		err   *Error
		match []error
		not   []error
	}{
		{"EPERM", &Error{Errno: wire.EPERM}, []error{disk.ErrReadOnly, syscall.EPERM}, []error{disk.ErrOutOfRange, syscall.EIO}},
		{"EINVAL past end", &Error{Errno: wire.EINVAL, pastEnd: true}, []error{disk.ErrOutOfRange, syscall.EINVAL}, []error{disk.ErrReadOnly}},
		{"EINVAL", &Error{Errno: wire.EINVAL}, []error{syscall.EINVAL}, []error{disk.ErrOutOfRange}},
		{"ENOSPC past end", &Error{Errno: wire.ENOSPC, pastEnd: true}, []error{disk.ErrOutOfRange, syscall.ENOSPC}, nil},
		{"ENOSPC", &Error{Errno: wire.ENOSPC}, []error{syscall.ENOSPC}, []error{disk.ErrOutOfRange}},
		{"ENOTSUP fast zero", &Error{Errno: wire.ENOTSUP, Flags: wire.CmdFlagFastZero}, []error{disk.ErrSlowZero}, []error{disk.ErrNotSupported}},
		{"ENOTSUP", &Error{Errno: wire.ENOTSUP}, []error{disk.ErrNotSupported}, []error{disk.ErrSlowZero}},
		{"ESHUTDOWN", &Error{Errno: wire.ESHUTDOWN}, []error{disk.ErrClosed, syscall.ESHUTDOWN}, nil},
		{"unknown", &Error{Errno: 1234}, nil, []error{syscall.Errno(1234), disk.ErrReadOnly}},
	}
	for _, tc := range cases {
		for _, m := range tc.match {
			if !errors.Is(tc.err, m) {
				t.Errorf("%s: does not match %v", tc.name, m)
			}
		}
		for _, m := range tc.not {
			if errors.Is(tc.err, m) {
				t.Errorf("%s: matches %v", tc.name, m)
			}
		}
	}
	oe := &OptionError{Option: wire.OptGo, Reply: wire.RepErrTLSReqd}
	if !errors.Is(oe, ErrTLSRequired) || errors.Is(oe, ErrUnknownExport) {
		t.Errorf("%v: wrong matches", oe)
	}
}
