package nbd

import (
	"bytes"
	"errors"
	"testing"
)

// countingWriter records what is written to it and how many writes.
type countingWriter struct {
	bytes.Buffer
	writes int
	err    error
}

func (w *countingWriter) Write(p []byte) (int, error) {
	if w.err != nil {
		return 0, w.err
	}
	w.writes++
	return w.Buffer.Write(p)
}

func TestReplyWriter(t *testing.T) {
	small := bytes.Repeat([]byte{1}, 100)
	large := bytes.Repeat([]byte{2}, replyCopyMax+1)
	tests := []struct {
		name        string
		writes      [][]byte
		beforeFlush int // bytes out before Flush
	}{
		{"small ones wait for Flush", [][]byte{small, small}, 0},
		{"a large one sends what is queued", [][]byte{small, large}, len(small) + len(large)},
		{"queued after a large one", [][]byte{large, small}, len(large)},
		{"the buffer fills", bytes.Split(bytes.Repeat([]byte("x"), replyBufSize+1), nil), replyBufSize},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var w countingWriter
			rw := newReplyWriter(&w)
			var want []byte
			for _, p := range tt.writes {
				if n, err := rw.Write(p); n != len(p) || err != nil {
					t.Fatalf("Write: %d, %v", n, err)
				}
				want = append(want, p...)
			}
			if w.Len() != tt.beforeFlush {
				t.Errorf("%d bytes out before Flush, want %d", w.Len(), tt.beforeFlush)
			}
			if err := rw.Flush(); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(w.Bytes(), want) {
				t.Error("the bytes out differ from the bytes written")
			}
		})
	}
}

func TestReplyWriterError(t *testing.T) {
	boom := errors.New("boom")
	w := &countingWriter{err: boom}
	rw := newReplyWriter(w)
	if _, err := rw.Write(make([]byte, replyCopyMax+1)); !errors.Is(err, boom) {
		t.Errorf("large Write: %v", err)
	}
	rw.Write([]byte("x"))
	if err := rw.Flush(); !errors.Is(err, boom) {
		t.Errorf("Flush: %v", err)
	}
	rw.Reset(&countingWriter{})
	if err := rw.Flush(); err != nil {
		t.Errorf("Flush after Reset: %v", err)
	}
}
