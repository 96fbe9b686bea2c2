package qcow2

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/internal/qemutest"
)

// writeShape is an image made by qemu-img for the randomised write tests.
type writeShape struct {
	name string
	// opts and size are qemu-img create's.
	opts, size string
	// backing: give the image a qcow2 backing file with data.
	backing bool
	// prepare runs qemu-io/qemu-img on the image after creating it (p is
	// its path).
	prepare func(t *testing.T, p string)
	// snapshot names a snapshot prepare took, whose content must not
	// change.
	snapshot string
	// compress: the image is a compressed copy (qemu-img convert -c) of
	// random compressible data.
	compress bool
}

func writeShapes() []writeShape {
	fill := func(cmds ...string) func(t *testing.T, p string) {
		return func(t *testing.T, p string) { qemutest.IO(t, p, "qcow2", cmds...) }
	}
	some := fill("write -P 0x11 64k 64k", "write -P 0x12 300k 5000", "write -z 500k 100k")
	var shapes []writeShape
	for _, compat := range []string{"0.10", "1.1"} {
		for _, cs := range []string{"512", "4k", "64k", "2M"} {
			size := "1M"
			switch cs {
			case "64k":
				size = "6M"
			case "2M":
				size = "9M"
			}
			for _, b := range []bool{false, true} {
				shapes = append(shapes, writeShape{name: fmt.Sprintf("compat%s/cs%s/backing=%v", compat, cs, b),
					opts: "compat=" + compat + ",cluster_size=" + cs, size: size, backing: b, prepare: some})
			}
		}
	}
	snap := func(t *testing.T, p string) {
		qemutest.IO(t, p, "qcow2", "write -P 0x21 0 200k", "write -z 400k 64k")
		qemutest.Img(t, "snapshot", "-c", "s1", p)
		qemutest.IO(t, p, "qcow2", "write -P 0x22 100k 50k")
	}
	shapes = append(shapes,
		writeShape{name: "extended-l2/cs64k", opts: "extended_l2=on,cluster_size=64k", size: "4M", prepare: some},
		writeShape{name: "extended-l2/cs32k/backing", opts: "extended_l2=on,cluster_size=32k", size: "3M", backing: true, prepare: some},
		writeShape{name: "snapshot/cs4k", opts: "cluster_size=4k", size: "1M", prepare: snap, snapshot: "s1"},
		writeShape{name: "snapshot/v2/cs64k/backing", opts: "compat=0.10", size: "2M", backing: true, prepare: snap, snapshot: "s1"},
		writeShape{name: "snapshot/extended-l2", opts: "extended_l2=on,cluster_size=16k", size: "2M", prepare: snap, snapshot: "s1"},
		writeShape{name: "compressed/zlib", opts: "cluster_size=4k", compress: true},
		writeShape{name: "compressed/zstd", opts: "cluster_size=64k,compression_type=zstd", compress: true},
		writeShape{name: "compressed/extended-l2", opts: "cluster_size=32k,extended_l2=on", compress: true},
		writeShape{name: "refcount1", opts: "refcount_bits=1,cluster_size=4k", size: "1M", backing: true, prepare: some},
		writeShape{name: "refcount64", opts: "refcount_bits=64,cluster_size=512", size: "1M", prepare: some},
		writeShape{name: "unaligned-size", opts: "cluster_size=4k", size: "1000000", backing: true, prepare: some},
		writeShape{name: "lazy-refcounts", opts: "lazy_refcounts=on,cluster_size=4k", size: "1M", backing: true, prepare: some},
		writeShape{name: "data-file", opts: "data_file=DIR/img.data,cluster_size=4k", size: "1M", prepare: some},
		writeShape{name: "data-file-raw", opts: "data_file=DIR/img.data,data_file_raw=on,cluster_size=64k", size: "2M", backing: false, prepare: some},
	)
	return shapes
}

