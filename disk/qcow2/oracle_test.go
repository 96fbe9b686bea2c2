package qcow2_test

// Oracle tests: images built at test time with qemu-img and qemu-io, read
// through disk.Open and compared byte for byte with what qemu-img reads
// (`qemu-img convert -O raw`), and their extent maps compared with
// `qemu-img map --output=json`.

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/imgloop/imgloop/disk"
	_ "github.com/imgloop/imgloop/disk/qcow2"
	_ "github.com/imgloop/imgloop/disk/raw"
	"github.com/imgloop/imgloop/internal/qemutest"
)

// recipe builds an image in dir with QEMU's tools and returns its path.
type recipe struct {
	name  string
	build func(t *testing.T, dir string) string
}

// mkqcow2 creates a qcow2 image (qemutest.Create with format qcow2).
func mkqcow2(t *testing.T, path, opts, size string, extra ...string) string {
	t.Helper()
	qemutest.Create(t, path, "qcow2", opts, size, extra...)
	return path
}

// qio runs qemu-io commands on a qcow2 image.
func qio(t *testing.T, path string, cmds ...string) {
	t.Helper()
	qemutest.IO(t, path, "qcow2", cmds...)
}

// writeFile writes data to path, failing t on error.
func writeFile(t testing.TB, path string, data []byte) {
	t.Helper()
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
}

// mixedData returns n bytes made of 64 KiB blocks that cycle through
// compressible data, zeros, incompressible (random) data, and half
// compressible half zero: a source for compressed images whose clusters
// come out compressed, unallocated and stored plainly.
func mixedData(seed int64, n int) []byte {
	b := make([]byte, n)
	r := rand.New(rand.NewPCG(uint64(seed), 7))
	const blk = 64 << 10
	for i := 0; i*blk < n; i++ {
		p := b[i*blk : min(n, (i+1)*blk)]
		switch i % 4 {
		case 0:
			copy(p, qemutest.Compressible(seed+int64(i), len(p)))
		case 1:
			// zeros
		case 2:
			for j := range p {
				p[j] = byte(r.Uint32())
			}
		case 3:
			copy(p[:len(p)/2], qemutest.Compressible(seed+int64(i), len(p)/2))
		}
	}
	return b
}

