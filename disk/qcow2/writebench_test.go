package qcow2_test

// Write benchmarks (issue 3): allocating 4 KiB writes scattered over the
// disk and sequential 1 MiB writes, on a fresh image (64 KiB clusters,
// qcow2 v3, made by qemu-img create) for each run, through the library;
// and, beside each, `qemu-img bench -w` doing the same writes on the
// same kind of image, so that one run yields both figures.
//
//	go test -run '^$' -bench BenchmarkWriteQemu -benchtime 2000x ./disk/qcow2/
//
// Offsets: write i lands at (i*step) mod size, as qemu-img bench -S step
// walks the disk (it has no random pattern). rand4k: 4 KiB writes with a
// step of 7919 clusters over a 16 GiB disk (a prime number of clusters,
// so every write allocates a new cluster until all 262144 have been
// written, and the L2 tables fill in a scattered order); seq1m: 1 MiB
// writes with a 1 MiB step over an 8 GiB disk.
//
// Cache semantics, the same on both sides: writes go through the host
// page cache (imgloop: a plain file; qemu-img bench -t writeback), and
// the run ends with the data durable (imgloop: Close, which flushes;
// qemu-img: closing the image, which flushes its metadata caches and
// fdatasyncs the file). ns/op is the wall time of open + writes + close
// (for qemu-img, of the whole process) divided by the number of writes;
// qemu-img's own timing, which leaves out the open and the final flush,
// is reported as qemu-ns/op. The -parallel variants run 8 goroutines
// against qemu-img bench -d 8 (8 requests in flight).
//
// bench/write.sh runs the same comparison with a standalone program
// (bench/writebench) and prints the ratios.

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/internal/qemutest"
)

// wbWorkload is one write benchmark.
type wbWorkload struct {
	name string
	bs   int64 // bytes per write
	step int64 // offset increment (mod size)
	size int64 // virtual disk size
}

// wbCluster is the benchmark images' cluster size.
const wbCluster = 65536

var wbWorkloads = []wbWorkload{
	{name: "rand4k", bs: 4096, step: 7919 * wbCluster, size: 16 << 30},
	{name: "seq1m", bs: 1 << 20, step: 1 << 20, size: 8 << 30},
}

// wbCompleted finds qemu-img bench's own timing in its output.
var wbCompleted = regexp.MustCompile(`Run completed in ([0-9.]+) seconds`)

// wbPattern is the byte every write carries (qemu-img bench --pattern).
const wbPattern = 0xa5

// wbCreate makes a fresh image for w at path.
func wbCreate(b *testing.B, path string, w wbWorkload) {
	b.Helper()
	os.Remove(path)
	qemutest.Create(b, path, "qcow2", "compat=1.1,cluster_size="+strconv.Itoa(wbCluster), strconv.FormatInt(w.size, 10))
}

// BenchmarkWriteQemu: imgloop's writes and qemu-img bench -w's, on fresh
// images. Sub-benchmarks: <workload>[-parallel] for imgloop,
// qemu-<workload>[-d8] for qemu-img.
func BenchmarkWriteQemu(b *testing.B) {
	qemutest.Require(b, "qemu-img")
	for _, w := range wbWorkloads {
		for _, workers := range []int{1, 8} {
			suffix, qsuffix := "", ""
			if workers > 1 {
				suffix, qsuffix = "-parallel", "-d8"
			}
			b.Run(w.name+suffix, func(b *testing.B) {
				path := filepath.Join(b.TempDir(), "w.qcow2")
				b.StopTimer()
				wbCreate(b, path, w)
				b.SetBytes(w.bs)
				b.StartTimer()
				if err := wbImgloop(path, w, int64(b.N), workers); err != nil {
					b.Fatal(err)
				}
			})
			b.Run("qemu-"+w.name+qsuffix, func(b *testing.B) {
				path := filepath.Join(b.TempDir(), "w.qcow2")
				b.StopTimer()
				wbCreate(b, path, w)
				b.SetBytes(w.bs)
				b.StartTimer()
				sec, err := wbQemu(path, w, int64(b.N), workers)
				b.StopTimer()
				if err != nil {
					b.Fatal(err)
				}
				b.ReportMetric(sec*1e9/float64(b.N), "qemu-ns/op")
			})
		}
	}
}

// wbImgloop opens the image at path, writes n blocks of w with workers
// goroutines (sharing one offset sequence), and closes it.
func wbImgloop(path string, w wbWorkload, n int64, workers int) error {
	img, err := disk.Open(path, disk.OpenOptions{Format: "qcow2"})
	if err != nil {
		return err
	}
	var next atomic.Int64
	var wg sync.WaitGroup
	errs := make([]error, workers)
	for g := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, w.bs)
			for i := range buf {
				buf[i] = wbPattern
			}
			for {
				i := next.Add(1) - 1
				if i >= n {
					return
				}
				off := (i * w.step) % w.size
				if _, err := img.WriteAt(buf, off); err != nil {
					errs[g] = fmt.Errorf("write %d at %#x: %w", i, off, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	cerr := img.Close()
	for _, e := range errs {
		if e != nil {
			return e
		}
	}
	return cerr
}

// wbQemu runs qemu-img bench -w for n writes of w with depth requests in
// flight and returns its own timing in seconds.
func wbQemu(path string, w wbWorkload, n int64, depth int) (float64, error) {
	args := []string{"bench", "-w", "-f", "qcow2", "-t", "writeback",
		"-c", strconv.FormatInt(n, 10), "-d", strconv.Itoa(depth),
		"-s", strconv.FormatInt(w.bs, 10), "-S", strconv.FormatInt(w.step, 10),
		"--pattern=" + strconv.Itoa(wbPattern), path}
	out, err := exec.Command("qemu-img", args...).CombinedOutput()
	if err != nil {
		return 0, fmt.Errorf("qemu-img %v: %v\n%s", args, err, out)
	}
	m := wbCompleted.FindSubmatch(out)
	if m == nil {
		return 0, fmt.Errorf("qemu-img bench printed no timing:\n%s", out)
	}
	return strconv.ParseFloat(string(m[1]), 64)
}