// build makes the shape's image in dir and returns its path and the
// backing file's content (nil without one).
func (s writeShape) build(t *testing.T, dir string) (string, []byte) {
	p := filepath.Join(dir, "img.qcow2")
	s.opts = strings.ReplaceAll(s.opts, "DIR/", dir+"/") // qemu-io resolves data files against its cwd
	if s.compress {
		src := filepath.Join(dir, "src.raw")
		if err := os.WriteFile(src, qemutest.Compressible(9, 1<<20+12345), 0o644); err != nil {
			t.Fatal(err)
		}
		qemutest.Img(t, "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", s.opts, src, p)
		return p, nil
	}
	var extra []string
	var base []byte
	if s.backing {
		bp := filepath.Join(dir, "base.qcow2")
		qemutest.Create(t, bp, "qcow2", s.opts, s.size)
		qemutest.IO(t, bp, "qcow2", "write -P 0x5a 0 300k", "write -P 0x6b 600k 100k")
		base = qemutest.RawBytes(t, bp)
		extra = []string{"-b", "base.qcow2", "-F", "qcow2"}
	}
	qemutest.Create(t, p, "qcow2", s.opts, s.size, extra...)
	if s.prepare != nil {
		s.prepare(t, p)
	}
	return p, base
}

// snapshotBytes returns the disk of snapshot name of the image at p, as
// qemu-img reads it.
func snapshotBytes(t *testing.T, p, name string) []byte {
	out := filepath.Join(t.TempDir(), "snap.raw")
	qemutest.Img(t, "convert", "-f", "qcow2", "-l", "snapshot.name="+name, "-O", "raw", p, out)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestWriteOracle runs seeded random mixes of writes, partial writes,
// discards, write-zeroes (with and without unmapping) and flushes on
// images of every shape qemu-img makes, mirrored into a byte model; then
// qemu-img check must find no corruption and no leak, qemu-img must read
// the model, snapshots must keep their content, and the image must reopen
// and read the model again.
func TestWriteOracle(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	ops := 1000
	if testing.Short() {
		ops = 200
	}
	for i, s := range writeShapes() {
		t.Run(s.name, func(t *testing.T) {
			t.Parallel()
			ops := ops
			if strings.Contains(s.name, "cs2M") {
				ops /= 4
			}
			dir := t.TempDir()
			p, base := s.build(t, dir)
			model := qemutest.RawBytes(t, p)
			var snap []byte
			if s.snapshot != "" {
				snap = snapshotBytes(t, p, s.snapshot)
			}
			img := openRW(t, p)
			seed := uint64(1000 + i)
			randomOps(t, img, model, base, seed, ops)
			finishWrites(t, img, p, model)
			if snap != nil {
				if d := qemutest.FirstDiff(snapshotBytes(t, p, s.snapshot), snap); d >= 0 {
					t.Errorf("snapshot %s changed at byte %d", s.snapshot, d)
				}
			}
			// Images written by imgloop reopen and are written again.
			img = openRW(t, p)
			randomOps(t, img, model, base, seed+1, ops/10)
			finishWrites(t, img, p, model)
		})
	}
}

// randomOps applies n seeded random operations to img and model: writes
// of 1 byte to 3 clusters (some cluster aligned, some partly zero),
// discards and write-zeroes of up to 5 clusters (rarely of the whole
// disk), flushes, each followed by a read of a random range compared with
// the model. base is the backing file's content (nil without one): a
// version 2 image shows it where whole clusters were discarded.
func randomOps(t *testing.T, img *Image, model, base []byte, seed uint64, n int) {
	t.Helper()
	r := rand.New(rand.NewPCG(seed, 7))
	cs := int(img.geo.clusterSize())
	size := len(model)
	// Data comes from a pool of random bytes (generating it byte by byte
	// is slow under the race detector).
	pool := make([]byte, 8<<20)
	rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8)}).Read(pool)
	// With big clusters, most requests stay below 192 KiB: partial
	// clusters are what needs testing, and whole 2 MiB ones are slow.
	bound := func(n int) int {
		if n > 192<<10 && r.IntN(8) != 0 {
			return 192 << 10
		}
		return n
	}
	randRange := func(maxLen int) (int, int) {
		k := 1 + r.IntN(min(bound(maxLen), size))
		off := r.IntN(size)
		if r.IntN(3) == 0 {
			off = r.IntN(size/cs+1) * cs % size
		}
		if r.IntN(4) == 0 {
			k = (k + cs - 1) / cs * cs
		}
		return off, min(k, size-off)
	}
	for i := 0; i < n; i++ {
		var what string
		switch op := r.IntN(20); {
		case op < 12:
			off, k := randRange(3 * cs)
			what = fmt.Sprintf("WriteAt(%d bytes at %d)", k, off)
			at := r.IntN(len(pool) - k)
			data := pool[at : at+k]
			if r.IntN(5) == 0 {
				data = bytes.Clone(data)
				clear(data[:k/2])
			}
			if m, err := img.WriteAt(data, int64(off)); err != nil || m != k {
				t.Fatalf("seed %d op %d: %s = %d, %v", seed, i, what, m, err)
			}
			copy(model[off:], data)
		case op < 15:
			off, k := randRange(5 * cs)
			if r.IntN(50) == 0 {
				off, k = 0, size
			}
			what = fmt.Sprintf("Discard(%d, %d)", off, k)
			kept := keptByDiscard(t, img, off, k)
			if err := img.Discard(int64(off), int64(k)); err != nil {
				t.Fatalf("seed %d op %d: %s: %v", seed, i, what, err)
			}
			discardModel(img, model, base, off, k, kept)
		case op < 19:
			off, k := randRange(5 * cs)
			var flags disk.ZeroFlags
			if r.IntN(2) == 0 {
				flags = disk.ZeroNoUnmap
			}
			what = fmt.Sprintf("WriteZeroes(%d, %d, %d)", off, k, flags)
			if err := img.WriteZeroes(int64(off), int64(k), flags); err != nil {
				t.Fatalf("seed %d op %d: %s: %v", seed, i, what, err)
			}
			clear(model[off : off+k])
		default:
			what = "Flush"
			if err := img.Flush(); err != nil {
				t.Fatalf("seed %d op %d: Flush: %v", seed, i, err)
			}
		}
		roff := r.IntN(size)
		rk := min(1+r.IntN(bound(6*cs)), size-roff)
		got := make([]byte, rk)
		if _, err := img.ReadAt(got, int64(roff)); err != nil {
			t.Fatalf("seed %d op %d (%s): ReadAt(%d at %d): %v", seed, i, what, rk, roff, err)
		}
		if d := qemutest.FirstDiff(got, model[roff:roff+rk]); d >= 0 {
			t.Fatalf("seed %d op %d (%s): read at %d differs from the model at %d (got %#x, want %#x)",
				seed, i, what, roff, int64(roff)+d, got[d], model[int64(roff)+d])
		}
	}
	got := make([]byte, size)
	if _, err := img.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if d := qemutest.FirstDiff(got, model); d >= 0 {
		t.Fatalf("seed %d: final read differs from the model at %d", seed, d)
	}
}

