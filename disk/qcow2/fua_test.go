package qcow2

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/disk/hostfile/hostfiletest"
	"github.com/imgloop/imgloop/internal/qemutest"
)

// TestWriteFUADurable crashes the host file (dropping every unsynced
// write) right after WriteAtFUA and WriteZeroes with ZeroFUA returned:
// what they wrote must be there after reopening, whether the write went
// in place (only its data synced) or allocated clusters (a flush).
func TestWriteFUADurable(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	p := filepath.Join(t.TempDir(), "f.qcow2")
	qemutest.Create(t, p, "qcow2", "cluster_size=4k", "4M")
	orig, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name  string
		setup func(img *Image) error // done and flushed before the FUA write
		op    func(img *Image) error
		off   int64
		want  []byte
	}{
		{"allocating", nil, func(img *Image) error {
			_, err := img.WriteAtFUA(bytes.Repeat([]byte{0xa1}, 10000), 5000)
			return err
		}, 5000, bytes.Repeat([]byte{0xa1}, 10000)},
		{"in place", func(img *Image) error {
			_, err := img.WriteAt(bytes.Repeat([]byte{0x11}, 64<<10), 0)
			return err
		}, func(img *Image) error {
			_, err := img.WriteAtFUA(bytes.Repeat([]byte{0xb2}, 3000), 1000)
			return err
		}, 1000, bytes.Repeat([]byte{0xb2}, 3000)},
		{"in place, mapping not yet durable", nil, func(img *Image) error {
			if _, err := img.WriteAt(bytes.Repeat([]byte{0x11}, 8192), 1<<20); err != nil {
				return err
			}
			_, err := img.WriteAtFUA(bytes.Repeat([]byte{0xc3}, 4096), 1<<20)
			return err
		}, 1 << 20, bytes.Repeat([]byte{0xc3}, 4096)},
		{"zeroes", func(img *Image) error {
			_, err := img.WriteAt(bytes.Repeat([]byte{0x11}, 64<<10), 0)
			return err
		}, func(img *Image) error {
			return disk.WriteZeroes(img, 8192, 16384, disk.ZeroFUA)
		}, 8192, make([]byte, 16384)},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			mem := hostfiletest.NewMemFile("f.qcow2", orig)
			img, err := Open(mem, disk.OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if c.setup != nil {
				if err := c.setup(img); err != nil {
					t.Fatal(err)
				}
				if err := img.Flush(); err != nil {
					t.Fatal(err)
				}
			}
			if err := c.op(img); err != nil {
				t.Fatal(err)
			}
			crashed := mem.Crash()
			img2, err := Open(crashed, disk.OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatalf("reopening after the crash: %v", err)
			}
			defer img2.Close()
			got := make([]byte, len(c.want))
			if _, err := img2.ReadAt(got, c.off); err != nil {
				t.Fatal(err)
			}
			if d := qemutest.FirstDiff(got, c.want); d >= 0 {
				t.Fatalf("after a crash, byte %d of the FUA write reads %#x, want %#x", c.off+d, got[d], c.want[d])
			}
		})
	}
}
