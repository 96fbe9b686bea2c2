package convert

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/disk/hostfile"
	"github.com/imgloop/imgloop/disk/qcow2"
	"github.com/imgloop/imgloop/internal/qemutest"
)

// oracleDisk returns size bytes of test data: compressible text, random
// bytes, runs of zeros inside data, and data in the last sectors.
func oracleDisk(size int) []byte {
	b := make([]byte, size)
	copy(b[256<<10:], qemutest.Compressible(11, 512<<10))
	clear(b[384<<10 : 448<<10]) // zeros inside the data
	for i := 1500 << 10; i < 1600<<10 && i < size; i++ {
		b[i] = byte(i*131 + i>>9)
	}
	copy(b[size-1200:], qemutest.Compressible(12, 1000))
	return b
}

// oracleSource is a source image of the oracle tests.
type oracleSource struct {
	name, path string
}

// makeOracleSources creates, in dir: a raw image whose size is not a
// multiple of 512, a raw image of 2 MiB + 1536 bytes, a qcow2 image with
// zero clusters (16 KiB clusters), a compressed qcow2 image, and a
// two-layer backing chain whose top layer (4 KiB clusters) holds partial
// writes, zero clusters over data of the base, and data past the end of
// its shorter base.
func makeOracleSources(t *testing.T, dir string) []oracleSource {
	t.Helper()
	write := func(name string, data []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	odd := write("odd.raw", oracleDisk(2<<20+100))
	raw := write("src.raw", oracleDisk(2<<20+1536))
	zero := filepath.Join(dir, "zero.qcow2")
	qemutest.Img(t, "convert", "-O", "qcow2", "-o", "cluster_size=16k", raw, zero)
	qemutest.IO(t, zero, "qcow2", "write -z 320k 64k", "write -z -u 1M 48k", "write -P 0x5a 1900k 4k")
	zlib := filepath.Join(dir, "zlib.qcow2")
	qemutest.Img(t, "convert", "-c", "-O", "qcow2", raw, zlib)
	base := filepath.Join(dir, "base.qcow2")
	qemutest.Img(t, "convert", "-O", "qcow2", write("base.raw", oracleDisk(1536<<10)), base)
	top := filepath.Join(dir, "top.qcow2")
	qemutest.Create(t, top, "qcow2", "cluster_size=4k", "2098688", "-b", "base.qcow2", "-F", "qcow2")
	qemutest.IO(t, top, "qcow2",
		"write -P 0xaa 100k 8k",    // data over base data
		"write -z 300k 200k",       // zero clusters over base data
		"write -P 0 700k 4k",       // zero data over base data
		"write -P 0x11 1100k 1k",   // a partial cluster
		"write -P 0x22 1700k 12k",  // past the end of the base
		"write -P 0x33 2047k 1536") // the last, partial, cluster
	return []oracleSource{{"odd.raw", odd}, {"raw", raw}, {"zero.qcow2", zero}, {"zlib.qcow2", zlib}, {"chain", top}}
}

// parseOpts splits "k=v,k=v" into creation options.
func parseOpts(s string) map[string]string {
	opts := map[string]string{}
	for _, kv := range strings.Split(s, ",") {
		if k, v, ok := strings.Cut(kv, "="); ok {
			opts[k] = v
		}
	}
	return opts
}

// streamConvert converts src to a new qcow2 image at out with Clusters
// and a qcow2.StreamWriter, as imgloop convert -O qcow2 does.
func streamConvert(t *testing.T, src, out string, opts map[string]string, compress bool, o Options) {
	t.Helper()
	img, err := disk.Open(src, disk.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	f, err := hostfile.Create(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	w, err := qcow2.NewStreamWriter(f, img.Size(), opts)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Clusters(context.Background(), img, w, compress, o); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
}

// checkClean fails unless qemu-img check finds the image clean.
func checkClean(t *testing.T, path string) {
	t.Helper()
	out := qemutest.Img(t, "check", "-f", "qcow2", path)
	if !strings.Contains(out, "No errors were found") || strings.Contains(out, "leaked") {
		t.Fatalf("qemu-img check %s:\n%s", filepath.Base(path), out)
	}
}

// TestClustersOracle converts every oracle source with every option the
// stream writer accepts, and checks each output with qemu-img check
// (clean, no leaks) and compare (equal to the source), that imgloop
// reads it as qemu-img reads the source, and that its allocation map is
// that of qemu-img convert's output.
func TestClustersOracle(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	srcs := makeOracleSources(t, dir)
	want := map[string][]byte{}
	for _, s := range srcs {
		b := qemutest.RawBytes(t, s.path)
		want[s.name] = append(b, make([]byte, (512-len(b)%512)%512)...)
	}
	for _, tc := range []struct {
		opts     string
		compress bool
	}{
		{"", false},
		{"", true},
		{"cluster_size=512", false},
		{"cluster_size=4k", true},
		{"cluster_size=2M", false},
		{"cluster_size=2M,compression_type=zstd", true},
		{"compat=0.10", false},
		{"compat=0.10,cluster_size=4k", true},
		{"refcount_bits=1,cluster_size=4k", true},
		{"refcount_bits=64", false},
		{"extended_l2=on", false},
		{"extended_l2=on,cluster_size=16k", true},
		{"compression_type=zstd", true},
		{"lazy_refcounts=on", false},
	} {
		name := tc.opts
		if tc.compress {
			name += ",-c"
		}
		t.Run(strings.TrimPrefix(name, ","), func(t *testing.T) {
			for _, s := range srcs {
				out := filepath.Join(t.TempDir(), "out.qcow2")
				streamConvert(t, s.path, out, parseOpts(tc.opts), tc.compress, Options{Workers: 3, ChunkSize: 256 << 10})
				checkClean(t, out)
				qemutest.Img(t, "compare", "-q", s.path, out)
				if d := qemutest.FirstDiff(readAll(t, out), want[s.name]); d >= 0 {
					t.Fatalf("%s: imgloop reads the output differently from qemu-img's reading of the source, at %#x", s.name, d)
				}
				ref := filepath.Join(filepath.Dir(out), "ref.qcow2")
				args := []string{"convert", "-O", "qcow2"}
				if tc.compress {
					args = append(args, "-c")
				}
				if tc.opts != "" {
					args = append(args, "-o", tc.opts)
				}
				qemutest.Img(t, append(args, s.path, ref)...)
				if got, want := mapLayout(t, out), mapLayout(t, ref); !mapsEqual(got, want) {
					t.Errorf("%s: map differs from qemu-img convert's:\n got %+v\nwant %+v", s.name, got, want)
				}
			}
		})
	}
}

// mapLayout returns qemu-img map's extents of image without host
// offsets, merged where they then look alike.
func mapLayout(t *testing.T, image string) []qemutest.MapEntry {
	t.Helper()
	var out []qemutest.MapEntry
	for _, e := range qemutest.Map(t, image) {
		e.Offset = nil
		if n := len(out); n > 0 {
			p := &out[n-1]
			if p.Depth == e.Depth && p.Present == e.Present && p.Zero == e.Zero && p.Data == e.Data {
				p.Length += e.Length
				continue
			}
		}
		out = append(out, e)
	}
	return out
}

// TestClustersBackedOracle converts the oracle sources (the top of a
// backing chain, a raw image, qcow2 images without backing files) with a
// backing file (qemu-img convert -B) and compares the
// outputs with qemu-img's: qemu-img check clean, the backing file and
// its format in the header, the same disk as the source (through the
// backing file), and the same allocation map as qemu-img convert -B's
// output (unallocated where the source's top layer is, zero clusters
// where it reads as zeros).
func TestClustersBackedOracle(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	srcs := makeOracleSources(t, dir)
	base := filepath.Join(dir, "base.qcow2")
	baseImg, err := disk.Open(base, disk.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	baseSize := baseImg.Size()
	baseImg.Close()
	for _, tc := range []struct {
		opts     string
		compress bool
		sameMap  bool // qemu-img's output has the same map
	}{
		{"", false, true},
		{"", true, true},
		{"cluster_size=4k", false, true},
		{"cluster_size=512", false, true},
		{"compat=0.10", false, true},
		{"compat=0.10", true, true},
		{"extended_l2=on", false, true},
		{"extended_l2=on,cluster_size=16k", true, true},
		{"compression_type=zstd,cluster_size=16k", true, true},
	} {
		name := tc.opts
		if tc.compress {
			name += ",-c"
		}
		t.Run(strings.TrimPrefix(name, ","), func(t *testing.T) {
			for _, s := range srcs {
				if s.name == "odd.raw" {
					continue // as src.raw
				}
				opts := parseOpts(tc.opts)
				opts["backing_file"], opts["backing_fmt"] = "base.qcow2", "qcow2"
				out := filepath.Join(dir, "out.qcow2")
				streamConvert(t, s.path, out, opts, tc.compress, Options{Workers: 3, ChunkSize: 128 << 10, Backed: true, BackingSize: baseSize})
				checkClean(t, out)
				info := qemutest.Info(t, out)
				if info["backing-filename"] != "base.qcow2" || info["backing-filename-format"] != "qcow2" {
					t.Fatalf("%s: backing file %v, format %v", s.name, info["backing-filename"], info["backing-filename-format"])
				}
				qemutest.Img(t, "compare", "-q", s.path, out)
				if d := qemutest.FirstDiff(readAll(t, out), qemutest.RawBytes(t, s.path)); d >= 0 {
					t.Fatalf("%s: imgloop reads the output differently at %#x", s.name, d)
				}
				ref := filepath.Join(dir, "ref.qcow2")
				args := []string{"convert", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2"}
				if tc.compress {
					args = append(args, "-c")
				}
				if tc.opts != "" {
					args = append(args, "-o", tc.opts)
				}
				if _, err := qemutest.TryIn(dir, "qemu-img", append(args, s.path, ref)...); err != nil {
					t.Fatal(err)
				}
				got, want := mapLayout(t, out), mapLayout(t, ref)
				if tc.sameMap && !mapsEqual(got, want) {
					t.Errorf("%s: map differs from qemu-img convert -B's:\n got %+v\nwant %+v", s.name, got, want)
				}
				if fi, err := os.Stat(out); err == nil {
					if ri, err := os.Stat(ref); err == nil && fi.Size() > ri.Size()+ri.Size()/10+256<<10 {
						t.Errorf("%s: output of %d bytes, qemu-img's %d", s.name, fi.Size(), ri.Size())
					}
				}
			}
		})
	}
}

func mapsEqual(a, b []qemutest.MapEntry) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		x, y := a[i], b[i]
		if x.Start != y.Start || x.Length != y.Length || x.Depth != y.Depth || x.Present != y.Present || x.Zero != y.Zero || x.Data != y.Data {
			return false
		}
	}
	return true
}