// discardModel applies Discard(off, k) to model: zeros, except that in a
// version 2 image with a backing file whole clusters show the backing
// file (the disk's last cluster counts as whole).
func discardModel(img *Image, model, base []byte, off, k int, kept []span) {
	a64, b64 := img.wholeUnits(int64(off), int64(k))
	a, b := int(a64), min(int(b64), len(model))
	for i := a; i < b; i++ {
		if inSpans(kept, i) {
			continue
		}
		model[i] = 0
		if img.geo.version < 3 && i < len(base) {
			model[i] = base[i]
		}
	}
}

// keptByDiscard returns the parts of a discard of [off, off+k) that it
// leaves as they are besides its unaligned ends: with extended L2
// entries, the subclusters of a compressed cluster it covers only in
// part.
func keptByDiscard(t *testing.T, img *Image, off, k int) []span {
	if !img.geo.extended {
		return nil
	}
	a, b := img.wholeUnits(int64(off), int64(k))
	cs := img.geo.clusterSize()
	var kept []span
	for c := a &^ (cs - 1); c < b; c += cs {
		if a <= c && c+cs <= b {
			continue
		}
		r, err := img.lookup(c, 1)
		if err != nil {
			t.Fatal(err)
		}
		if r.kind == kindCompressed {
			kept = append(kept, span{c, cs})
		}
	}
	return kept
}

