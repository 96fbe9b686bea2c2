package convert

import (
	"bytes"
	"fmt"
	"io"
)

// zeros is a read-only block of zeros to compare against; bytes.Equal uses
// the runtime's vectorised memequal, many GB/s.
var zeros [64 << 10]byte

// isZero reports whether b holds only zero bytes.
func isZero(b []byte) bool {
	for len(b) > 0 {
		n := min(len(b), len(zeros))
		if !bytes.Equal(b[:n], zeros[:n]) {
			return false
		}
		b = b[n:]
	}
	return true
}

// writeSparse writes buf, which belongs at off in w, except for the blocks
// of sparse bytes (aligned to sparse in w's offsets) that are all zeros.
// sparse <= 0 writes buf whole. It returns the number of bytes written.
func writeSparse(w io.WriterAt, buf []byte, off int64, sparse int) (int64, error) {
	if sparse <= 0 {
		return writeAt(w, buf, off)
	}
	var written int64
	run := -1 // start of the pending run of non-zero blocks
	for i := 0; i < len(buf); {
		end := min(len(buf), i+sparse-int((off+int64(i))%int64(sparse)))
		if isZero(buf[i:end]) {
			if run >= 0 {
				n, err := writeAt(w, buf[run:i], off+int64(run))
				written += n
				if err != nil {
					return written, err
				}
				run = -1
			}
		} else if run < 0 {
			run = i
		}
		i = end
	}
	if run >= 0 {
		n, err := writeAt(w, buf[run:], off+int64(run))
		written += n
		if err != nil {
			return written, err
		}
	}
	return written, nil
}

func writeAt(w io.WriterAt, b []byte, off int64) (int64, error) {
	n, err := w.WriteAt(b, off)
	if err == nil && n != len(b) {
		err = io.ErrShortWrite
	}
	if err != nil {
		return int64(n), fmt.Errorf("convert: writing %d bytes at offset %d: %w", len(b), off, err)
	}
	return int64(n), nil
}
