package qcow2

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/disk/hostfile"
	_ "github.com/imgloop/imgloop/disk/raw"
	"github.com/imgloop/imgloop/internal/qemutest"
)

// openImage opens path with this package's Open and closes it at the end
// of the test.
func openImage(t testing.TB, path string, opts disk.OpenOptions) *Image {
	t.Helper()
	f, err := hostfile.Open(path, true)
	if err != nil {
		t.Fatal(err)
	}
	img, err := Open(f, opts)
	if err != nil {
		f.Close()
		t.Fatalf("Open(%s): %v", path, err)
	}
	t.Cleanup(func() { img.Close() })
	return img
}

// writeFile writes data to dir/name and returns the path.
func writeFile(t testing.TB, dir, name string, data []byte) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// compareImage reads img whole and in random pieces (serially and from
// several goroutines) and compares every byte with ref.
func compareImage(t *testing.T, img *Image, ref []byte) {
	t.Helper()
	compareImageN(t, img, ref, 50)
}

// compareImageN is compareImage with reads random reads per goroutine.
func compareImageN(t *testing.T, img *Image, ref []byte, reads int) {
	t.Helper()
	if img.Size() != int64(len(ref)) {
		t.Fatalf("Size() = %d, qemu-img reads %d bytes", img.Size(), len(ref))
	}
	got := make([]byte, len(ref))
	if n, err := img.ReadAt(got, 0); err != nil || n != len(got) {
		t.Fatalf("ReadAt(whole disk) = %d, %v", n, err)
	}
	if !bytes.Equal(got, ref) {
		d := qemutest.FirstDiff(got, ref)
		t.Fatalf("whole-disk read differs from qemu-img at offset %#x: got %#x, want %#x", d, got[d], ref[d])
	}
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for g := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(g), 42))
			buf := make([]byte, 160<<10)
			for range reads {
				off := rng.Int64N(int64(len(ref)))
				n := rng.Int64N(min(int64(len(buf)), int64(len(ref))-off) + 1)
				if rng.IntN(4) == 0 { // sector-aligned requests too
					off &^= 511
					n = min(n&^511+512, int64(len(ref))-off)
				}
				if _, err := img.ReadAt(buf[:n], off); err != nil {
					errs <- fmt.Errorf("ReadAt(%d bytes at %#x): %v", n, off, err)
					return
				}
				if !bytes.Equal(buf[:n], ref[off:off+n]) {
					d := qemutest.FirstDiff(buf[:n], ref[off:off+n])
					errs <- fmt.Errorf("ReadAt(%d bytes at %#x) differs at disk offset %#x", n, off, off+d)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// TestReadMatchesQemu builds images with qemu-img and qemu-io and checks
// that ReadAt returns what `qemu-img convert -O raw` does.
func TestReadMatchesQemu(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	writes := []string{
		"write -P 0x11 0 64k",
		"write -P 0x22 100000 3000",
		"write -P 0x33 1048064 129k", // crosses an L2 slice of 4 KiB clusters
		"write -P 0x44 3145728 512",
		"write -P 0x55 4193792 512", // last sector
	}
	tests := []struct {
		name  string
		opts  string
		size  string
		cmds  []string
		after func(t *testing.T, dir, img string) // extra setup, may be nil
	}{
		{name: "v2", opts: "compat=0.10", size: "4M", cmds: writes},
		{name: "v3", opts: "compat=1.1", size: "4M", cmds: writes},
		{name: "v3-4k-clusters", opts: "cluster_size=4096", size: "4M", cmds: writes},
		{name: "v3-512-clusters", opts: "cluster_size=512", size: "4M", cmds: writes},
		{name: "v3-2M-clusters", opts: "cluster_size=2M", size: "4M", cmds: writes},
		{name: "zero-clusters", opts: "cluster_size=4096", size: "4M", cmds: append(writes,
			"write -z 0 8k",                // whole clusters over data: zero flag
			"write -z 1048576 4096",        // inside the 0x33 run
			"write -z 2097152 64k",         // never written
			"write -z 100352 1000",         // partial cluster: written as zeros
			"discard 3145728 4096",         // back to unallocated
			"write -z -u 3149824 8192",     // zero with unmap
			"write -P 0x66 3153920 4096")}, // data after zeros
		{name: "preallocated-zero", opts: "cluster_size=4096,preallocation=metadata", size: "1M", cmds: []string{
			"write -P 0x77 0 64k", "write -z 4096 8k", "write -P 0x78 500000 20000"}},
		{name: "empty", opts: "", size: "1M"},
		{name: "unaligned-size", opts: "cluster_size=4096", size: "1000000", cmds: []string{"write -P 0x99 995000 5000"}},
		{name: "extended-l2", opts: "extended_l2=on,cluster_size=64k", size: "4M", cmds: []string{
			"write -P 0x11 1000 100", // one subcluster of 2 KiB
			"write -P 0x22 6144 4096",
			"write -P 0x33 65536 64k", // a whole cluster
			"write -z 69632 2048",     // a zero subcluster inside it
			"write -P 0x44 200000 30000",
			"write -z 300000 100000",
			"discard 212992 4096"}},
		{name: "extended-l2-32k", opts: "extended_l2=on,cluster_size=32k", size: "2M", cmds: []string{
			"write -P 0x11 0 1024", "write -P 0x22 31744 1024", "write -z 1024 1024", "write -P 0x33 40000 100"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			p := filepath.Join(dir, "img.qcow2")
			qemutest.Create(t, p, "qcow2", tc.opts, tc.size)
			if len(tc.cmds) > 0 {
				qemutest.IO(t, p, "qcow2", tc.cmds...)
			}
			img := openImage(t, p, disk.OpenOptions{ReadOnly: true})
			compareImage(t, img, qemutest.RawBytes(t, p))
		})
	}
}

// TestReadCompressed reads images whose clusters qemu-img compressed with
// zlib and zstd, including images mixing compressed and normal clusters.
func TestReadCompressed(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	tests := []struct {
		name string
		opts string
	}{
		{"zlib-64k", "compression_type=zlib"},
		{"zstd-64k", "compression_type=zstd"},
		{"zlib-4k", "compression_type=zlib,cluster_size=4096"},
		{"zstd-512", "compression_type=zstd,cluster_size=512"},
		{"zlib-512", "compression_type=zlib,cluster_size=512"},
		{"zlib-2M", "compression_type=zlib,cluster_size=2M"},
		{"zlib-v2", "compat=0.10,cluster_size=16k"},
		{"zstd-extended-l2", "compression_type=zstd,extended_l2=on"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			// At least two clusters, so that the write below leaves one
			// compressed.
			data := qemutest.Compressible(int64(len(tc.name)), 1<<20)
			if strings.Contains(tc.opts, "2M") {
				data = qemutest.Compressible(int64(len(tc.name)), 6<<20)
			}
			clear(data[512<<10 : 512<<10+150000]) // zeros stay unallocated
			src := writeFile(t, dir, "src.raw", data)
			p := filepath.Join(dir, "img.qcow2")
			qemutest.Img(t, "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", tc.opts, src, p)
			// Some uncompressed data beside the compressed clusters.
			qemutest.IO(t, p, "qcow2", "write -P 0x5a 800000 70000")
			img := openImage(t, p, disk.OpenOptions{ReadOnly: true})
			n := 0
			for off := int64(0); off < img.Size(); {
				e, err := img.Map(off, img.Size()-off)
				if err != nil {
					t.Fatal(err)
				}
				if e.Status&disk.StatusData != 0 && e.HostOffset < 0 {
					n++
				}
				off += e.Length
			}
			if n == 0 {
				t.Fatal("image has no compressed clusters")
			}
			reads := 50
			if strings.Contains(tc.opts, "2M") {
				reads = 10 // each read inflates 2 MiB clusters
			}
			compareImageN(t, img, qemutest.RawBytes(t, p), reads)
		})
	}
}

// TestReadBackingChain reads a three-layer chain with a raw base shorter
// than the overlays, and a qcow2-only chain.
func TestReadBackingChain(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	for _, baseFmt := range []string{"raw", "qcow2"} {
		t.Run(baseFmt, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			base := filepath.Join(dir, "base."+baseFmt)
			qemutest.Create(t, base, baseFmt, "", "3M")
			qemutest.IO(t, base, baseFmt, "write -P 0xb1 0 3M")
			mid := filepath.Join(dir, "mid.qcow2")
			qemutest.Create(t, mid, "qcow2", "cluster_size=4096", "4M", "-b", "base."+baseFmt, "-F", baseFmt)
			qemutest.IO(t, mid, "qcow2", "write -P 0xc2 4096 8192", "write -z 65536 65536", "write -P 0xc3 3145000 10000")
			top := filepath.Join(dir, "top.qcow2")
			qemutest.Create(t, top, "qcow2", "extended_l2=on", "5M", "-b", "mid.qcow2", "-F", "qcow2")
			qemutest.IO(t, top, "qcow2", "write -P 0xd4 0 3000", "write -P 0xd5 70000 5000", "write -z 2048 2048", "write -P 0xd6 4194304 4096")
			img := openImage(t, top, disk.OpenOptions{ReadOnly: true})
			compareImage(t, img, qemutest.RawBytes(t, top))
			if img.Backing() == nil {
				t.Fatal("Backing() = nil")
			}
			loc, err := img.Locate(2 << 20)
			if err != nil || loc.ClusterType != "normal" || loc.Depth != 2 || loc.File == "" || loc.HostClusterOffset < 0 {
				t.Errorf("Locate(2M) = %+v, %v; want normal data of the base at depth 2", loc, err)
			}
			info := img.Info()
			if info.BackingFilename != "mid.qcow2" || info.FullBackingFilename != filepath.Join(dir, "mid.qcow2") || info.BackingFormat != "qcow2" {
				t.Errorf("Info() backing = %q, %q, %q", info.BackingFilename, info.FullBackingFilename, info.BackingFormat)
			}
		})
	}
}

