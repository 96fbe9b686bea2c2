package qcow2

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/disk/hostfile"
	"github.com/imgloop/imgloop/disk/hostfile/hostfiletest"
	"github.com/imgloop/imgloop/internal/qemutest"
)

// l2EntryOffset returns the file offset of the L2 entry of guest offset
// off in the qcow2 image data (active L1 table, 8- or 16-byte entries).
func l2EntryOffset(t *testing.T, data []byte, off int64, entryBytes int) int64 {
	t.Helper()
	be := binary.BigEndian
	bits := be.Uint32(data[20:])
	l1 := int64(be.Uint64(data[40:]))
	l2Bits := bits - 3
	if entryBytes == 16 {
		l2Bits = bits - 4
	}
	ci := off >> bits
	l2 := int64(be.Uint64(data[l1+8*(ci>>l2Bits):]) & offsetMask)
	if l2 == 0 {
		t.Fatalf("no L2 table for offset %#x", off)
	}
	return l2 + (ci&(1<<l2Bits-1))*int64(entryBytes)
}

// TestReadCorruptEntries patches L2 entries of a good image: each read of
// the corrupt cluster must fail with ErrCorrupt (never read as zeros or
// panic), and reads elsewhere must still work.
func TestReadCorruptEntries(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	good := filepath.Join(dir, "good.qcow2")
	qemutest.Create(t, good, "qcow2", "cluster_size=4096", "1M")
	qemutest.IO(t, good, "qcow2", "write -P 0x11 0 64k")
	ext := filepath.Join(dir, "ext.qcow2")
	qemutest.Create(t, ext, "qcow2", "extended_l2=on", "1M")
	qemutest.IO(t, ext, "qcow2", "write -P 0x22 0 4096")
	comp := filepath.Join(dir, "comp.qcow2")
	src := writeFile(t, dir, "src.raw", qemutest.Compressible(5, 1<<20))
	qemutest.Img(t, "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", src, comp)

	tests := []struct {
		name  string
		image string
		entry int // 8 or 16
		patch func(e, bitmap uint64, fileSize int64) (uint64, uint64)
		what  string
	}{
		{"past EOF", good, 8, func(e, b uint64, size int64) (uint64, uint64) { return 1<<63 | uint64(size+1<<20)&^4095, b }, "past the end"},
		{"reserved", good, 8, func(e, b uint64, _ int64) (uint64, uint64) { return e | 1<<57, b }, "reserved"},
		{"unaligned", good, 8, func(e, b uint64, _ int64) (uint64, uint64) { return e + 512, b }, "aligned"},
		{"alloc and zero", ext, 16, func(e, b uint64, _ int64) (uint64, uint64) { return e, b | b<<32 }, "both"},
		{"alloc without host", ext, 16, func(e, b uint64, _ int64) (uint64, uint64) { return 0, b }, "unallocated cluster"},
		{"compressed past EOF", comp, 8, func(e, b uint64, size int64) (uint64, uint64) { return 1<<62 | uint64(size+512), b }, "outside the file"},
		{"compressed garbage", comp, 8, func(e, b uint64, size int64) (uint64, uint64) { return 1<<62 | 1<<58 | 512, b }, "inflate"}, // x = 58 for 4 KiB clusters,
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			data, err := os.ReadFile(tc.image)
			if err != nil {
				t.Fatal(err)
			}
			at := l2EntryOffset(t, data, 0, tc.entry)
			var bitmap uint64
			if tc.entry == 16 {
				bitmap = binary.BigEndian.Uint64(data[at+8:])
			}
			e, bitmap := tc.patch(binary.BigEndian.Uint64(data[at:]), bitmap, int64(len(data)))
			binary.BigEndian.PutUint64(data[at:], e)
			if tc.entry == 16 {
				binary.BigEndian.PutUint64(data[at+8:], bitmap)
			}
			p := writeFile(t, t.TempDir(), "bad.qcow2", data)
			img := openImage(t, p, disk.OpenOptions{ReadOnly: true})
			buf := bytes.Repeat([]byte{0xee}, 512)
			_, err = img.ReadAt(buf, 0)
			var fe *disk.FormatError
			if !errors.Is(err, disk.ErrCorrupt) || !errors.As(err, &fe) || !strings.Contains(err.Error(), tc.what) {
				t.Fatalf("ReadAt = %v; want a corruption error mentioning %q", err, tc.what)
			}
			if tc.what != "inflate" { // Map and Locate do not inflate
				if _, err := img.Map(0, 512); !errors.Is(err, disk.ErrCorrupt) {
					t.Errorf("Map = %v, want ErrCorrupt", err)
				}
				if _, err := img.Locate(0); !errors.Is(err, disk.ErrCorrupt) {
					t.Errorf("Locate = %v, want ErrCorrupt", err)
				}
			}
			// The rest of the image still reads.
			if _, err := img.ReadAt(buf, 512<<10); err != nil {
				t.Errorf("ReadAt elsewhere = %v", err)
			}
		})
	}
}

