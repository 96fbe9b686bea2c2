package qcow2_test

import (
	"path/filepath"
	"testing"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/disk/disktest"
	"github.com/imgloop/imgloop/internal/qemutest"
)

// conformanceShapes are the qcow2 images the disktest conformance suite
// runs over: read-only, with qemu-img's reading as the model.
var conformanceShapes = []recipe{
	{"plain", func(t *testing.T, dir string) string {
		p := mkqcow2(t, filepath.Join(dir, "plain.qcow2"), "cluster_size=4k", "2M")
		qio(t, p, "write -P 0x11 0 100000", "write -z 200000 50000", "write -P 0x22 1000000 300000")
		return p
	}},
	{"compressed", func(t *testing.T, dir string) string {
		src := filepath.Join(dir, "src.raw")
		writeFile(t, src, mixedData(21, 192<<10))
		p := filepath.Join(dir, "z.qcow2")
		qemutest.Img(t, "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=16k", src, p)
		return p
	}},
	{"compressed-zstd", func(t *testing.T, dir string) string {
		src := filepath.Join(dir, "src.raw")
		writeFile(t, src, mixedData(22, 256<<10))
		p := filepath.Join(dir, "z.qcow2")
		qemutest.Img(t, "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=zstd", src, p)
		return p
	}},
	{"backing-chain", func(t *testing.T, dir string) string {
		base := filepath.Join(dir, "base.raw")
		writeFile(t, base, mixedData(23, 512<<10))
		mid := mkqcow2(t, filepath.Join(dir, "mid.qcow2"), "", "1M", "-b", "base.raw", "-F", "raw")
		qio(t, mid, "write -P 0x33 100000 200000")
		p := mkqcow2(t, filepath.Join(dir, "top.qcow2"), "cluster_size=4k", "1049088", "-b", "mid.qcow2", "-F", "qcow2")
		qio(t, p, "write -P 0x44 150000 10000", "write -z 400000 8192")
		return p
	}},
	{"extended-l2", func(t *testing.T, dir string) string {
		base := mkqcow2(t, filepath.Join(dir, "base.qcow2"), "", "1M")
		qio(t, base, "write -P 0xbb 0 1M")
		p := mkqcow2(t, filepath.Join(dir, "xl2.qcow2"), "extended_l2=on,cluster_size=64k", "1M",
			"-b", "base.qcow2", "-F", "qcow2")
		qio(t, p, "write -P 0x11 2k 2k", "write -P 0x22 70k 4k", "write -z 6k 2k", "write -z 196608 64k")
		return p
	}},
}

// TestConformanceSnapshot runs the suite over an internal snapshot's
// view, with `qemu-img convert -l` as the model.
func TestConformanceSnapshot(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	p := mkqcow2(t, filepath.Join(t.TempDir(), "snap.qcow2"), "cluster_size=4k", "1M")
	qio(t, p, "write -P 0x11 0 64k", "write -P 0x12 500000 1000")
	qemutest.Img(t, "snapshot", "-c", "s1", p)
	qio(t, p, "write -P 0x22 32k 64k", "write -z 0 4k", "write -z -u 500000 1000")
	model := qemutest.RawBytes(t, p, "-l", "snapshot.name=s1")
	disktest.Run(t, func(t *testing.T) disk.Image {
		img, err := disk.Open(p, disk.OpenOptions{Format: "qcow2", ReadOnly: true, Snapshot: "s1"})
		if err != nil {
			t.Fatalf("disk.Open(%s, snapshot s1): %v", p, err)
		}
		return img
	}, disktest.Options{ReadOnly: true, Model: model})
}

func TestConformance(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	for _, shape := range conformanceShapes {
		t.Run(shape.name, func(t *testing.T) {
			t.Parallel()
			path := shape.build(t, t.TempDir())
			model := qemutest.RawBytes(t, path)
			disktest.Run(t, func(t *testing.T) disk.Image {
				img, err := disk.Open(path, disk.OpenOptions{Format: "qcow2", ReadOnly: true})
				if err != nil {
					t.Fatalf("disk.Open(%s): %v", path, err)
				}
				return img
			}, disktest.Options{ReadOnly: true, Model: model})
		})
	}
}