// runIn runs a command in dir and fails t if it fails.
func runIn(t *testing.T, dir, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("(cd %s && %s %s): %v\n%s", dir, name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// hdrExt is one qcow2 header extension (docs/interop/qcow2.txt, "Header
// extensions").
type hdrExt struct {
	typ  uint32
	data []byte
}

// Header extension types from the spec.
const (
	extBackingFormat = 0xe2792aca
	extFeatureNames  = 0x6803f857
	extDataFile      = 0x44415441
)

// rewriteExtensions rewrites the header extension area of the qcow2 image
// at path: edit receives the extensions in file order and returns the new
// list, which is written back after the header with an end marker; the
// backing file name is moved to just after it. The result must fit in
// cluster 0.
func rewriteExtensions(t testing.TB, path string, edit func([]hdrExt) []hdrExt) {
	t.Helper()
	rewriteHeaderArea(t, path, func(es []hdrExt, backing string) ([]hdrExt, string) {
		return edit(es), backing
	})
}

// setBackingName stores name as the backing file name of the qcow2 image
// at path, keeping its header extensions.
func setBackingName(t testing.TB, path, name string) {
	t.Helper()
	rewriteHeaderArea(t, path, func(es []hdrExt, _ string) ([]hdrExt, string) { return es, name })
}

// rewriteHeaderArea rewrites what follows the fixed header in cluster 0 of
// the qcow2 image at path: edit receives the header extensions in file
// order and the backing file name, and returns the new ones, which are
// written back (extensions, end marker, backing file name) with the
// header's backing_file_offset and backing_file_size updated.
func rewriteHeaderArea(t testing.TB, path string, edit func([]hdrExt, string) ([]hdrExt, string)) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var h [104]byte
	if _, err := f.ReadAt(h[:], 0); err != nil {
		t.Fatal(err)
	}
	be := binary.BigEndian
	clusterSize := int64(1) << be.Uint32(h[20:24])
	hdrLen := int64(72)
	if be.Uint32(h[4:8]) >= 3 {
		hdrLen = int64(be.Uint32(h[100:104]))
	}
	c0 := make([]byte, clusterSize)
	if _, err := f.ReadAt(c0, 0); err != nil {
		t.Fatal(err)
	}
	var exts []hdrExt
	pos := hdrLen
	for pos+8 <= clusterSize {
		typ, n := be.Uint32(c0[pos:]), int64(be.Uint32(c0[pos+4:]))
		if typ == 0 {
			break
		}
		if pos+8+n > clusterSize {
			t.Fatalf("%s: extension %#x at %d overruns cluster 0", path, typ, pos)
		}
		exts = append(exts, hdrExt{typ, bytes.Clone(c0[pos+8 : pos+8+n])})
		pos += 8 + (n+7)&^7
	}
	oldEnd := pos + 8
	bfOff, bfLen := int64(be.Uint64(c0[8:16])), int64(be.Uint32(c0[16:20]))
	backing := ""
	if bfOff != 0 {
		backing = string(c0[bfOff : bfOff+bfLen])
		oldEnd = max(oldEnd, bfOff+bfLen)
	}
	exts, backing = edit(exts, backing)
	var area []byte
	for _, e := range exts {
		area = be.AppendUint32(area, e.typ)
		area = be.AppendUint32(area, uint32(len(e.data)))
		area = append(area, e.data...)
		for len(area)%8 != 0 {
			area = append(area, 0)
		}
	}
	area = append(area, make([]byte, 8)...)
	be.PutUint64(c0[8:16], 0)
	be.PutUint32(c0[16:20], 0)
	if backing != "" {
		be.PutUint64(c0[8:16], uint64(hdrLen)+uint64(len(area)))
		be.PutUint32(c0[16:20], uint32(len(backing)))
		area = append(area, backing...)
	}
	if hdrLen+int64(len(area)) > clusterSize {
		t.Fatalf("%s: header extensions need %d bytes, cluster 0 has %d", path, hdrLen+int64(len(area)), clusterSize)
	}
	clear(c0[hdrLen:max(oldEnd, hdrLen+int64(len(area)))])
	copy(c0[hdrLen:], area)
	if _, err := f.WriteAt(c0, 0); err != nil {
		t.Fatal(err)
	}
}

// featureName is one entry of the feature name table extension.
func featureName(typ, bit byte, name string) []byte {
	e := make([]byte, 48)
	e[0], e[1] = typ, bit
	copy(e[2:], name)
	return e
}

// The recipes cover docs/interop/qcow2.txt: versions 2 and 3, cluster
// sizes, every kind of L2 entry, compression types, extended L2 entries,
// backing chains, external data files, odd sizes and header extensions.
var recipes = []recipe{
	{"v2-64k", func(t *testing.T, dir string) string {
		p := mkqcow2(t, filepath.Join(dir, "v2.qcow2"), "compat=0.10", "3M")
		qio(t, p, "write -P 0x11 0 64k", "write -P 0x22 100000 300000",
			"write -P 0x33 1000 3000", "write -z 2097152 65536", "write -P 0x44 3141120 4096")
		return p
	}},
	{"v2-512", func(t *testing.T, dir string) string {
		p := mkqcow2(t, filepath.Join(dir, "v2.qcow2"), "compat=0.10,cluster_size=512", "1M")
		qio(t, p, "write -P 0x11 0 512", "write -P 0x22 1000 3000", "write -P 0x33 40000 70000",
			"write -P 0x44 1048064 512")
		return p
	}},
	{"v3-64k-zero-kinds", func(t *testing.T, dir string) string {
		// 0: allocated zero cluster (data, then write -z without unmap);
		// 64k: plain zero cluster (data, then write -z -u);
		// 256k: plain zero cluster written over unallocated;
		// 384k: normal; 512k-: unallocated.
		p := mkqcow2(t, filepath.Join(dir, "v3.qcow2"), "", "2M")
		qio(t, p, "write -P 0x11 0 128k", "write -z 0 64k", "write -z -u 64k 64k",
			"write -z 256k 64k", "write -P 0x55 393216 65536", "write -z 400000 5000",
			"write -P 0x66 1048576 512")
		return p
	}},
	{"v3-512", func(t *testing.T, dir string) string {
		p := mkqcow2(t, filepath.Join(dir, "c512.qcow2"), "cluster_size=512", "1M")
		qio(t, p, "write -P 0x11 0 512", "write -P 0x22 1000 3000", "write -z 8192 4096",
			"write -P 0x33 40000 70000", "write -z 50000 2000", "write -z -u 60416 1024",
			"write -P 0x44 1048064 512")
		return p
	}},
	{"v3-4k", func(t *testing.T, dir string) string {
		p := mkqcow2(t, filepath.Join(dir, "c4k.qcow2"), "cluster_size=4k", "2M")
		qio(t, p, "write -P 0x11 0 4096", "write -P 0x22 5000 30000", "write -z 16384 8192",
			"write -P 0x33 1000000 100000", "write -z -u 1003520 4096", "write -P 0x44 2093056 4096")
		return p
	}},
	{"v3-2M", func(t *testing.T, dir string) string {
		p := mkqcow2(t, filepath.Join(dir, "c2m.qcow2"), "cluster_size=2M", "7M")
		qio(t, p, "write -P 0x11 1M 2M", "write -P 0x22 5000000 1000", "write -z 6M 1M",
			"write -P 0x33 7339008 1024")
		return p
	}},
	{"v3-refcount-bits-1", func(t *testing.T, dir string) string {
		p := mkqcow2(t, filepath.Join(dir, "r1.qcow2"), "refcount_bits=1", "1M")
		qio(t, p, "write -P 0x11 4096 200000")
		return p
	}},
	{"v3-lazy-refcounts", func(t *testing.T, dir string) string {
		p := mkqcow2(t, filepath.Join(dir, "lazy.qcow2"), "lazy_refcounts=on", "1M")
		qio(t, p, "write -P 0x11 4096 200000")
		return p
	}},
	{"compressed-zlib", func(t *testing.T, dir string) string {
		src := filepath.Join(dir, "src.raw")
		writeFile(t, src, mixedData(1, 1<<20+12345))
		p := filepath.Join(dir, "z.qcow2")
		qemutest.Img(t, "convert", "-c", "-f", "raw", "-O", "qcow2", src, p)
		return p
	}},
	{"compressed-zstd", func(t *testing.T, dir string) string {
		src := filepath.Join(dir, "src.raw")
		writeFile(t, src, mixedData(2, 1<<20+512))
		p := filepath.Join(dir, "zstd.qcow2")
		qemutest.Img(t, "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=zstd", src, p)
		return p
	}},
	{"compressed-zlib-512", func(t *testing.T, dir string) string {
		src := filepath.Join(dir, "src.raw")
		writeFile(t, src, mixedData(3, 512<<10))
		p := filepath.Join(dir, "z512.qcow2")
		qemutest.Img(t, "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=512", src, p)
		return p
	}},
	{"compressed-zstd-2M", func(t *testing.T, dir string) string {
		src := filepath.Join(dir, "src.raw")
		data := mixedData(4, 4<<20)
		copy(data[2<<20:], qemutest.Compressible(44, 2<<20))
		writeFile(t, src, data)
		p := filepath.Join(dir, "z2m.qcow2")
		qemutest.Img(t, "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=2M,compression_type=zstd", src, p)
		return p
	}},
	{"compressed-qemu-io-write-c", func(t *testing.T, dir string) string {
		// write -c stores compressed clusters directly; overwriting part of
		// one later turns it back into a normal cluster.
		p := mkqcow2(t, filepath.Join(dir, "wc.qcow2"), "cluster_size=4k", "1M")
		src := filepath.Join(dir, "pat")
		writeFile(t, src, qemutest.Compressible(5, 64<<10))
		qio(t, p, "write -c -s "+src+" 0 64k", "write -c -s "+src+" 131072 64k",
			"write -P 0x77 135000 100", "write -c -P 0x41 524288 4096")
		return p
	}},
	{"extended-l2-backing", func(t *testing.T, dir string) string {
		base := mkqcow2(t, filepath.Join(dir, "base.qcow2"), "", "1M")
		qio(t, base, "write -P 0xbb 0 1M")
		p := mkqcow2(t, filepath.Join(dir, "xl2.qcow2"), "extended_l2=on,cluster_size=64k", "1M",
			"-b", "base.qcow2", "-F", "qcow2")
		qio(t, p, "write -P 0x11 2k 2k", "write -P 0x22 70k 4k", "write -z 6k 2k",
			"write -z -u 10k 2k", "write -z 196608 64k", "write -P 0x33 300000 1000",
			"write -P 0x44 458752 65536", "write -z -u 460800 4096")
		return p
	}},
	{"extended-l2-32k-no-backing", func(t *testing.T, dir string) string {
		p := mkqcow2(t, filepath.Join(dir, "xl2.qcow2"), "extended_l2=on,cluster_size=32k", "1049088")
		qio(t, p, "write -P 0x11 1024 1024", "write -P 0x22 33792 3072", "write -z 40960 2048",
			"write -P 0x33 1048576 512")
		return p
	}},
	{"extended-l2-compressed", func(t *testing.T, dir string) string {
		p := mkqcow2(t, filepath.Join(dir, "xl2c.qcow2"), "extended_l2=on,cluster_size=16k", "512k")
		src := filepath.Join(dir, "pat")
		writeFile(t, src, qemutest.Compressible(6, 32<<10))
		qio(t, p, "write -c -s "+src+" 16k 32k", "write -P 0x55 65536 1024")
		return p
	}},
	{"chain-1-qcow2", func(t *testing.T, dir string) string {
		base := mkqcow2(t, filepath.Join(dir, "base.qcow2"), "", "2M")
		qio(t, base, "write -P 0x11 0 1M")
		p := mkqcow2(t, filepath.Join(dir, "top.qcow2"), "", "2M", "-b", "base.qcow2", "-F", "qcow2")
		qio(t, p, "write -P 0x22 65536 4096", "write -z 131072 65536", "write -P 0x33 1048576 100")
		return p
	}},
	{"chain-2-raw-base", func(t *testing.T, dir string) string {
		base := filepath.Join(dir, "base.raw")
		qemutest.Create(t, base, "raw", "", "1M")
		qemutest.IO(t, base, "raw", "write -P 0x22 0 64k", "write -P 0x23 500000 1000")
		mid := mkqcow2(t, filepath.Join(dir, "mid.qcow2"), "compat=0.10", "2M", "-b", "base.raw", "-F", "raw")
		qio(t, mid, "write -P 0x33 128k 64k", "write -P 0x34 1500000 1000")
		p := mkqcow2(t, filepath.Join(dir, "top.qcow2"), "", "3M", "-b", "mid.qcow2", "-F", "qcow2")
		qio(t, p, "write -P 0x44 256k 4k", "write -z 0 4k")
		return p
	}},
	{"chain-3-mixed-relative", func(t *testing.T, dir string) string {
		// dir/base.raw <- dir/l1/mid.qcow2 (-b ../base.raw)
		// <- dir/l1/l2/upper.qcow2 (-b ../mid.qcow2) <- dir/top.qcow2 (-b l1/l2/upper.qcow2)
		l2 := filepath.Join(dir, "l1", "l2")
		if err := os.MkdirAll(l2, 0o755); err != nil {
			t.Fatal(err)
		}
		base := filepath.Join(dir, "base.raw")
		writeFile(t, base, mixedData(7, 1<<20))
		mid := mkqcow2(t, filepath.Join(dir, "l1", "mid.qcow2"), "", "1536k", "-b", "../base.raw", "-F", "raw")
		qio(t, mid, "write -P 0x33 0 4k", "write -P 0x34 1100000 1000")
		up := mkqcow2(t, filepath.Join(l2, "upper.qcow2"), "compat=0.10,cluster_size=4k", "2M", "-b", "../mid.qcow2", "-F", "qcow2")
		qio(t, up, "write -P 0x44 8k 8k", "write -P 0x45 1600000 10000")
		p := mkqcow2(t, filepath.Join(dir, "top.qcow2"), "cluster_size=512", "2097664", "-b", "l1/l2/upper.qcow2", "-F", "qcow2")
		qio(t, p, "write -P 0x55 12k 1k", "write -z 65536 4096", "write -P 0x56 2097152 512")
		return p
	}},
	{"chain-short-backing-odd-size", func(t *testing.T, dir string) string {
		base := mkqcow2(t, filepath.Join(dir, "base.qcow2"), "", "100000")
		qio(t, base, "write -P 0x11 0 100352")
		p := mkqcow2(t, filepath.Join(dir, "top.qcow2"), "", "1049088", "-b", "base.qcow2", "-F", "qcow2")
		qio(t, p, "write -P 0x22 4096 512")
		return p
	}},
	{"chain-compressed-backing", func(t *testing.T, dir string) string {
		src := filepath.Join(dir, "src.raw")
		writeFile(t, src, mixedData(8, 1<<20))
		base := filepath.Join(dir, "base.qcow2")
		qemutest.Img(t, "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=zstd", src, base)
		p := mkqcow2(t, filepath.Join(dir, "top.qcow2"), "", "1M", "-b", "base.qcow2", "-F", "qcow2")
		qio(t, p, "write -P 0x22 100000 1000")
		return p
	}},
	{"chain-backing-format-probed", func(t *testing.T, dir string) string {
		// QEMU 7.2 refuses to create (or rebase -u) an overlay without a
		// backing format, so create one with -F and then rename its
		// backing format extension to an unknown type: the format must
		// then be probed.
		base := mkqcow2(t, filepath.Join(dir, "base.qcow2"), "", "1M")
		qio(t, base, "write -P 0x11 0 512k")
		p := mkqcow2(t, filepath.Join(dir, "top.qcow2"), "", "1M", "-b", "base.qcow2", "-F", "qcow2")
		qio(t, p, "write -P 0x22 4096 4096")
		rewriteExtensions(t, p, func(es []hdrExt) []hdrExt {
			for i := range es {
				if es[i].typ == extBackingFormat {
					es[i].typ = 0x12345678
				}
			}
			return es
		})
		return p
	}},
	{"chain-backing-format-probed-raw", func(t *testing.T, dir string) string {
		base := filepath.Join(dir, "base.img")
		writeFile(t, base, mixedData(9, 1<<20))
		p := mkqcow2(t, filepath.Join(dir, "top.qcow2"), "", "1M", "-b", "base.img", "-F", "raw")
		qio(t, p, "write -P 0x22 4096 4096")
		rewriteExtensions(t, p, func(es []hdrExt) []hdrExt {
			out := es[:0]
			for _, e := range es {
				if e.typ != extBackingFormat {
					out = append(out, e)
				}
			}
			return out
		})
		return p
	}},
	{"data-file", func(t *testing.T, dir string) string {
		p := mkqcow2(t, filepath.Join(dir, "d.qcow2"), "data_file="+filepath.Join(dir, "d.data"), "1M")
		qio(t, p, "write -P 0x11 64k 64k", "write -z 256k 64k", "write -P 0x22 500000 1000")
		return p
	}},
	{"data-file-raw", func(t *testing.T, dir string) string {
		p := mkqcow2(t, filepath.Join(dir, "e.qcow2"), "data_file="+filepath.Join(dir, "e.data")+",data_file_raw=on", "1M")
		qio(t, p, "write -P 0x11 64k 64k", "write -z 256k 64k", "write -P 0x22 500000 1000")
		return p
	}},
	{"data-file-relative-name", func(t *testing.T, dir string) string {
		// QEMU 7.2 resolves a relative data file name against its working
		// directory, imgloop against the image's folder (as for backing
		// files): build and read the image from its own folder, where both
		// agree. checkAgainstQemu runs qemu-img from the image's folder.
		runIn(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=rel.data", "rel.qcow2", "1M")
		runIn(t, dir, "qemu-io", "-f", "qcow2", "-c", "write -P 0x11 64k 64k", "rel.qcow2")
		return filepath.Join(dir, "rel.qcow2")
	}},
	{"odd-size-1M+512", func(t *testing.T, dir string) string {
		p := mkqcow2(t, filepath.Join(dir, "odd.qcow2"), "", "1049088")
		qio(t, p, "write -P 0x11 1048064 1024")
		return p
	}},
	{"odd-size-v2-4k", func(t *testing.T, dir string) string {
		p := mkqcow2(t, filepath.Join(dir, "odd.qcow2"), "compat=0.10,cluster_size=4k", "777728")
		qio(t, p, "write -P 0x11 770048 7680", "write -P 0x12 0 1")
		return p
	}},
	{"unknown-header-extension", func(t *testing.T, dir string) string {
		base := mkqcow2(t, filepath.Join(dir, "base.qcow2"), "", "1M")
		qio(t, base, "write -P 0x11 0 1M")
		p := mkqcow2(t, filepath.Join(dir, "ext.qcow2"), "", "1M", "-b", "base.qcow2", "-F", "qcow2")
		qio(t, p, "write -P 0x22 4096 4096")
		rewriteExtensions(t, p, func(es []hdrExt) []hdrExt {
			unknown := []hdrExt{{0xdeadbeef, []byte("an extension from the future")}, {0x0badcafe, nil}}
			return append(append(unknown[:1:1], es...), unknown[1])
		})
		return p
	}},
	{"unknown-compatible-and-autoclear-bits", func(t *testing.T, dir string) string {
		p := mkqcow2(t, filepath.Join(dir, "bits.qcow2"), "", "1M")
		qio(t, p, "write -P 0x11 0 4096")
		patchU64(t, p, 80, 1<<40) // compatible_features: unknown bit, ignored
		patchU64(t, p, 88, 1<<40) // autoclear_features: unknown bit, ignored on read
		return p
	}},
	{"dirty-bit", func(t *testing.T, dir string) string {
		p := mkqcow2(t, filepath.Join(dir, "dirty.qcow2"), "lazy_refcounts=on", "1M")
		qio(t, p, "write -P 0x11 0 4096")
		patchU64(t, p, 72, 1) // incompatible_features: dirty
		return p
	}},
}

// patchU64 writes a big-endian uint64 at off in the file at path.
func patchU64(t testing.TB, path string, off int64, v uint64) {
	t.Helper()
	patchBytes(t, path, off, binary.BigEndian.AppendUint64(nil, v))
}

// patchU32 writes a big-endian uint32 at off in the file at path.
func patchU32(t testing.TB, path string, off int64, v uint32) {
	t.Helper()
	patchBytes(t, path, off, binary.BigEndian.AppendUint32(nil, v))
}

// patchBytes writes b at off in the file at path.
func patchBytes(t testing.TB, path string, off int64, b []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

func TestOracle(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	for _, r := range recipes {
		t.Run(r.name, func(t *testing.T) {
			t.Parallel()
			path := r.build(t, t.TempDir())
			checkAgainstQemu(t, path)
		})
	}
}

// TestOracleSnapshots opens each internal snapshot, by ID and by name,
// and the active state, and compares them with `qemu-img convert -l`.
func TestOracleSnapshots(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	for _, variant := range []string{"compat=0.10", "compat=1.1", "overlay"} {
		t.Run(variant, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			p := filepath.Join(dir, "snap.qcow2")
			if variant == "overlay" {
				// Snapshots of an overlay: unallocated clusters of every
				// view read through to the backing file.
				base := mkqcow2(t, filepath.Join(dir, "base.qcow2"), "", "1M")
				qio(t, base, "write -P 0xbb 0 1M")
				mkqcow2(t, p, "cluster_size=4k", "1M", "-b", "base.qcow2", "-F", "qcow2")
			} else {
				mkqcow2(t, p, variant+",cluster_size=4k", "1M")
			}
			qio(t, p, "write -P 0x11 0 64k", "write -P 0x12 500000 1000")
			qemutest.Img(t, "snapshot", "-c", "s1", p)
			qio(t, p, "write -P 0x22 32k 64k", "write -z 0 4k")
			qemutest.Img(t, "snapshot", "-c", "s2", p)
			qio(t, p, "write -P 0x33 512k 4k", "write -z -u 40k 8k", "write -P 0x34 1044480 4096")
			qemutest.Img(t, "snapshot", "-c", "s3", p)
			qemutest.Img(t, "snapshot", "-d", "s3", p) // leave a gap in the IDs
			qio(t, p, "write -P 0x44 600000 3000")

			views := []struct{ snapshot, ref string }{
				{"1", "snapshot.id=1"},
				{"s1", "snapshot.name=s1"},
				{"2", "snapshot.id=2"},
				{"s2", "snapshot.name=s2"},
			}
			for _, v := range views {
				t.Run("snapshot="+v.snapshot, func(t *testing.T) {
					want := qemutest.RawBytes(t, p, "-l", v.ref)
					img := openImage(t, p, disk.OpenOptions{Format: "qcow2", ReadOnly: true, Snapshot: v.snapshot})
					compareReads(t, img, want)
					compareParallelReads(t, img, want, 5)
				})
			}
			t.Run("active", func(t *testing.T) { checkAgainstQemu(t, p) })
			t.Run("list", func(t *testing.T) {
				img := openImage(t, p, disk.OpenOptions{Format: "qcow2", ReadOnly: true})
				d, ok := img.(disk.Describer)
				if !ok {
					t.Fatalf("%T is not a disk.Describer", img)
				}
				var got []string
				for _, s := range d.Info().Snapshots {
					got = append(got, s.ID+":"+s.Name)
				}
				if want := []string{"1:s1", "2:s2"}; fmt.Sprint(got) != fmt.Sprint(want) {
					t.Errorf("snapshots = %v, want %v", got, want)
				}
				// Every field, as qemu-img info --output=json lists them.
				b, err := json.Marshal(d.Info().Snapshots)
				if err != nil {
					t.Fatal(err)
				}
				var gotJSON any
				if err := json.Unmarshal(b, &gotJSON); err != nil {
					t.Fatal(err)
				}
				if want := qemutest.Info(t, p)["snapshots"]; !reflect.DeepEqual(gotJSON, want) {
					wj, _ := json.Marshal(want)
					t.Errorf("Info().Snapshots = %s, qemu-img info says %s", b, wj)
				}
			})
			t.Run("unknown", func(t *testing.T) {
				for _, name := range []string{"3", "s3", "nope"} {
					img, err := disk.Open(p, disk.OpenOptions{Format: "qcow2", ReadOnly: true, Snapshot: name})
					if err == nil {
						img.Close()
						t.Errorf("Open(Snapshot %q) succeeded, want an error", name)
					}
				}
			})
		})
	}
}

// openImage opens path through disk.Open and closes it when t ends.
func openImage(t *testing.T, path string, opts disk.OpenOptions) disk.Image {
	t.Helper()
	img, err := disk.Open(path, opts)
	if err != nil {
		t.Fatalf("disk.Open(%s, %+v): %v", path, opts, err)
	}
	t.Cleanup(func() {
		if err := img.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return img
}

// checkAgainstQemu compares the image at path, opened read-only through
// disk.Open, with qemu-img's view of it: content (sequential reads in
// uneven chunks, parallel reads with the format named and probed, and a
// small L2 cache) and extent map. qemu-img runs from the image's folder.
func checkAgainstQemu(t *testing.T, path string) {
	t.Helper()
	dir := filepath.Dir(path)
	refFile := filepath.Join(t.TempDir(), "ref.raw")
	runIn(t, dir, "qemu-img", "convert", "-O", "raw", path, refFile)
	want, err := os.ReadFile(refFile)
	if err != nil {
		t.Fatal(err)
	}
	var qmap []qemutest.MapEntry
	if err := unmarshalMap(runIn(t, dir, "qemu-img", "map", "--output=json", path), &qmap); err != nil {
		t.Fatal(err)
	}

	var qinfo map[string]any
	if err := json.Unmarshal([]byte(runIn(t, dir, "qemu-img", "info", "--output=json", path)), &qinfo); err != nil {
		t.Fatal(err)
	}

	img := openImage(t, path, disk.OpenOptions{Format: "qcow2", ReadOnly: true})
	compareInfo(t, img, qinfo)
	compareReads(t, img, want)
	compareParallelReads(t, img, want, 1)
	compareMaps(t, img, qmap)
	comparePartialMaps(t, img, qmap)

	// Probed format, and an L2 cache as small as the driver allows.
	probed := openImage(t, path, disk.OpenOptions{ReadOnly: true, CacheSize: 1})
	compareParallelReads(t, probed, want, 2)
}

// compareInfo compares img's disk.Info with `qemu-img info --output=json`
// on the keys both know: format, virtual size, cluster size, dirty flag,
// backing file name (as stored and resolved, compared after cleaning) and
// backing format (when qemu-img reports one: it does not report a probed
// one).
func compareInfo(t *testing.T, img disk.Image, q map[string]any) {
	t.Helper()
	d, ok := img.(disk.Describer)
	if !ok {
		t.Errorf("%T is not a disk.Describer", img)
		return
	}
	info := d.Info()
	str := func(k string) string { v, _ := q[k].(string); return v }
	num := func(k string) int64 { v, _ := q[k].(float64); return int64(v) }
	clean := func(p string) string {
		if p == "" {
			return ""
		}
		abs, err := filepath.Abs(p)
		if err != nil {
			return p
		}
		return abs
	}
	checks := []struct {
		key       string
		got, want any
	}{
		{"format", info.Format, str("format")},
		{"virtual-size", info.VirtualSize, num("virtual-size")},
		{"cluster-size", info.ClusterSize, num("cluster-size")},
		{"dirty-flag", info.DirtyFlag, q["dirty-flag"] == true},
		{"backing-filename", info.BackingFilename, str("backing-filename")},
		{"full-backing-filename", clean(info.FullBackingFilename), clean(str("full-backing-filename"))},
	}
	if f := str("backing-filename-format"); f != "" {
		checks = append(checks, struct {
			key       string
			got, want any
		}{"backing-filename-format", info.BackingFormat, f})
	}
	for _, c := range checks {
		if c.got != c.want {
			t.Errorf("Info: %s = %v, qemu-img info says %v", c.key, c.got, c.want)
		}
	}
	// format-specific, compared as JSON values.
	b, err := json.Marshal(info.FormatSpecific)
	if err != nil {
		t.Fatalf("marshal FormatSpecific: %v", err)
	}
	var got any
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatal(err)
	}
	if want := q["format-specific"]; !reflect.DeepEqual(got, want) {
		gj, _ := json.Marshal(got)
		wj, _ := json.Marshal(want)
		t.Errorf("Info: format-specific = %s, qemu-img info says %s", gj, wj)
	}
}

// unmarshalMap decodes `qemu-img map --output=json`.
func unmarshalMap(out string, m *[]qemutest.MapEntry) error {
	return json.Unmarshal([]byte(out), m)
}

// chunkSizes are the uneven read sizes compareReads cycles through.
var chunkSizes = []int64{1, 511, 512, 4099, 65535, 65543, 1<<20 + 13, 3 << 20, 7}

// compareReads reads img whole, sequentially in uneven chunks, and
// compares it with want, reporting the first differing offset.
func compareReads(t *testing.T, img disk.Image, want []byte) {
	t.Helper()
	if img.Size() != int64(len(want)) {
		t.Fatalf("Size() = %d, qemu-img reads %d bytes", img.Size(), len(want))
	}
	got := make([]byte, len(want))
	for off, i := int64(0), 0; off < int64(len(want)); i++ {
		n := min(chunkSizes[i%len(chunkSizes)], int64(len(want))-off)
		m, err := img.ReadAt(got[off:off+n], off)
		if err != nil || int64(m) != n {
			t.Fatalf("ReadAt(off %d, len %d) = %d, %v", off, n, m, err)
		}
		if d := qemutest.FirstDiff(got[off:off+n], want[off:off+n]); d >= 0 {
			t.Fatalf("sequential read (chunk at %d, len %d) differs from qemu-img at offset %d (%#x): got %#02x, want %#02x",
				off, n, off+d, off+d, got[off+d], want[off+d])
		}
		off += n
	}
}

// compareParallelReads reads img whole from 8 goroutines that take
// randomly sized pieces in turn, and compares with want.
func compareParallelReads(t *testing.T, img disk.Image, want []byte, seed uint64) {
	t.Helper()
	r := rand.New(rand.NewPCG(seed, 99))
	type piece struct{ off, n int64 }
	var pieces []piece
	for off := int64(0); off < int64(len(want)); {
		n := min(1+r.Int64N(256<<10), int64(len(want))-off)
		pieces = append(pieces, piece{off, n})
		off += n
	}
	r.Shuffle(len(pieces), func(i, j int) { pieces[i], pieces[j] = pieces[j], pieces[i] })
	var next atomic.Int64
	var mu sync.Mutex
	firstBad, badMsg := int64(-1), ""
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 256<<10)
			for {
				i := next.Add(1) - 1
				if i >= int64(len(pieces)) {
					return
				}
				p := pieces[i]
				b := buf[:p.n]
				_, err := img.ReadAt(b, p.off)
				msg, bad := "", int64(-1)
				if err != nil {
					bad, msg = p.off, fmt.Sprintf("ReadAt(off %d, len %d): %v", p.off, p.n, err)
				} else if d := qemutest.FirstDiff(b, want[p.off:p.off+p.n]); d >= 0 {
					bad = p.off + d
					msg = fmt.Sprintf("parallel read (piece at %d, len %d) differs from qemu-img at offset %d (%#x): got %#02x, want %#02x",
						p.off, p.n, bad, bad, b[d], want[bad])
				}
				if bad >= 0 {
					mu.Lock()
					if firstBad < 0 || bad < firstBad {
						firstBad, badMsg = bad, msg
					}
					mu.Unlock()
				}
			}
		}()
	}
	wg.Wait()
	if firstBad >= 0 {
		t.Error(badMsg)
	}
}

