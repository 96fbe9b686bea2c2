package qcow2

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/disk/hostfile"
	"github.com/imgloop/imgloop/internal/qemutest"
)

// streamTestDisk returns a disk of size bytes mixing, by 4 KiB block:
// zeros, random data, compressible text, runs of one byte, and an 8 KiB
// random pattern repeated (which a deflate stream with a 32 KiB window would compress
// with references QEMU's 4 KiB window cannot follow).
func streamTestDisk(size int) []byte {
	b := make([]byte, size)
	r := rand.New(rand.NewPCG(1, 2))
	pattern := make([]byte, 8192)
	for i := range pattern {
		pattern[i] = byte(r.Uint32())
	}
	text := qemutest.Compressible(7, size)
	for off := 0; off < size; off += 4096 {
		end := min(size, off+4096)
		switch (off / 4096 / 5) % 5 { // runs of 5 blocks
		case 0:
		case 1:
			for i := off; i < end; i++ {
				b[i] = byte(r.Uint32())
			}
		case 2:
			copy(b[off:end], text[off:end])
		case 3:
			for i := off; i < end; i++ {
				b[i] = pattern[i%len(pattern)]
			}
		case 4:
			for i := off; i < end; i++ {
				b[i] = byte(off >> 12)
			}
		}
	}
	return b
}

