package disk_test

import (
	"errors"
	"io"
	"math"
	"strings"
	"testing"

	"github.com/imgloop/imgloop/disk"
)

func TestFormatError(t *testing.T) {
	cases := []struct {
		name        string
		err         *disk.FormatError
		corrupt     bool
		msg         string
		unwrapsToIO bool
	}{
		{"plain", &disk.FormatError{Format: "qcow2", Offset: 0x30, What: "bad l1_size"}, false, "qcow2: at offset 0x30: bad l1_size", false},
		{"no offset", &disk.FormatError{Format: "qcow2", Offset: -1, What: "chain loops"}, false, "qcow2: chain loops", false},
		{"no format", &disk.FormatError{Offset: -1, What: "backing chain loops"}, false, "backing chain loops", false},
		{"corrupt with cause", &disk.FormatError{Format: "qcow2", Offset: 0x10000, What: "L2 table", Corrupt: true, Err: io.ErrUnexpectedEOF},
			true, "qcow2: at offset 0x10000: L2 table: unexpected EOF", true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var err error = c.err
			wrapped := errors.Join(errors.New("context"), err)
			for _, e := range []error{err, wrapped} {
				if !errors.Is(e, disk.ErrFormat) {
					t.Error("not ErrFormat")
				}
				if errors.Is(e, disk.ErrCorrupt) != c.corrupt {
					t.Errorf("Is(ErrCorrupt) = %v, want %v", !c.corrupt, c.corrupt)
				}
				if errors.Is(e, disk.ErrNotSupported) {
					t.Error("a format error matches ErrNotSupported")
				}
				if errors.Is(e, io.ErrUnexpectedEOF) != c.unwrapsToIO {
					t.Error("Unwrap does not reach the cause")
				}
				var fe *disk.FormatError
				if !errors.As(e, &fe) || fe != c.err {
					t.Error("errors.As does not find the *FormatError")
				}
			}
			if err.Error() != c.msg {
				t.Errorf("Error() = %q, want %q", err.Error(), c.msg)
			}
		})
	}
}

func TestUnsupportedError(t *testing.T) {
	var err error = &disk.UnsupportedError{Format: "qcow2", Feature: "encryption"}
	if !errors.Is(err, disk.ErrNotSupported) || errors.Is(err, disk.ErrFormat) || errors.Is(err, disk.ErrCorrupt) {
		t.Fatal("UnsupportedError must match ErrNotSupported only")
	}
	if got := err.Error(); !strings.Contains(got, "qcow2") || !strings.Contains(got, "encryption") {
		t.Fatalf("Error() = %q", got)
	}
}

func TestCheckRange(t *testing.T) {
	cases := []struct {
		off, n, size int64
		ok           bool
	}{
		{0, 0, 0, true},
		{0, 512, 512, true},
		{511, 1, 512, true},
		{512, 0, 512, true},
		{0, 513, 512, false},
		{512, 1, 512, false},
		{513, 0, 512, false},
		{-1, 1, 512, false},
		{-1, 0, 512, false},
		{0, -1, 512, false},
		{1, math.MaxInt64, 512, false},           // off+n overflows
		{math.MaxInt64, 1, math.MaxInt64, false}, // off+n overflows
		{math.MaxInt64 - 1, 1, math.MaxInt64, true},
		{math.MaxInt64, 0, math.MaxInt64, true},
		{math.MinInt64, math.MaxInt64, math.MaxInt64, false},
	}
	for _, c := range cases {
		err := disk.CheckRange(c.off, c.n, c.size)
		if (err == nil) != c.ok {
			t.Errorf("CheckRange(%d, %d, %d) = %v, want ok=%v", c.off, c.n, c.size, err, c.ok)
		}
		if err != nil && !errors.Is(err, disk.ErrOutOfRange) {
			t.Errorf("CheckRange(%d, %d, %d) = %v, want ErrOutOfRange", c.off, c.n, c.size, err)
		}
	}
}
