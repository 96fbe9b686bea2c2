package qcow2_test

// Read benchmarks: 4 KiB reads (and 64 KiB sequential ones) of a 64 MiB image (normal clusters, zlib-
// and zstd-compressed clusters), sequential, random (seeded) and strided,
// single-threaded and parallel; and, beside each, `qemu-img bench` on the
// same image so that one run yields both figures (bench/read.sh prints the
// ratios).
//
//	go test -run '^$' -bench BenchmarkRead ./disk/qcow2/
//
// IMGLOOP_BENCH_MIB sets the image size in MiB (default 64).

import (
	"math/rand/v2"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"sync/atomic"
	"testing"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/internal/qemutest"
)

const benchBlock = 4096

// benchStride is the step of the strided benchmarks, in blocks: a prime,
// so that the walk visits every block of a power-of-two-sized image
// before repeating (qemu-img bench -S wraps the offset modulo the size).
const benchStride = 7919

// benchImages builds the benchmark images in a temporary folder that is
// removed when b ends: "normal" (incompressible data, normal clusters),
// "zlib" and "zstd" (compressible data, every cluster compressed).
func benchImages(b *testing.B) (size int64, paths map[string]string) {
	b.Helper()
	qemutest.Require(b, "qemu-img")
	mib := int64(64)
	if s := os.Getenv("IMGLOOP_BENCH_MIB"); s != "" {
		v, err := strconv.ParseInt(s, 10, 64)
		if err != nil || v <= 0 {
			b.Fatalf("IMGLOOP_BENCH_MIB=%q: want a positive number", s)
		}
		mib = v
	}
	size = mib << 20
	dir := b.TempDir()
	random := make([]byte, size)
	r := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < len(random); i += 8 {
		v := r.Uint64()
		for j := 0; j < 8; j++ {
			random[i+j] = byte(v >> (8 * j))
		}
	}
	rawRandom := filepath.Join(dir, "random.raw")
	writeFile(b, rawRandom, random)
	rawText := filepath.Join(dir, "text.raw")
	writeFile(b, rawText, qemutest.Compressible(3, int(size)))
	paths = map[string]string{
		"normal": filepath.Join(dir, "normal.qcow2"),
		"zlib":   filepath.Join(dir, "zlib.qcow2"),
		"zstd":   filepath.Join(dir, "zstd.qcow2"),
	}
	qemutest.Img(b, "convert", "-f", "raw", "-O", "qcow2", rawRandom, paths["normal"])
	qemutest.Img(b, "convert", "-c", "-f", "raw", "-O", "qcow2", rawText, paths["zlib"])
	qemutest.Img(b, "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=zstd", rawText, paths["zstd"])
	os.Remove(rawRandom)
	os.Remove(rawText)
	return size, paths
}

// BenchmarkRead: imgloop's 4 KiB reads, and qemu-img bench's, on the same
// images. Sub-benchmark names: <image>/<pattern>[-parallel] for imgloop,
// <image>/qemu-<pattern>[-d8] for qemu-img bench (whose ns/op and MB/s
// are its own timing of the requests, without process start-up).
func BenchmarkRead(b *testing.B) {
	size, paths := benchImages(b)
	blocks := size / benchBlock
	for _, kind := range []string{"normal", "zlib", "zstd"} {
		path := paths[kind]
		open := func(b *testing.B) disk.Image {
			img, err := disk.Open(path, disk.OpenOptions{Format: "qcow2", ReadOnly: true})
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { img.Close() })
			return img
		}
		// next returns the i-th offset of a pattern.
		patterns := []struct {
			name string
			next func(r *rand.Rand, i int64) int64
		}{
			{"seq", func(_ *rand.Rand, i int64) int64 { return (i % blocks) * benchBlock }},
			{"stride", func(_ *rand.Rand, i int64) int64 { return (i * benchStride % blocks) * benchBlock }},
			{"rand", func(r *rand.Rand, _ int64) int64 { return r.Int64N(blocks) * benchBlock }},
		}
		for _, p := range patterns {
			b.Run(kind+"/"+p.name, func(b *testing.B) {
				img := open(b)
				buf := make([]byte, benchBlock)
				r := rand.New(rand.NewPCG(42, 0))
				b.SetBytes(benchBlock)
				b.ResetTimer()
				for i := int64(0); i < int64(b.N); i++ {
					if _, err := img.ReadAt(buf, p.next(r, i)); err != nil {
						b.Fatal(err)
					}
				}
			})
			b.Run(kind+"/"+p.name+"-parallel", func(b *testing.B) {
				img := open(b)
				var seed, counter atomic.Int64
				b.SetBytes(benchBlock)
				b.SetParallelism(4) // 4 x GOMAXPROCS goroutines
				b.ResetTimer()
				b.RunParallel(func(pb *testing.PB) {
					buf := make([]byte, benchBlock)
					r := rand.New(rand.NewPCG(42, uint64(seed.Add(1))))
					for pb.Next() {
						// A shared counter: together the goroutines walk
						// the pattern once, as qemu-img bench -d 8 does.
						if _, err := img.ReadAt(buf, p.next(r, counter.Add(1)-1)); err != nil {
							b.Error(err)
							return
						}
					}
				})
			})
		}
		// Cluster-sized sequential reads: for compressed images, one
		// decompression per read.
		b.Run(kind+"/seq-64k", func(b *testing.B) {
			img := open(b)
			buf := make([]byte, 64<<10)
			n := size / int64(len(buf))
			b.SetBytes(int64(len(buf)))
			b.ResetTimer()
			for i := int64(0); i < int64(b.N); i++ {
				if _, err := img.ReadAt(buf, (i%n)*int64(len(buf))); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(kind+"/qemu-seq-64k", func(b *testing.B) {
			qemuBench(b, path, 64<<10, "-d", "1")
		})
		for _, q := range []struct {
			name string
			args []string
		}{
			{"qemu-seq", []string{"-d", "1"}},
			{"qemu-stride", []string{"-d", "1", "-S", strconv.Itoa(benchStride * benchBlock)}},
			{"qemu-seq-d8", []string{"-d", "8"}},
			{"qemu-stride-d8", []string{"-d", "8", "-S", strconv.Itoa(benchStride * benchBlock)}},
		} {
			b.Run(kind+"/"+q.name, func(b *testing.B) {
				qemuBench(b, path, benchBlock, q.args...)
			})
		}
	}
}

var benchCompleted = regexp.MustCompile(`Run completed in ([0-9.]+) seconds`)

// qemuBench runs `qemu-img bench` for b.N reads of bs bytes of the qcow2
// image at path through the host page cache (-t writeback, as imgloop
// reads) and reports qemu-img's own timing as ns/op and MB/s.
func qemuBench(b *testing.B, path string, bs int, extra ...string) {
	b.Helper()
	args := append([]string{"bench", "-f", "qcow2", "-t", "writeback", "-s", strconv.Itoa(bs),
		"-c", strconv.Itoa(max(b.N, 1))}, extra...)
	out := qemutest.Img(b, append(args, path)...)
	m := benchCompleted.FindStringSubmatch(out)
	if m == nil {
		b.Fatalf("qemu-img bench printed no timing:\n%s", out)
	}
	sec, err := strconv.ParseFloat(m[1], 64)
	if err != nil {
		b.Fatal(err)
	}
	ns := sec * 1e9 / float64(max(b.N, 1))
	b.ReportMetric(ns, "ns/op")
	if ns > 0 {
		b.ReportMetric(float64(bs)/ns*1e3, "MB/s")
	}
}