// TestReadProbedBacking opens a backing file whose format is not recorded.
func TestReadProbedBacking(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	qemutest.Create(t, base, "qcow2", "", "1M")
	qemutest.IO(t, base, "qcow2", "write -P 0x12 0 1M")
	top := filepath.Join(dir, "top.qcow2")
	qemutest.Create(t, top, "qcow2", "", "1M", "-b", base, "-F", "qcow2")
	qemutest.IO(t, top, "qcow2", "write -P 0x13 4096 4096")
	// Drop the backing format extension: qemu-img insists on writing one,
	// so turn it into an unknown extension, which readers ignore.
	hdr, err := os.ReadFile(top)
	if err != nil {
		t.Fatal(err)
	}
	i := bytes.Index(hdr[:4096], []byte{0xe2, 0x79, 0x2a, 0xca})
	if i < 0 {
		t.Fatal("no backing format extension")
	}
	f, err := os.OpenFile(top, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte{0x12, 0x34, 0x56, 0x78}, int64(i)); err != nil {
		t.Fatal(err)
	}
	f.Close()
	img := openImage(t, top, disk.OpenOptions{ReadOnly: true})
	if got := img.Info().BackingFormat; got != "qcow2" {
		t.Errorf("probed backing format = %q, want qcow2", got)
	}
	compareImage(t, img, qemutest.RawBytes(t, top))
}