// comparePartialMaps checks Map at random unaligned offsets and lengths:
// the extent must start at the offset asked for, lie within the range
// asked for, and agree with qemu-img map where it starts.
func comparePartialMaps(t *testing.T, img disk.Image, qmap []qemutest.MapEntry) {
	t.Helper()
	want := qemuSpans(qmap)
	size := img.Size()
	r := rand.New(rand.NewPCG(uint64(size), 3))
	for i := range 200 {
		off := r.Int64N(size)
		n := 1 + r.Int64N(min(size-off, 1<<20))
		if i%4 == 0 {
			n = size - off
		}
		e, err := disk.Map(img, off, n)
		if err != nil {
			t.Fatalf("Map(%d, %d): %v", off, n, err)
		}
		if e.Offset != off || e.Length <= 0 || e.Length > n {
			t.Fatalf("Map(%d, %d) = %+v: want an extent starting at %d of 1..%d bytes", off, n, e, off, n)
		}
		for _, w := range want {
			if w.start <= off && off < w.end {
				data, zero := e.Status&disk.StatusData != 0, e.Status&disk.StatusZero != 0
				present := e.Status&disk.StatusAllocated != 0
				if data != w.data || (zero != w.zero && !(data && w.data)) || present != w.present || e.Depth != w.depth {
					t.Errorf("Map(%d, %d) = %+v, qemu-img map has %v there", off, n, e, w)
				}
				break
			}
		}
	}
}