func inSpans(spans []span, i int) bool {
	for _, s := range spans {
		if int64(i) >= s.off && int64(i) < s.off+s.n {
			return true
		}
	}
	return false
}

// TestWriteLazyRefcountsCrash leaves a lazy-refcounts image dirty (its
// refcounts are not written before Close), then reopens it read-write:
// the refcounts are rebuilt, writes go on, and qemu-img check finds the
// result clean.
func TestWriteLazyRefcountsCrash(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	p := filepath.Join(dir, "img.qcow2")
	qemutest.Create(t, p, "qcow2", "lazy_refcounts=on,cluster_size=4k", "2M")
	model := qemutest.RawBytes(t, p)
	img := openRW(t, p)
	randomOps(t, img, model, nil, 77, 300)
	if err := img.Flush(); err != nil {
		t.Fatal(err)
	}
	if !img.header().Dirty() {
		t.Fatal("a lazy-refcounts image is not marked dirty while written")
	}
	// "Crash": drop the image without Close (its refcounts stay
	// unwritten), closing only the file.
	img.f.Close()
	if got := qemutest.Info(t, p)["dirty-flag"]; got != true {
		t.Fatalf("qemu-img info: dirty-flag = %v, want true", got)
	}
	if d := qemutest.FirstDiff(qemutest.RawBytes(t, p), model); d >= 0 {
		t.Fatalf("flushed data differs at %d after the crash", d)
	}
	img = openRW(t, p)
	if img.header().Dirty() {
		t.Fatal("reopening read-write did not repair and clear the dirty bit")
	}
	randomOps(t, img, model, nil, 78, 100)
	finishWrites(t, img, p, model)
}

// allocatedBytes returns the bytes the file at p occupies on disk.
func allocatedBytes(t *testing.T, p string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(p, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

// TestWriteReuseAndPunch: discarded clusters are punched out of the file
// once free and reused by later writes (the file does not grow), and
// write-zeroes with disk.ZeroNoUnmap keeps clusters allocated.
func TestWriteReuseAndPunch(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	p := filepath.Join(t.TempDir(), "img.qcow2")
	qemutest.Create(t, p, "qcow2", "cluster_size=64k", "16M")
	img := openRW(t, p)
	data := bytes.Repeat([]byte{0x5a}, 8<<20)
	if _, err := img.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	if err := img.Flush(); err != nil {
		t.Fatal(err)
	}
	full, _ := img.f.Size()
	used := allocatedBytes(t, p)
	if err := img.Discard(0, 4<<20); err != nil {
		t.Fatal(err)
	}
	if err := img.Flush(); err != nil {
		t.Fatal(err)
	}
	if got := allocatedBytes(t, p); got > used-4<<20+64<<10 {
		t.Errorf("after discarding 4 MiB the file occupies %d bytes, was %d", got, used)
	}
	if _, err := img.WriteAt(data[:4<<20], 8<<20); err != nil {
		t.Fatal(err)
	}
	if err := img.Flush(); err != nil {
		t.Fatal(err)
	}
	if size, _ := img.f.Size(); size != full {
		t.Errorf("the file grew from %d to %d bytes: freed clusters were not reused", full, size)
	}
	if err := img.WriteZeroes(4<<20, 1<<20, disk.ZeroNoUnmap); err != nil {
		t.Fatal(err)
	}
	e, err := img.Map(4<<20, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	if want := disk.StatusZero | disk.StatusAllocated; e.Status&want != want || e.HostOffset < 0 {
		t.Errorf("after WriteZeroes(NoUnmap) the range maps as %+v, want allocated zeros", e)
	}
	if err := img.WriteZeroes(5<<20, 1<<20, 0); err != nil {
		t.Fatal(err)
	}
	if e, err = img.Map(5<<20, 1<<20); err != nil || e.Status&disk.StatusZero == 0 {
		t.Errorf("after WriteZeroes the range maps as %+v, %v, want zeros", e, err)
	}
	model := make([]byte, 16<<20)
	copy(model[6<<20:8<<20], data)
	copy(model[8<<20:], data[:4<<20])
	finishWrites(t, img, p, model)
}
