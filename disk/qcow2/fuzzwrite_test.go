package qcow2

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/disk/hostfile/hostfiletest"
	"github.com/imgloop/imgloop/internal/qemutest"
)

// FuzzWrite opens arbitrary bytes as a qcow2 image read-write and writes,
// discards, zeroes, flushes and closes it: there must be no panic, hang
// or huge allocation (errors are fine). The seeds are small images of
// several kinds that qemu-img builds at test time.
func FuzzWrite(f *testing.F) {
	qemutest.Require(f, "qemu-img", "qemu-io")
	dir := f.TempDir()
	add := func(name, opts string, cmds ...string) {
		p := filepath.Join(dir, name)
		qemutest.Create(f, p, "qcow2", opts, "256k")
		if len(cmds) > 0 {
			qemutest.IO(f, p, "qcow2", cmds...)
		}
		data, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data, uint64(1000), uint16(5000))
	}
	add("plain.qcow2", "cluster_size=4096", "write -P 0x11 0 8k", "write -z 16k 4k", "write -P 0x22 100000 5000")
	add("v2.qcow2", "cluster_size=512,compat=0.10", "write -P 0x11 0 8k")
	add("ext.qcow2", "cluster_size=16k,extended_l2=on", "write -P 0x11 512 1024", "write -z 4096 1024")
	add("lazy.qcow2", "cluster_size=4096,lazy_refcounts=on,refcount_bits=1", "write -P 0x11 0 64k")
	snap := filepath.Join(dir, "snap.qcow2")
	qemutest.Create(f, snap, "qcow2", "cluster_size=4096", "256k")
	qemutest.IO(f, snap, "qcow2", "write -P 0x11 0 64k")
	qemutest.Img(f, "snapshot", "-c", "s1", snap)
	data, err := os.ReadFile(snap)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(data, uint64(4096), uint16(9000))
	f.Fuzz(func(t *testing.T, data []byte, off uint64, n uint16) {
		mem := hostfiletest.NewMemFile("fuzz.qcow2", data)
		img, err := Open(mem, disk.OpenOptions{CacheSize: 64 << 10})
		if err != nil {
			return
		}
		size := img.Size()
		if size <= 0 {
			img.Close()
			return
		}
		o := int64(off % uint64(size))
		k := min(int64(n)+1, size-o)
		buf := make([]byte, k)
		for i := range buf {
			buf[i] = byte(i) | 1
		}
		img.WriteAt(buf, o)
		img.Discard(o/2, min(k*3, size-o/2))
		img.WriteZeroes(o/3, min(k*2, size-o/3), 0)
		img.WriteZeroes(o/4, min(k, size-o/4), disk.ZeroNoUnmap)
		img.WriteAt(buf, size-k)
		img.Flush()
		img.ReadAt(buf, o)
		img.Close()
		if grown, _ := mem.Size(); grown > int64(len(data))+64<<20 {
			t.Fatalf("the file grew from %d to %d bytes", len(data), grown)
		}
	})
}