// TestReadDataFile reads images with an external data file, raw and not.
func TestReadDataFile(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	for _, raw := range []bool{false, true} {
		t.Run(fmt.Sprintf("raw=%v", raw), func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			p := filepath.Join(dir, "img.qcow2")
			// qemu-img resolves a relative data_file against its working
			// directory, so name it absolutely.
			opts := "data_file=" + filepath.Join(dir, "img.data")
			if raw {
				opts += ",data_file_raw=on"
			}
			qemutest.Create(t, p, "qcow2", opts, "4M")
			qemutest.IO(t, p, "qcow2", "write -P 0x11 70000 100", "write -P 0x22 1M 1M", "write -z 1100000 65536")
			img := openImage(t, p, disk.OpenOptions{ReadOnly: true})
			compareImage(t, img, qemutest.RawBytes(t, p))
			e, err := img.Map(1<<20, 4096)
			if err != nil {
				t.Fatal(err)
			}
			if e.HostFile != filepath.Join(dir, "img.data") || e.HostOffset != 1<<20 {
				t.Errorf("Map(1M) = %+v, want host offset 1M in img.data", e)
			}
		})
	}
}

// TestReadSnapshot opens internal snapshots read-only.
func TestReadSnapshot(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	p := filepath.Join(dir, "img.qcow2")
	qemutest.Create(t, p, "qcow2", "cluster_size=4096", "2M")
	qemutest.IO(t, p, "qcow2", "write -P 0x11 0 1M")
	qemutest.Img(t, "snapshot", "-c", "first", p)
	qemutest.IO(t, p, "qcow2", "write -P 0x22 4096 8192", "write -z 500000 100000")
	qemutest.Img(t, "resize", p, "3M")
	qemutest.IO(t, p, "qcow2", "write -P 0x33 2500000 4096")
	qemutest.Img(t, "snapshot", "-c", "second", p)
	qemutest.IO(t, p, "qcow2", "write -P 0x44 0 2M")

	for _, snap := range []string{"", "first", "second", "1"} {
		t.Run("snapshot="+snap, func(t *testing.T) {
			img := openImage(t, p, disk.OpenOptions{ReadOnly: true, Snapshot: snap})
			var args []string
			if snap != "" {
				args = []string{"-l", snap}
			}
			ref := qemutest.RawBytes(t, p, args...)
			// qemu-img convert -l keeps the current virtual size; the
			// snapshot view has the size the snapshot recorded.
			want := map[string]int64{"": 3 << 20, "first": 2 << 20, "1": 2 << 20, "second": 3 << 20}[snap]
			if img.Size() != want || int64(len(ref)) < want {
				t.Fatalf("Size() = %d, want %d (qemu-img: %d)", img.Size(), want, len(ref))
			}
			compareImage(t, img, ref[:want])
			if len(img.Snapshots()) != 2 || len(img.Info().Snapshots) != 2 {
				t.Errorf("%d snapshots, want 2", len(img.Snapshots()))
			}
		})
	}
}