// span is a run of the virtual disk with uniform allocation status.
type span struct {
	start, end          int64
	data, zero, present bool
	depth               int
	off                 int64 // host offset of start, -1 if none
}

func (s span) String() string {
	return fmt.Sprintf("[%d,%d) data=%v zero=%v present=%v depth=%d offset=%d",
		s.start, s.end, s.data, s.zero, s.present, s.depth, s.off)
}

// imageSpans maps img whole with disk.Extents.
func imageSpans(t *testing.T, img disk.Image) []span {
	t.Helper()
	var out []span
	next := int64(0)
	err := disk.Extents(img, 0, img.Size(), func(e disk.Extent) error {
		if e.Offset != next {
			return fmt.Errorf("extent %+v does not start at %d", e, next)
		}
		next = e.Offset + e.Length
		out = append(out, span{e.Offset, next, e.Status&disk.StatusData != 0, e.Status&disk.StatusZero != 0,
			e.Status&disk.StatusAllocated != 0, e.Depth, e.HostOffset})
		return nil
	})
	if err != nil {
		t.Fatalf("disk.Extents: %v", err)
	}
	if next != img.Size() {
		t.Fatalf("extents end at %d, disk size %d", next, img.Size())
	}
	return out
}

// qemuSpans converts qemu-img map entries.
func qemuSpans(m []qemutest.MapEntry) []span {
	out := make([]span, 0, len(m))
	for _, e := range m {
		s := span{e.Start, e.Start + e.Length, e.Data, e.Zero, e.Present, e.Depth, -1}
		if e.Offset != nil {
			s.off = *e.Offset
		}
		out = append(out, s)
	}
	return out
}