// TestOpenCorruptL1 checks that bad L1 entries are refused at Open.
func TestOpenCorruptL1(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	good := filepath.Join(dir, "good.qcow2")
	qemutest.Create(t, good, "qcow2", "", "1M")
	qemutest.IO(t, good, "qcow2", "write -P 0x11 0 64k")
	data, err := os.ReadFile(good)
	if err != nil {
		t.Fatal(err)
	}
	l1 := int64(binary.BigEndian.Uint64(data[40:]))
	entry := binary.BigEndian.Uint64(data[l1:])
	for _, tc := range []struct {
		name string
		e    uint64
	}{
		{"past EOF", 1<<63 | uint64(len(data))<<4},
		{"reserved", entry | 1<<60},
		{"unaligned", entry + 4096},
	} {
		bad := bytes.Clone(data)
		binary.BigEndian.PutUint64(bad[l1:], tc.e)
		p := writeFile(t, dir, "bad.qcow2", bad)
		f, err := hostfile.Open(p, true)
		if err != nil {
			t.Fatal(err)
		}
		img, err := Open(f, disk.OpenOptions{ReadOnly: true})
		f.Close()
		if !errors.Is(err, disk.ErrCorrupt) {
			t.Errorf("%s: Open = %v, %v; want ErrCorrupt", tc.name, img, err)
		}
	}
}

// TestReadTruncated opens every sector-aligned prefix of an image (and a
// few odd lengths): each must fail cleanly or read without panicking.
func TestReadTruncated(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	p := filepath.Join(dir, "img.qcow2")
	src := writeFile(t, dir, "src.raw", qemutest.Compressible(9, 256<<10))
	qemutest.Img(t, "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", src, p)
	qemutest.IO(t, p, "qcow2", "write -P 0x11 0 8k", "write -z 64k 4k")
	data, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 256<<10)
	for n := 0; n < len(data); n += 512 {
		for _, cut := range []int{n, n + 7} {
			f := hostfiletest.NewMemFile("img.qcow2", data[:min(cut, len(data))])
			img, err := Open(f, disk.OpenOptions{ReadOnly: true})
			if err != nil {
				if !errors.Is(err, disk.ErrFormat) && !errors.Is(err, disk.ErrNotSupported) {
					t.Errorf("Open(%d bytes) = %v, want a format error", cut, err)
				}
				continue
			}
			if _, err := img.ReadAt(buf, 0); err != nil && !errors.Is(err, disk.ErrFormat) {
				t.Errorf("ReadAt of %d-byte prefix = %v, want a format error", cut, err)
			}
			img.Close()
		}
	}
}

// TestDataFileOffsetMismatch: with an external data file, a data cluster
// must sit at its guest offset.
func TestDataFileOffsetMismatch(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	p := filepath.Join(dir, "img.qcow2")
	qemutest.Create(t, p, "qcow2", "data_file="+filepath.Join(dir, "img.data"), "1M")
	qemutest.IO(t, p, "qcow2", "write -P 0x11 0 128k")
	data, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	at := l2EntryOffset(t, data, 65536, 8)
	binary.BigEndian.PutUint64(data[at:], 1<<63|2<<16) // guest cluster 1 -> host cluster 2
	if err := os.WriteFile(p, data, 0o644); err != nil {
		t.Fatal(err)
	}
	img := openImage(t, p, disk.OpenOptions{ReadOnly: true})
	if _, err := img.ReadAt(make([]byte, 512), 65536); !errors.Is(err, disk.ErrCorrupt) {
		t.Errorf("ReadAt = %v, want ErrCorrupt", err)
	}
	if _, err := img.ReadAt(make([]byte, 512), 0); err != nil {
		t.Errorf("ReadAt(0) = %v", err)
	}
}

// openFDs counts this process's open file descriptors.
func openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skip("no /proc/self/fd")
	}
	return len(ents)
}

// TestOpenFailureCloses checks that a failed Open closes the data file and
// backing images it opened, and reports the missing backing file.
func TestOpenFailureCloses(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	qemutest.Create(t, base, "qcow2", "", "1M")
	mid := filepath.Join(dir, "mid.qcow2")
	qemutest.Create(t, mid, "qcow2", "", "1M", "-b", "base.qcow2", "-F", "qcow2")
	top := filepath.Join(dir, "top.qcow2")
	qemutest.Create(t, top, "qcow2", "data_file="+filepath.Join(dir, "top.data"), "1M", "-b", "mid.qcow2", "-F", "qcow2")
	if err := os.Remove(base); err != nil {
		t.Fatal(err)
	}
	before := openFDs(t)
	f, err := hostfile.Open(top, true)
	if err != nil {
		t.Fatal(err)
	}
	_, err = Open(f, disk.OpenOptions{ReadOnly: true})
	f.Close()
	if !errors.Is(err, os.ErrNotExist) || !strings.Contains(err.Error(), `backing file "mid.qcow2"`) {
		t.Errorf("Open = %v, want the missing base reported through mid.qcow2", err)
	}
	if after := openFDs(t); after != before {
		t.Errorf("%d file descriptors open after the failed Open, %d before", after, before)
	}
}

