package convert

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/imgloop/imgloop/disk"
	_ "github.com/imgloop/imgloop/disk/qcow2"
	_ "github.com/imgloop/imgloop/disk/raw"
	"github.com/imgloop/imgloop/internal/qemutest"
)

// TestRawQemu converts qcow2 images made by qemu-img (plain and
// compressed, with holes and zero clusters) and compares the result with
// `qemu-img convert -O raw`.
func TestRawQemu(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	src := filepath.Join(dir, "src.raw")
	data := make([]byte, 6<<20)
	copy(data[512<<10:], qemutest.Compressible(3, 2<<20))
	copy(data[4<<20+4096:], qemutest.Compressible(4, 100000))
	if err := os.WriteFile(src, data, 0o644); err != nil {
		t.Fatal(err)
	}
	plain := filepath.Join(dir, "plain.qcow2")
	qemutest.Img(t, "convert", "-O", "qcow2", src, plain)
	qemutest.IO(t, plain, "qcow2", "write -z 1M 64k", "write -P 0 5M 64k")
	zlib := filepath.Join(dir, "zlib.qcow2")
	qemutest.Img(t, "convert", "-c", "-O", "qcow2", src, zlib)
	zstd := filepath.Join(dir, "zstd.qcow2")
	qemutest.Img(t, "convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd,cluster_size=16k", src, zstd)

	for _, path := range []string{plain, zlib, zstd} {
		t.Run(filepath.Base(path), func(t *testing.T) {
			img, err := disk.Open(path, disk.OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			out, err := os.Create(filepath.Join(t.TempDir(), "out.raw"))
			if err != nil {
				t.Fatal(err)
			}
			defer out.Close()
			if err := out.Truncate(img.Size()); err != nil {
				t.Fatal(err)
			}
			if _, err := Raw(context.Background(), img, NewWriteBehind(out), Options{ChunkSize: 256 << 10, Prefetch: []string{path}}); err != nil {
				t.Fatal(err)
			}
			got, err := os.ReadFile(out.Name())
			if err != nil {
				t.Fatal(err)
			}
			if d := qemutest.FirstDiff(got, qemutest.RawBytes(t, path)); d >= 0 {
				t.Fatalf("differs from qemu-img convert at offset %#x", d)
			}
		})
	}
}

// BenchmarkRaw converts a compressed image into memory.
func BenchmarkRaw(b *testing.B) {
	qemutest.Require(b, "qemu-img")
	dir := b.TempDir()
	src := filepath.Join(dir, "src.raw")
	if err := os.WriteFile(src, qemutest.Compressible(5, 32<<20), 0o644); err != nil {
		b.Fatal(err)
	}
	path := filepath.Join(dir, "zstd.qcow2")
	qemutest.Img(b, "convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", src, path)
	img, err := disk.Open(path, disk.OpenOptions{ReadOnly: true})
	if err != nil {
		b.Fatal(err)
	}
	defer img.Close()
	dst := &memDst{data: make([]byte, img.Size()), failAt: -1}
	b.SetBytes(img.Size())
	for b.Loop() {
		dst.ranges = dst.ranges[:0]
		if _, err := Raw(context.Background(), img, dst, Options{}); err != nil {
			b.Fatal(err)
		}
	}
}