// compareMaps compares img's extents with qemu-img map's, range by range:
// data, zero, present (StatusAllocated) and depth must agree. Where both
// say data, a zero flag may differ (qemu-img also asks the host file
// whether stored data reads as zeros), and host offsets must agree where
// both report one.
func compareMaps(t *testing.T, img disk.Image, qmap []qemutest.MapEntry) {
	t.Helper()
	got, want := imageSpans(t, img), qemuSpans(qmap)
	if n := len(want); n == 0 || want[n-1].end != img.Size() {
		t.Fatalf("qemu-img map covers %v, disk size %d", want, img.Size())
	}
	errs := 0
	for i, j := 0, 0; i < len(got) && j < len(want); {
		g, w := got[i], want[j]
		lo, hi := max(g.start, w.start), min(g.end, w.end)
		zeroOK := g.zero == w.zero || (g.data && w.data)
		bad := g.data != w.data || !zeroOK || g.present != w.present || g.depth != w.depth
		if !bad && g.data && w.data && g.off >= 0 && w.off >= 0 && g.off+(lo-g.start) != w.off+(lo-w.start) {
			bad = true
		}
		if bad {
			t.Errorf("map differs from qemu-img at offset %d (%#x) for %d bytes:\n got  %v\n want %v", lo, lo, hi-lo, g, w)
			if errs++; errs >= 5 {
				t.Fatalf("too many map differences; got map:\n%v", got)
			}
		}
		if g.end == hi {
			i++
		}
		if w.end == hi {
			j++
		}
	}
}