// TestBackingLoop: an image whose backing chain loops is refused.
func TestBackingLoop(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	dir := t.TempDir()
	a := filepath.Join(dir, "a.qcow2")
	b := filepath.Join(dir, "b.qcow2")
	qemutest.Create(t, b, "qcow2", "", "1M")
	qemutest.Create(t, a, "qcow2", "", "1M", "-b", "b.qcow2", "-F", "qcow2")
	qemutest.Img(t, "rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", b)
	before := openFDs(t)
	_, err := disk.Open(a, disk.OpenOptions{ReadOnly: true})
	if !errors.Is(err, disk.ErrFormat) || !strings.Contains(err.Error(), "loop") {
		t.Errorf("Open = %v, want a loop error", err)
	}
	if after := openFDs(t); after != before {
		t.Errorf("%d file descriptors open after the failed Open, %d before", after, before)
	}
}

// FuzzImage opens arbitrary bytes as a qcow2 image and, if that works,
// reads and maps the start of its disk: there must be no panic, hang or
// huge allocation, and every failure must be a format error. The seeds
// are small images qemu-img builds at test time.
func FuzzImage(f *testing.F) {
	qemutest.Require(f, "qemu-img", "qemu-io")
	dir := f.TempDir()
	add := func(p string) {
		data, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data)
	}
	plain := filepath.Join(dir, "plain.qcow2")
	qemutest.Create(f, plain, "qcow2", "cluster_size=4096", "256k")
	qemutest.IO(f, plain, "qcow2", "write -P 0x11 0 8k", "write -z 16k 4k", "write -P 0x22 100000 5000")
	add(plain)
	ext := filepath.Join(dir, "ext.qcow2")
	qemutest.Create(f, ext, "qcow2", "cluster_size=16k,extended_l2=on", "256k")
	qemutest.IO(f, ext, "qcow2", "write -P 0x11 512 1024", "write -z 4096 1024")
	add(ext)
	src := writeFile(f, dir, "src.raw", qemutest.Compressible(1, 64<<10))
	for _, typ := range []string{"zlib", "zstd"} {
		p := filepath.Join(dir, typ+".qcow2")
		qemutest.Img(f, "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096,compression_type="+typ, src, p)
		add(p)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		img, err := Open(hostfiletest.NewMemFile("fuzz.qcow2", data), disk.OpenOptions{ReadOnly: true, CacheSize: 64 << 10})
		if err != nil {
			return
		}
		defer img.Close()
		n := min(img.Size(), 1<<20)
		buf := make([]byte, n)
		if _, err := img.ReadAt(buf, 0); err != nil && !errors.Is(err, disk.ErrFormat) && img.Backing() == nil {
			t.Fatalf("ReadAt: %v", err)
		}
		if n > 0 {
			disk.Extents(img, 0, n, func(disk.Extent) error { return nil })
			img.Locate(n - 1)
		}
	})
}

// TestReadParallelInflateError: when one of several compressed clusters a
// read inflates in parallel is bad, ReadAt reports it, with n at its start.
func TestReadParallelInflateError(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	dir := t.TempDir()
	src := writeFile(t, dir, "src.raw", qemutest.Compressible(4, 256<<10))
	p := filepath.Join(dir, "img.qcow2")
	qemutest.Img(t, "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", src, p)
	want := qemutest.RawBytes(t, p)
	data, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	at := l2EntryOffset(t, data, 13*4096, 8)
	binary.BigEndian.PutUint64(data[at:], 1<<62|1<<58|512) // inflates garbage
	p = writeFile(t, dir, "bad.qcow2", data)
	img := openImage(t, p, disk.OpenOptions{ReadOnly: true})
	buf := make([]byte, 20*4096)
	n, err := img.ReadAt(buf, 0)
	if !errors.Is(err, disk.ErrCorrupt) || n != 13*4096 {
		t.Fatalf("ReadAt = %d, %v; want %d and ErrCorrupt", n, err, 13*4096)
	}
	if !bytes.Equal(buf[:n], want[:n]) {
		t.Errorf("the clusters before the bad one differ")
	}
	n, err = img.ReadAt(buf[:12*4096], 4096) // all good
	if err != nil || !bytes.Equal(buf[:n], want[4096:13*4096]) {
		t.Errorf("ReadAt of good clusters = %d, %v", n, err)
	}
}