// TestReadAtErrors checks the request checks and the closed state.
func TestReadAtErrors(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	p := filepath.Join(t.TempDir(), "img.qcow2")
	qemutest.Create(t, p, "qcow2", "", "1M")
	img := openImage(t, p, disk.OpenOptions{ReadOnly: true})
	buf := make([]byte, 4096)
	for _, off := range []int64{-1, 1<<20 - 4095, 1 << 20, 1 << 62} {
		if n, err := img.ReadAt(buf, off); !errors.Is(err, disk.ErrOutOfRange) || n != 0 {
			t.Errorf("ReadAt(4096 at %d) = %d, %v; want ErrOutOfRange", off, n, err)
		}
	}
	if n, err := img.ReadAt(buf[:0], 1<<20); err != nil || n != 0 {
		t.Errorf("empty ReadAt at the end = %d, %v", n, err)
	}
	if _, err := img.WriteAt(buf, 0); !errors.Is(err, disk.ErrReadOnly) {
		t.Errorf("WriteAt = %v, want ErrReadOnly", err)
	}
	if err := img.Discard(0, 4096); !errors.Is(err, disk.ErrReadOnly) {
		t.Errorf("Discard = %v, want ErrReadOnly", err)
	}
	if err := img.WriteZeroes(0, 4096, 0); !errors.Is(err, disk.ErrReadOnly) {
		t.Errorf("WriteZeroes = %v, want ErrReadOnly", err)
	}
	if err := img.Flush(); err != nil {
		t.Errorf("Flush = %v", err)
	}
	if err := img.Close(); err != nil {
		t.Fatalf("Close = %v", err)
	}
	for name, err := range map[string]error{
		"Close": img.Close(), "Flush": img.Flush(), "ReadAt": func() error { _, err := img.ReadAt(buf, 0); return err }(),
		"Map": func() error { _, err := img.Map(0, 1); return err }(),
	} {
		if !errors.Is(err, disk.ErrClosed) {
			t.Errorf("%s after Close = %v, want ErrClosed", name, err)
		}
	}
}

// TestDiskOpen opens through the registry, by probing and by name.
func TestDiskOpen(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	p := filepath.Join(t.TempDir(), "img.qcow2")
	qemutest.Create(t, p, "qcow2", "", "1M")
	qemutest.IO(t, p, "qcow2", "write -P 0x42 0 1000")
	for _, format := range []string{"", "qcow2"} {
		img, err := disk.Open(p, disk.OpenOptions{Format: format, ReadOnly: true})
		if err != nil {
			t.Fatalf("disk.Open(format %q): %v", format, err)
		}
		buf := make([]byte, 1000)
		if _, err := img.ReadAt(buf, 0); err != nil || !bytes.Equal(buf, bytes.Repeat([]byte{0x42}, 1000)) {
			t.Errorf("ReadAt = %v, data %x...", err, buf[:8])
		}
		if img.SectorSize() != 512 {
			t.Errorf("SectorSize = %d", img.SectorSize())
		}
		img.Close()
	}
}

func TestProbe(t *testing.T) {
	tests := []struct {
		hdr  string
		want int
	}{
		{"QFI\xfb\x00\x00\x00\x02", 100},
		{"QFI\xfb\x00\x00\x00\x03rest", 100},
		{"QFI\xfb\x00\x00\x00\x01", 0},   // qcow v1: disk.Probe names it
		{"QFI\xfb\x00\x00\x00\x04", 100}, // Open refuses the version
		{"QFI\xfb\x00\x00\x00\x00", 100},
		{"QFI\xfb", 0},
		{"", 0},
		{"QFI\xfa\x00\x00\x00\x03", 0},
	}
	for _, tc := range tests {
		if got := (Driver{}).Probe([]byte(tc.hdr)); got != tc.want {
			t.Errorf("Probe(%q) = %d, want %d", tc.hdr, got, tc.want)
		}
	}
}