// TestOracleLargeSparse maps and samples huge, mostly empty disks, which
// cannot be converted whole: the map must match qemu-img's (and come
// quickly: unallocated L1 entries cover whole L2 tables), reads must
// return what was written and zeros elsewhere.
func TestOracleLargeSparse(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	type write struct {
		off, n int64
		pat    byte // 0: write -z
	}
	cases := []struct {
		name, opts, size string
		writes           []write
	}{
		{"4T-64k", "", "4T", []write{{0, 65536, 0x11}, {1<<40 + 123, 1000, 0x22}, {2 << 40, 1 << 20, 0}, {4<<40 - 4096, 4096, 0x33}}},
		{"16G-512-v2", "compat=0.10,cluster_size=512", "16G", []write{{0, 512, 0x11}, {5<<30 + 7, 70000, 0x22}, {16<<30 - 1024, 1024, 0x33}}},
		{"64T-2M", "cluster_size=2M", "64T", []write{{1 << 20, 4096, 0x11}, {40<<40 + 5, 5, 0x22}, {64<<40 - 512, 512, 0x33}}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			p := mkqcow2(t, filepath.Join(t.TempDir(), "big.qcow2"), c.opts, c.size)
			var cmds []string
			for _, w := range c.writes {
				if w.pat == 0 {
					cmds = append(cmds, fmt.Sprintf("write -z %d %d", w.off, w.n))
				} else {
					cmds = append(cmds, fmt.Sprintf("write -P %#x %d %d", w.pat, w.off, w.n))
				}
			}
			qio(t, p, cmds...)
			qmap := qemutest.Map(t, p)
			expect := func(off, n int64) []byte {
				b := make([]byte, n)
				for _, w := range c.writes {
					lo, hi := max(off, w.off), min(off+n, w.off+w.n)
					for i := lo; i < hi; i++ {
						b[i-off] = w.pat
					}
				}
				return b
			}
			done := make(chan struct{})
			go func() {
				defer close(done)
				img, err := disk.Open(p, disk.OpenOptions{Format: "qcow2", ReadOnly: true})
				if err != nil {
					t.Errorf("disk.Open: %v", err)
					return
				}
				defer img.Close()
				check := func(off, n int64) bool {
					got := make([]byte, n)
					if _, err := img.ReadAt(got, off); err != nil {
						t.Errorf("ReadAt(%d, %d): %v", off, n, err)
						return false
					}
					if d := qemutest.FirstDiff(got, expect(off, n)); d >= 0 {
						t.Errorf("ReadAt(%d, %d) differs at offset %d: got %#02x", off, n, off+d, got[d])
						return false
					}
					return true
				}
				for _, w := range c.writes {
					if !check(max(0, w.off-1000), min(w.n+2000, img.Size()-max(0, w.off-1000))) {
						return
					}
				}
				r := rand.New(rand.NewPCG(7, 7))
				for range 100 {
					off := r.Int64N(img.Size() - 65536)
					if !check(off, 65536) {
						return
					}
				}
				got, want := imageSpansErr(img), qemuSpans(qmap)
				if got == nil {
					t.Errorf("disk.Extents failed")
					return
				}
				if fmt.Sprint(normalizeSpans(got)) != fmt.Sprint(normalizeSpans(want)) {
					t.Errorf("map differs from qemu-img:\n got  %v\n want %v", normalizeSpans(got), normalizeSpans(want))
				}
			}()
			select {
			case <-done:
			case <-time.After(30 * time.Second):
				t.Fatalf("reading and mapping took over 30 s")
			}
		})
	}
}

// imageSpansErr maps img whole with disk.Extents; nil on error.
func imageSpansErr(img disk.Image) []span {
	var out []span
	err := disk.Extents(img, 0, img.Size(), func(e disk.Extent) error {
		out = append(out, span{e.Offset, e.Offset + e.Length, e.Status&disk.StatusData != 0, e.Status&disk.StatusZero != 0,
			e.Status&disk.StatusAllocated != 0, e.Depth, e.HostOffset})
		return nil
	})
	if err != nil {
		return nil
	}
	return out
}

// normalizeSpans drops host offsets and merges adjacent spans of equal
// status, so that maps split differently compare equal.
func normalizeSpans(in []span) []span {
	var out []span
	for _, s := range in {
		s.off = -1
		if n := len(out); n > 0 && out[n-1].end == s.start && out[n-1].data == s.data && out[n-1].zero == s.zero &&
			out[n-1].present == s.present && out[n-1].depth == s.depth {
			out[n-1].end = s.end
			continue
		}
		out = append(out, s)
	}
	return out
}
