package raw

import (
	"bytes"
	"errors"
	"testing"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/disk/hostfile/hostfiletest"
)

// TestCrashSweep fails each write and each sync of a workload in turn,
// crashes the host file, and checks that every write acknowledged before
// a successful Flush survived, and that a failed operation was reported.
func TestCrashSweep(t *testing.T) {
	const size = 64 << 10
	type step struct {
		off   int64
		data  []byte
		flush bool
	}
	var steps []step
	for i := range 12 {
		steps = append(steps, step{off: int64(i*5000) % (size - 4096), data: randomBytes(uint64(i+100), 1000+int64(i)*300), flush: i%3 == 2})
	}
	for _, op := range []hostfiletest.Op{hostfiletest.OpWrite, hostfiletest.OpSync} {
		for i := int64(0); ; i++ {
			mem := hostfiletest.NewMemFile("c.raw", make([]byte, size))
			f := hostfiletest.NewFaulty(mem)
			f.FailNth(op, i, nil)
			img, err := Open(f, disk.OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			durable := make([]byte, size) // what a crash must keep
			pending := make([]byte, size)
			failed := false
			for _, s := range steps {
				if _, err := img.WriteAt(s.data, s.off); err != nil {
					if !errors.Is(err, hostfiletest.ErrInjected) {
						t.Fatalf("%s #%d: WriteAt: %v", op, i, err)
					}
					failed = true
					break
				}
				copy(pending[s.off:], s.data)
				if s.flush {
					if err := img.Flush(); err != nil {
						if !errors.Is(err, hostfiletest.ErrInjected) {
							t.Fatalf("%s #%d: Flush: %v", op, i, err)
						}
						failed = true
						break
					}
					copy(durable, pending)
				}
			}
			crashed := mem.Crash() // power cut now, before Close flushes
			img.Close()
			if !failed {
				if f.Count(op) <= i {
					break // the workload no longer reaches failure point i
				}
				if op == hostfiletest.OpSync && f.Count(op) == i+1 {
					continue // the failing sync was Close's own flush
				}
				t.Fatalf("%s #%d failed but no call reported it", op, i)
			}
			if got := crashed.Bytes(); !bytes.Equal(got, durable) {
				t.Fatalf("%s #%d failing: the crashed file differs from the last flushed state", op, i)
			}
		}
	}
}