// BenchmarkReadAt reads a qcow2 image with 4 KiB random reads and 1 MiB
// sequential reads, to watch the hot path's cost and allocations.
func BenchmarkReadAt(b *testing.B) {
	qemutest.Require(b, "qemu-img", "qemu-io")
	dir := b.TempDir()
	p := filepath.Join(dir, "img.qcow2")
	qemutest.Create(b, p, "qcow2", "", "64M")
	qemutest.IO(b, p, "qcow2", "write -P 0x11 0 64M")
	img := openImage(b, p, disk.OpenOptions{ReadOnly: true})
	for _, bs := range []int{4 << 10, 1 << 20} {
		b.Run(fmt.Sprintf("bs=%d", bs), func(b *testing.B) {
			buf := make([]byte, bs)
			rng := rand.New(rand.NewPCG(1, 2))
			b.SetBytes(int64(bs))
			b.ReportAllocs()
			for b.Loop() {
				off := rng.Int64N(img.Size()/int64(bs)) * int64(bs)
				if _, err := img.ReadAt(buf, off); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// TestReadRandomWrites applies seeded random qemu-io writes, zero writes
// and discards to images of several layouts (over a backing file) and
// compares the result with qemu-img's reading.
func TestReadRandomWrites(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	const size = 3 << 20
	configs := []string{
		"compat=0.10,cluster_size=4096",
		"cluster_size=512",
		"cluster_size=65536",
		"extended_l2=on,cluster_size=32k",
		"extended_l2=on,cluster_size=2M",
	}
	for i, opts := range configs {
		t.Run(opts, func(t *testing.T) {
			t.Parallel()
			seed := uint64(i + 1)
			rng := rand.New(rand.NewPCG(seed, 7))
			dir := t.TempDir()
			base := filepath.Join(dir, "base.qcow2")
			qemutest.Create(t, base, "qcow2", "cluster_size=4096", "2M")
			qemutest.IO(t, base, "qcow2", "write -P 0xba 0 2M")
			p := filepath.Join(dir, "img.qcow2")
			qemutest.Create(t, p, "qcow2", opts, fmt.Sprint(size), "-b", "base.qcow2", "-F", "qcow2")
			var cmds []string
			for range 60 {
				off := rng.Int64N(size)
				n := min(1+rng.Int64N(200<<10), size-off)
				if rng.IntN(3) > 0 { // mostly sector-aligned
					off &^= 511
					n = min((n+511)&^511, size-off)
				}
				switch rng.IntN(6) {
				case 0:
					cmds = append(cmds, fmt.Sprintf("write -z %d %d", off, n))
				case 1:
					cmds = append(cmds, fmt.Sprintf("discard %d %d", off, n))
				default:
					cmds = append(cmds, fmt.Sprintf("write -P %d %d %d", 1+rng.IntN(254), off, n))
				}
			}
			qemutest.IO(t, p, "qcow2", cmds...)
			img := openImage(t, p, disk.OpenOptions{ReadOnly: true})
			t.Logf("seed %d", seed)
			compareImage(t, img, qemutest.RawBytes(t, p))
			compareMap(t, img, p)
		})
	}
}

// TestInfoMatchesQemu compares Info's JSON with `qemu-img info` for the
// keys both print.
func TestInfoMatchesQemu(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	dir := t.TempDir()
	base := filepath.Join(dir, "base.raw")
	qemutest.Create(t, base, "raw", "", "1M")
	top := filepath.Join(dir, "top.qcow2")
	qemutest.Create(t, top, "qcow2", "cluster_size=16k,extended_l2=on,compression_type=zstd", "3M", "-b", "base.raw", "-F", "raw")
	qemutest.Img(t, "snapshot", "-c", "snap", top)
	img := openImage(t, top, disk.OpenOptions{ReadOnly: true})
	b, err := json.Marshal(img.Info())
	if err != nil {
		t.Fatal(err)
	}
	var got map[string]any
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatal(err)
	}
	want := qemutest.Info(t, top)
	for _, key := range []string{"format", "virtual-size", "cluster-size", "backing-filename", "full-backing-filename",
		"backing-filename-format", "dirty-flag"} {
		if fmt.Sprint(got[key]) != fmt.Sprint(want[key]) {
			t.Errorf("%s = %v, qemu-img info says %v", key, got[key], want[key])
		}
	}
	if s, ok := got["snapshots"].([]any); !ok || len(s) != 1 {
		t.Errorf("snapshots = %v", got["snapshots"])
	}
}
