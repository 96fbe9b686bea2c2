package raw

import (
	"bytes"
	"testing"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/disk/hostfile/hostfiletest"
)

// TestFUADurable crashes the host file right after WriteAtFUA and a
// ZeroFUA WriteZeroes returned: their data must survive, while a plain
// write beside them, not flushed, need not.
func TestFUADurable(t *testing.T) {
	for _, name := range []string{"memfile", "faulty"} {
		t.Run(name, func(t *testing.T) {
			mem := hostfiletest.NewMemFile("f.raw", bytes.Repeat([]byte{0x11}, 1<<20))
			var f disk.File = mem
			if name == "faulty" {
				f = hostfiletest.NewFaulty(mem) // WriteAtSync through the wrapper
			}
			img, err := Open(f, disk.OpenOptions{Format: Name})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := img.WriteAt(bytes.Repeat([]byte{0x22}, 4096), 0); err != nil {
				t.Fatal(err)
			}
			fua := bytes.Repeat([]byte{0x33}, 5000)
			if _, err := disk.WriteAtFlags(img, fua, 100000, disk.WriteFUA); err != nil {
				t.Fatal(err)
			}
			if err := disk.WriteZeroes(img, 200000, 3000, disk.ZeroFUA|disk.ZeroNoUnmap); err != nil {
				t.Fatal(err)
			}
			got := mem.Crash().Bytes()
			if !bytes.Equal(got[100000:105000], fua) {
				t.Error("the FUA write did not survive the crash")
			}
			if !bytes.Equal(got[200000:203000], make([]byte, 3000)) {
				t.Error("the FUA write-zeroes did not survive the crash")
			}
		})
	}
}
