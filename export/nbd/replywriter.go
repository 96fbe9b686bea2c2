package nbd

import (
	"io"
	"net"
)

// replyWriter batches the replies sent on a connection. Headers and small
// payloads are copied into a buffer; a large payload goes out with the
// buffered bytes in one vectored write (net.Buffers: writev on TCP and
// unix sockets), without being copied. Unlike a bufio.Writer, which
// copies the head of a large payload into its buffer and then makes a
// second write, it sends a 256 KiB read reply in one system call.
type replyWriter struct {
	w   io.Writer
	buf []byte
}

const (
	// replyBufSize is the buffered bytes at which a Write flushes.
	replyBufSize = 64 << 10
	// replyCopyMax is the largest payload copied into the buffer.
	replyCopyMax = 16 << 10
)

func newReplyWriter(w io.Writer) *replyWriter {
	return &replyWriter{w: w, buf: make([]byte, 0, replyBufSize+replyCopyMax)}
}

// Write queues p, or sends it with what is queued if p is large. It
// keeps no reference to p once it returns.
func (rw *replyWriter) Write(p []byte) (int, error) {
	if len(p) <= replyCopyMax {
		rw.buf = append(rw.buf, p...)
		if len(rw.buf) >= replyBufSize {
			if err := rw.Flush(); err != nil {
				return 0, err
			}
		}
		return len(p), nil
	}
	bufs := net.Buffers{rw.buf, p}
	_, err := bufs.WriteTo(rw.w)
	rw.buf = rw.buf[:0]
	if err != nil {
		return 0, err
	}
	return len(p), nil
}

// Flush sends what is queued.
func (rw *replyWriter) Flush() error {
	if len(rw.buf) == 0 {
		return nil
	}
	_, err := rw.w.Write(rw.buf)
	rw.buf = rw.buf[:0]
	return err
}

// Reset drops what is queued and writes to w from now on (after STARTTLS).
func (rw *replyWriter) Reset(w io.Writer) {
	rw.w = w
	rw.buf = rw.buf[:0]
}