// writeStream writes data as a qcow2 image at path with a StreamWriter,
// leaving all-zero clusters out and compressing the others if compress.
// It returns the number of clusters stored compressed.
func writeStream(t *testing.T, path string, data []byte, opts map[string]string, compress bool) int {
	t.Helper()
	f, err := hostfile.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	w, err := NewStreamWriter(f, int64(len(data)), opts)
	if err != nil {
		t.Fatal(err)
	}
	cs := w.ClusterSize()
	nc := 0
	var cbuf []byte
	for i := int64(0); i < w.Clusters(); i++ {
		c := make([]byte, cs)
		copy(c, data[min(len(data), int(i)*cs):])
		if bytes.Equal(c, make([]byte, cs)) {
			continue
		}
		if compress {
			var ok bool
			if cbuf, ok = w.Compress(cbuf[:0], c); ok {
				nc++
				if err := w.WriteCompressed(i, cbuf); err != nil {
					t.Fatal(err)
				}
				continue
			}
		}
		if err := w.WriteCluster(i, c); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return nc
}

// readImage returns the virtual disk of the image at path as imgloop
// reads it.
func readImage(t *testing.T, path string) []byte {
	t.Helper()
	img, err := disk.Open(path, disk.OpenOptions{Format: "qcow2", ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	b := make([]byte, img.Size())
	if _, err := img.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	return b
}

func TestStreamWriter(t *testing.T) {
	const size = 3<<20 + 1536
	data := streamTestDisk(size)
	_, errQemu := exec.LookPath("qemu-img")
	for _, tc := range []struct {
		name     string
		opts     string
		compress bool
	}{
		{"default", "", false},
		{"default-zlib", "", true},
		{"zstd", "compression_type=zstd", true},
		{"4k", "cluster_size=4k", false},
		{"4k-zlib", "cluster_size=4k", true},
		{"512-zlib", "cluster_size=512", true},
		{"2M-zstd", "cluster_size=2M,compression_type=zstd", true},
		{"v2", "compat=0.10", false},
		{"v2-zlib", "compat=0.10", true},
		{"extended-l2", "extended_l2=on", false},
		{"extended-l2-zlib", "extended_l2=on", true},
		{"refcount1-zlib", "refcount_bits=1,cluster_size=4k", true},
		{"refcount64-zstd", "refcount_bits=64,compression_type=zstd", true},
		{"lazy", "lazy_refcounts=on", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			opts := map[string]string{}
			for _, kv := range strings.Split(tc.opts, ",") {
				if k, v, ok := strings.Cut(kv, "="); ok {
					opts[k] = v
				}
			}
			path := filepath.Join(t.TempDir(), "out.qcow2")
			nc := writeStream(t, path, data, opts, tc.compress)
			if tc.compress && nc == 0 {
				t.Fatal("no cluster was stored compressed")
			}
			want := append(data, make([]byte, (512-len(data)%512)%512)...)
			if got := readImage(t, path); !bytes.Equal(got, want) {
				t.Fatalf("imgloop reads a different disk (first difference at %#x)", qemutest.FirstDiff(got, want))
			}
			if errQemu != nil {
				return
			}
			out := qemutest.Img(t, "check", "-f", "qcow2", path)
			if !strings.Contains(out, "No errors were found") || strings.Contains(out, "leaked") {
				t.Fatalf("qemu-img check:\n%s", out)
			}
			if got := qemutest.RawBytes(t, path, "-f", "qcow2"); !bytes.Equal(got, want) {
				t.Fatalf("qemu-img reads a different disk (first difference at %#x)", qemutest.FirstDiff(got, want))
			}
		})
	}
}

func TestStreamWriterErrors(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		name string
		opts map[string]string
	}{
		{"backing-no-format", map[string]string{"backing_file": "x"}},
		{"format-no-backing", map[string]string{"backing_fmt": "raw"}},
		{"backing-name-too-long", map[string]string{"backing_file": strings.Repeat("x", 1100), "backing_fmt": "raw", "cluster_size": "1k"}},
		{"data-file", map[string]string{"data_file": "x"}},
		{"prealloc", map[string]string{"preallocation": "metadata"}},
		{"bad-cluster", map[string]string{"cluster_size": "3k"}},
		{"unknown", map[string]string{"nope": "1"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f, err := hostfile.Create(filepath.Join(dir, tc.name))
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if _, err := NewStreamWriter(f, 1<<20, tc.opts); err == nil {
				t.Fatal("no error")
			}
		})
	}
	f, err := hostfile.Create(filepath.Join(dir, "order"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	w, err := NewStreamWriter(f, 1<<20, nil)
	if err != nil {
		t.Fatal(err)
	}
	c := make([]byte, w.ClusterSize())
	c[0] = 1
	if err := w.WriteCluster(3, c); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []func() error{
		func() error { return w.WriteCluster(3, c) },      // not increasing
		func() error { return w.WriteCluster(16, c) },     // past the disk
		func() error { return w.WriteCluster(5, c[:10]) }, // short
		func() error { return w.WriteCompressed(6, nil) }, // empty
		func() error { return w.WriteCompressed(7, c) },   // not smaller
		func() error { return w.WriteZero(2) },            // not increasing
	} {
		if err := bad(); err == nil {
			t.Error("no error")
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err == nil {
		t.Error("second Close: no error")
	}
	if err := w.WriteCluster(10, c); err == nil {
		t.Error("write after Close: no error")
	}
}

// TestCompressDeflateWindow checks that the deflate streams Compress makes
// decompress with a 4 KiB window (QEMU's): no back-reference reaches
// further than 4096 bytes.
func TestCompressDeflateWindow(t *testing.T) {
	// Text repeating every 8 KiB: a 32 KiB window would find matches
	// 8 KiB back.
	data := bytes.Repeat(qemutest.Compressible(1, 8192), 8) // 64 KiB
	out, err := compressDeflate(nil, data)
	if err != nil {
		t.Fatal(err)
	}
	if len(out) >= len(data)*4/5 {
		t.Fatalf("compressed to %d bytes", len(out))
	}
	got := make([]byte, len(data))
	if err := inflateDeflateGo(got, out); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("round trip: %v", err)
	}
	// zlib with windowBits -12, as QEMU inflates.
	if _, err := exec.LookPath("python3"); err != nil {
		t.Skip("python3 not found: 4 KiB window not checked")
	}
	cmd := exec.Command("python3", "-c", `import sys, zlib
d = zlib.decompressobj(-12).decompress(sys.stdin.buffer.read())
sys.stdout.write(str(len(d)))`)
	cmd.Stdin = bytes.NewReader(out)
	res, err := cmd.CombinedOutput()
	if err != nil || strings.TrimSpace(string(res)) != "65536" {
		t.Fatalf("zlib with a 4 KiB window: %v: %s", err, res)
	}
}

// BenchmarkCompress measures Compress on 64 KiB clusters of compressible
// text (the bench/convert-qcow2.sh data), per compression type.
func BenchmarkCompress(b *testing.B) {
	data := qemutest.Compressible(3, 64<<10)
	for _, typ := range []string{"zlib", "zstd"} {
		b.Run(typ, func(b *testing.B) {
			f, err := hostfile.Create(filepath.Join(b.TempDir(), "x.qcow2"))
			if err != nil {
				b.Fatal(err)
			}
			defer f.Close()
			w, err := NewStreamWriter(f, 1<<30, map[string]string{"compression_type": typ})
			if err != nil {
				b.Fatal(err)
			}
			b.SetBytes(int64(len(data)))
			b.RunParallel(func(pb *testing.PB) {
				var dst []byte
				for pb.Next() {
					var ok bool
					if dst, ok = w.Compress(dst[:0], data); !ok {
						b.Error("not compressed")
						return
					}
				}
			})
		})
	}
}

// TestStreamWriterBacking writes an image over a backing file: clusters
// left out read the backing file's data, zero clusters hide it, and the
// header names the backing file and its format.
func TestStreamWriterBacking(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	for _, tc := range []struct {
		name string
		opts string
	}{
		{"v3", ""},
		{"extended-l2", "extended_l2=on"},
		{"4k", "cluster_size=4k"},
		{"v2", "compat=0.10"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			base := filepath.Join(dir, "base.raw")
			qemutest.Create(t, base, "raw", "", "1M")
			qemutest.IO(t, base, "raw", "write -P 0x77 0 1M")
			opts := map[string]string{"backing_file": "base.raw", "backing_fmt": "raw"}
			for _, kv := range strings.Split(tc.opts, ",") {
				if k, v, ok := strings.Cut(kv, "="); ok {
					opts[k] = v
				}
			}
			path := filepath.Join(dir, "top.qcow2")
			f, err := hostfile.Create(path)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			w, err := NewStreamWriter(f, 1<<20, opts)
			if err != nil {
				t.Fatal(err)
			}
			cs := int64(w.ClusterSize())
			want := bytes.Repeat([]byte{0x77}, 1<<20)
			data := bytes.Repeat([]byte{0x12}, int(cs))
			// Cluster 1: data; cluster 3: zeros; the others: the backing file.
			if err := w.WriteCluster(1, data); err != nil {
				t.Fatal(err)
			}
			copy(want[cs:], data)
			err = w.WriteZero(3)
			if opts["compat"] == "0.10" {
				if !errors.Is(err, disk.ErrNotSupported) {
					t.Fatalf("WriteZero in a v2 image: %v", err)
				}
				err = w.WriteCluster(3, make([]byte, cs))
			}
			if err != nil {
				t.Fatal(err)
			}
			clear(want[3*cs : 4*cs])
			// Cluster 5, with subclusters: the first half allocated, the
			// last quarter zeros, the rest the backing file's data.
			half := bytes.Repeat([]byte{0x34}, int(cs))
			err = w.WriteSubclusters(5, half, 0x0000ffff, 0xff000000)
			if w.Subclusters() == 1 {
				if err == nil {
					t.Fatal("subclusters without extended L2 entries: no error")
				}
			} else {
				if err != nil {
					t.Fatal(err)
				}
				copy(want[5*cs:5*cs+cs/2], half)
				clear(want[5*cs+cs*3/4 : 6*cs])
				if err := w.WriteSubclusters(6, half, 1, 1); err == nil {
					t.Fatal("a subcluster both allocated and zero: no error")
				}
				// Cluster 7: zeros in its first subcluster only, no data.
				if err := w.WriteSubclusters(7, nil, 0, 1); err != nil {
					t.Fatal(err)
				}
				clear(want[7*cs : 7*cs+cs/32])
			}
			if err := w.Close(); err != nil {
				t.Fatal(err)
			}
			// The creator's locks go with the file.
			if err := f.Close(); err != nil {
				t.Fatal(err)
			}
			out := qemutest.Img(t, "check", "-f", "qcow2", path)
			if !strings.Contains(out, "No errors were found") || strings.Contains(out, "leaked") {
				t.Fatalf("qemu-img check:\n%s", out)
			}
			info := qemutest.Info(t, path)
			if info["backing-filename"] != "base.raw" || info["backing-filename-format"] != "raw" {
				t.Fatalf("backing file %v, format %v", info["backing-filename"], info["backing-filename-format"])
			}
			if got := qemutest.RawBytes(t, path); !bytes.Equal(got, want) {
				t.Fatalf("qemu-img reads a different disk (first difference at %#x)", qemutest.FirstDiff(got, want))
			}
			if got := readImage(t, path); !bytes.Equal(got, want) {
				t.Fatalf("imgloop reads a different disk (first difference at %#x)", qemutest.FirstDiff(got, want))
			}
		})
	}
}
