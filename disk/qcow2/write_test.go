package qcow2

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/disk/disktest"
	"github.com/imgloop/imgloop/disk/hostfile"
	"github.com/imgloop/imgloop/disk/hostfile/hostfiletest"
	"github.com/imgloop/imgloop/internal/qemutest"
)

// openRW opens path read-write with this package's Open. The caller
// closes the image.
func openRW(t testing.TB, path string) *Image {
	t.Helper()
	f, err := hostfile.Open(path, false)
	if err != nil {
		t.Fatal(err)
	}
	img, err := Open(f, disk.OpenOptions{})
	if err != nil {
		f.Close()
		t.Fatalf("Open(%s): %v", path, err)
	}
	return img
}

// checkResult is the part of `qemu-img check --output=json` the tests
// look at.
type checkResult struct {
	CheckErrors int `json:"check-errors"`
	Corruptions int `json:"corruptions"`
	Leaks       int `json:"leaks"`
}

// qemuCheck runs `qemu-img check` on path and returns its findings.
func qemuCheck(t testing.TB, path string) checkResult {
	t.Helper()
	cmd := exec.Command("qemu-img", "check", "--output=json", "-f", "qcow2", path)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var r checkResult
	if jerr := json.Unmarshal(stdout.Bytes(), &r); jerr != nil {
		t.Fatalf("qemu-img check %s: %v (%v)\n%s%s", path, jerr, err, stdout.String(), stderr.String())
	}
	if r.CheckErrors != 0 || r.Corruptions != 0 {
		// Get the human-readable report for the failure message.
		out, _ := exec.Command("qemu-img", "check", "-f", "qcow2", path).CombinedOutput()
		t.Errorf("qemu-img check %s: %+v\n%s", path, r, out)
	}
	return r
}

// randomWrites applies n seeded random writes (1 byte to 3 clusters, at
// random offsets) to img and model, reading back a random range after
// each and flushing now and then.
func randomWrites(t *testing.T, img *Image, model []byte, seed uint64, n int) {
	t.Helper()
	r := rand.New(rand.NewPCG(seed, 7))
	cs := int(img.geo.clusterSize())
	size := len(model)
	for i := 0; i < n; i++ {
		k := 1 + r.IntN(min(3*cs, size))
		var off int
		switch r.IntN(3) {
		case 0: // cluster aligned
			off = r.IntN(size/cs) * cs
		default:
			off = r.IntN(size)
		}
		k = min(k, size-off)
		data := make([]byte, k)
		for j := range data {
			data[j] = byte(r.Uint32())
		}
		if r.IntN(5) == 0 {
			clear(data[:k/2])
		}
		if m, err := img.WriteAt(data, int64(off)); err != nil || m != k {
			t.Fatalf("seed %d op %d: WriteAt(%d bytes at %d) = %d, %v", seed, i, k, off, m, err)
		}
		copy(model[off:], data)
		if r.IntN(10) == 0 {
			if err := img.Flush(); err != nil {
				t.Fatalf("Flush: %v", err)
			}
		}
		roff := r.IntN(size)
		rk := min(1+r.IntN(3*cs), size-roff)
		got := make([]byte, rk)
		if _, err := img.ReadAt(got, int64(roff)); err != nil {
			t.Fatalf("seed %d op %d: ReadAt(%d at %d): %v", seed, i, rk, roff, err)
		}
		if d := qemutest.FirstDiff(got, model[roff:roff+rk]); d >= 0 {
			t.Fatalf("seed %d op %d: read at %d differs from the model at %d", seed, i, roff, int64(roff)+d)
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

// finishWrites closes img and checks path with qemu-img: no corruption,
// no leak, and the content qemu reads equals model.
func finishWrites(t *testing.T, img *Image, path string, model []byte) {
	t.Helper()
	if err := img.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if r := qemuCheck(t, path); r.Leaks != 0 {
		t.Errorf("qemu-img check: %d leaked clusters", r.Leaks)
	}
	if d := qemutest.FirstDiff(qemutest.RawBytes(t, path), model); d >= 0 {
		t.Errorf("qemu-img reads the image differently from the model at %d", d)
	}
}

func TestWriteRandom(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	type tc struct {
		name, opts, size string
		backing          bool
	}
	var cases []tc
	for _, compat := range []string{"0.10", "1.1"} {
		for _, cs := range []string{"512", "4k", "64k"} {
			size := "1M"
			if cs == "64k" {
				size = "6M"
			}
			for _, b := range []bool{false, true} {
				name := fmt.Sprintf("compat%s/cs%s/backing=%v", compat, cs, b)
				cases = append(cases, tc{name, "compat=" + compat + ",cluster_size=" + cs, size, b})
			}
		}
	}
	cases = append(cases,
		tc{"refcount1", "refcount_bits=1,cluster_size=4k", "1M", true},
		tc{"refcount64", "refcount_bits=64,cluster_size=512", "1M", false},
		tc{"unaligned-size", "cluster_size=4k", "1000000", true},
		tc{"lazy-refcounts", "lazy_refcounts=on,cluster_size=4k", "1M", true},
	)
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			p := filepath.Join(dir, "img.qcow2")
			var extra []string
			if c.backing {
				base := filepath.Join(dir, "base.qcow2")
				qemutest.Create(t, base, "qcow2", c.opts, c.size)
				qemutest.IO(t, base, "qcow2", "write -P 0x5a 0 300k", "write -P 0x6b 600k 100k")
				extra = []string{"-b", "base.qcow2", "-F", "qcow2"}
			}
			qemutest.Create(t, p, "qcow2", c.opts, c.size, extra...)
			if !c.backing {
				qemutest.IO(t, p, "qcow2", "write -P 0x11 64k 64k")
			}
			model := qemutest.RawBytes(t, p)
			img := openRW(t, p)
			randomWrites(t, img, model, uint64(i+1), 150)
			finishWrites(t, img, p, model)
		})
	}
}

// TestWriteRandomOps runs disktest's random operations (writes of every
// shape, zeroes, flushes, reads) over a writable image.
func TestWriteRandomOps(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	dir := t.TempDir()
	p := filepath.Join(dir, "img.qcow2")
	qemutest.Create(t, p, "qcow2", "cluster_size=4k", "2M")
	img := openRW(t, p)
	model := disktest.NewModel(img.Size())
	disktest.RandomOps(t, 99, img, model, 300)
	finishWrites(t, img, p, model.Bytes())
}

func TestWriteCompressed(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	for _, cs := range []string{"4k", "64k"} {
		t.Run(cs, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			src := filepath.Join(dir, "src.raw")
			if err := os.WriteFile(src, qemutest.Compressible(5, 1<<20), 0o644); err != nil {
				t.Fatal(err)
			}
			p := filepath.Join(dir, "z.qcow2")
			qemutest.Img(t, "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size="+cs, src, p)
			model := qemutest.RawBytes(t, p)
			img := openRW(t, p)
			randomWrites(t, img, model, 11, 100)
			finishWrites(t, img, p, model)
		})
	}
}

func TestWriteZeroClusters(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	qemutest.Create(t, base, "qcow2", "cluster_size=4k", "1M")
	qemutest.IO(t, base, "qcow2", "write -P 0x77 0 1M")
	p := filepath.Join(dir, "img.qcow2")
	qemutest.Create(t, p, "qcow2", "cluster_size=4k", "1M", "-b", "base.qcow2", "-F", "qcow2")
	// Preallocated zero clusters (allocated, then zeroed without
	// unmapping) and plain zero clusters over the backing data.
	qemutest.IO(t, p, "qcow2", "write -P 0x11 0 128k", "write -z 0 64k", "write -z 256k 128k", "write -z -u 96k 16k")
	model := qemutest.RawBytes(t, p)
	img := openRW(t, p)
	// Partial writes into each kind of zero cluster first.
	for _, off := range []int64{100, 64<<10 + 4095, 96<<10 + 1, 256<<10 + 2048, 300 << 10} {
		data := bytes.Repeat([]byte{0xc3}, 3000)
		if _, err := img.WriteAt(data, off); err != nil {
			t.Fatalf("WriteAt(%d): %v", off, err)
		}
		copy(model[off:], data)
	}
	randomWrites(t, img, model, 21, 100)
	finishWrites(t, img, p, model)
}

// syncHookFile is a MemFile that calls onSync before each Sync.
type syncHookFile struct {
	*hostfiletest.MemFile
	onSync func()
}

func (f *syncHookFile) Sync() error {
	if f.onSync != nil {
		f.onSync()
	}
	return f.MemFile.Sync()
}

// TestWriteCrash crashes the image file at every sync of a run of writes
// (keeping a random subset of the writes since the previous sync, as a
// disk may) and after every Flush: qemu-img check must find no corruption
// (leaks are allowed), and whatever was flushed, and not written since,
// must read back.
func TestWriteCrash(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	for _, c := range []struct {
		name, opts, size string
		prefill          int // bytes written (and flushed) before crashing starts
	}{
		{"v3-512", "cluster_size=512", "256k", 0},
		{"v2-4k", "compat=0.10,cluster_size=4k", "1M", 0},
		// 8 MiB of 512-byte clusters fill qemu's one-cluster refcount
		// table: the crashes hit its growth.
		{"v3-512-grow", "cluster_size=512", "9M", 8<<20 - 2<<10},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			base := filepath.Join(dir, "base.qcow2")
			qemutest.Create(t, base, "qcow2", c.opts, c.size)
			qemutest.IO(t, base, "qcow2", "write -P 0x5a 0 64k")
			p := filepath.Join(dir, "img.qcow2")
			qemutest.Create(t, p, "qcow2", c.opts, c.size, "-b", "base.qcow2", "-F", "qcow2")
			content, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			model := qemutest.RawBytes(t, p)
			flushed := bytes.Clone(model)       // content as of the last Flush
			touched := make([]bool, len(model)) // written since the last Flush
			mem := &syncHookFile{MemFile: hostfiletest.NewMemFile(p, content)}
			r := rand.New(rand.NewPCG(3, 4))
			crashes := 0
			verify := func(crashed *hostfiletest.MemFile, what string) {
				t.Helper()
				crashes++
				cp := filepath.Join(dir, "crash.qcow2")
				if err := os.WriteFile(cp, crashed.Bytes(), 0o644); err != nil {
					t.Fatal(err)
				}
				qemuCheck(t, cp)
				img, err := Open(crashed, disk.OpenOptions{ReadOnly: true})
				if err != nil {
					t.Fatalf("%s: reopening the crashed image: %v", what, err)
				}
				defer img.Close()
				got := make([]byte, len(model))
				if _, err := img.ReadAt(got, 0); err != nil {
					t.Fatalf("%s: reading the crashed image: %v", what, err)
				}
				for i := range got {
					if !touched[i] && got[i] != flushed[i] {
						t.Fatalf("%s: byte %d reads %#x after the crash, %#x was flushed", what, i, got[i], flushed[i])
					}
				}
			}
			onSync := func() {
				n := mem.Pending()
				keep := make([]bool, n)
				for i := range keep {
					keep[i] = r.IntN(2) == 0
				}
				verify(mem.CrashKeeping(func(i int) bool { return keep[i] }), "crash at a sync keeping random writes")
				if n > 1 {
					// The last write, which depends most on the others.
					verify(mem.CrashKeeping(func(i int) bool { return i == n-1 }), "crash at a sync keeping the last write")
				}
			}
			defer func() { mem.onSync = nil }()
			img, err := Open(mem, disk.OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			cs := int(img.geo.clusterSize())
			if c.prefill > 0 {
				// Fill the disk from the start until the file nearly
				// reaches prefill bytes.
				fill := make([]byte, 64<<10)
				for off := 0; img.w.alloc.end < int64(c.prefill); off += len(fill) {
					if img.w.alloc.end > int64(c.prefill)-64<<10 {
						fill = fill[:cs] // come close in small steps
					}
					for j := range fill {
						fill[j] = byte(off+j*7) | 1
					}
					if _, err := img.WriteAt(fill, int64(off)); err != nil {
						t.Fatal(err)
					}
					copy(model[off:], fill)
				}
				if err := img.Flush(); err != nil {
					t.Fatal(err)
				}
				copy(flushed, model)
			}
			tableAt := img.w.alloc.t.offset
			defer func() {
				moved := img.w.alloc.t.offset != tableAt
				t.Logf("refcount table at %#x, then %#x; file ends at %#x", tableAt, img.w.alloc.t.offset, img.w.alloc.end)
				if c.prefill > 0 && !moved {
					t.Errorf("the refcount table did not move during the crash sweep")
				}
			}()
			mem.onSync = onSync
			writes := 25
			if c.prefill > 0 {
				writes = 10 // each crash costs a copy of the 8 MiB file
			}
			for i := 0; i < writes; i++ {
				k := 1 + r.IntN(3*cs)
				off := r.IntN(len(model) - k)
				data := make([]byte, k)
				for j := range data {
					data[j] = byte(r.Uint32()) | 1
				}
				for j := off; j < off+k; j++ {
					touched[j] = true // a crash during the write may show it
				}
				if _, err := img.WriteAt(data, int64(off)); err != nil {
					t.Fatalf("WriteAt: %v", err)
				}
				copy(model[off:], data)
				if r.IntN(3) > 0 {
					if err := img.Flush(); err != nil {
						t.Fatal(err)
					}
					copy(flushed, model)
					clear(touched)
					verify(mem.Crash(), fmt.Sprintf("crash after flush %d", i))
				}
			}
			t.Logf("%d crashes checked", crashes)
		})
	}
}

// TestWriteParallel runs writers over interleaved pieces of the same
// clusters (so that allocating and in-place writes meet) while readers
// read, then checks the result with qemu-img.
func TestWriteParallel(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	qemutest.Create(t, base, "qcow2", "cluster_size=4k", "2M")
	qemutest.IO(t, base, "qcow2", "write -P 0x5a 0 1M")
	p := filepath.Join(dir, "img.qcow2")
	qemutest.Create(t, p, "qcow2", "cluster_size=4k", "2M", "-b", "base.qcow2", "-F", "qcow2")
	model := qemutest.RawBytes(t, p)
	img := openRW(t, p)
	const writers, piece = 4, 1000
	pieces := len(model) / piece
	errs := make(chan error, writers+2)
	stop := make(chan struct{})
	for g := 0; g < writers; g++ {
		go func(g int) {
			r := rand.New(rand.NewPCG(uint64(g), 1))
			buf := make([]byte, piece)
			// Each writer owns pieces i with i%writers == g, written in a
			// random order, each twice.
			var mine []int
			for i := g; i < pieces; i += writers {
				mine = append(mine, i, i)
			}
			r.Shuffle(len(mine), func(a, b int) { mine[a], mine[b] = mine[b], mine[a] })
			for _, i := range mine {
				for j := range buf {
					buf[j] = byte(r.Uint32())
				}
				if _, err := img.WriteAt(buf, int64(i*piece)); err != nil {
					errs <- err
					return
				}
				copy(model[i*piece:], buf) // pieces are disjoint between writers
			}
			errs <- nil
		}(g)
	}
	for g := 0; g < 2; g++ {
		go func(g int) {
			r := rand.New(rand.NewPCG(uint64(g), 2))
			buf := make([]byte, 3*4096)
			for {
				select {
				case <-stop:
					errs <- nil
					return
				default:
				}
				off := r.IntN(len(model) - len(buf))
				if _, err := img.ReadAt(buf, int64(off)); err != nil {
					errs <- err
					return
				}
			}
		}(g)
	}
	for g := 0; g < writers; g++ {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	close(stop)
	for g := 0; g < 2; g++ {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	got := make([]byte, len(model))
	if _, err := img.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if d := qemutest.FirstDiff(got, model); d >= 0 {
		t.Fatalf("read differs from the model at %d", d)
	}
	finishWrites(t, img, p, model)
}

// TestWriteGrowRefcountTable writes more host clusters than the refcount
// table qemu-img created can count, so that it moves to a larger place:
// the header (as info --header prints it) names a larger table elsewhere,
// large enough for the file, and qemu-img check finds it clean, with the
// old table's cluster freed.
func TestWriteGrowRefcountTable(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	p := filepath.Join(t.TempDir(), "img.qcow2")
	qemutest.Create(t, p, "qcow2", "cluster_size=512", "20M")
	// 512-byte clusters, 16-bit refcounts: one table cluster points at 64
	// blocks of 256 refcounts, 8 MiB of file: 20 MiB of data outgrow it.
	before := headerFields(t, p)
	if before["refcount_table_clusters"] != "1" {
		t.Fatalf("qemu-img made a refcount table of %s clusters, want 1", before["refcount_table_clusters"])
	}
	model := make([]byte, 20<<20)
	img := openRW(t, p)
	r := rand.New(rand.NewPCG(8, 8))
	buf := make([]byte, 256<<10)
	for off := 0; off < len(model); off += len(buf) {
		for j := range buf {
			buf[j] = byte(r.Uint32())
		}
		if _, err := img.WriteAt(buf, int64(off)); err != nil {
			t.Fatalf("WriteAt(%d): %v", off, err)
		}
		copy(model[off:], buf)
	}
	randomWrites(t, img, model, 9, 50)
	finishWrites(t, img, p, model)
	after := headerFields(t, p)
	clusters, err := strconv.ParseUint(after["refcount_table_clusters"], 10, 32)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	// Each table cluster covers 64 blocks of 256 clusters of 512 bytes.
	if covered := int64(clusters) * 64 * 256 * 512; clusters <= 1 || covered < fi.Size() {
		t.Errorf("refcount_table_clusters %d covers %d bytes, file of %d", clusters, covered, fi.Size())
	}
	if after["refcount_table_offset"] == before["refcount_table_offset"] {
		t.Errorf("refcount table still at %s", after["refcount_table_offset"])
	}
	t.Logf("refcount table: %s cluster at %s -> %s clusters at %s", before["refcount_table_clusters"],
		before["refcount_table_offset"], after["refcount_table_clusters"], after["refcount_table_offset"])
}

// headerFields returns the header fields of the image at path by name,
// as imgloop info --header prints them.
func headerFields(t *testing.T, path string) map[string]string {
	t.Helper()
	h, err := parseBytes(readFile(t, path))
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]string{}
	for _, f := range h.Fields() {
		m[f.Name] = f.Value
	}
	return m
}

// TestWriteHostileEntry points an L2 entry at the L1 table: writes must
// fail with ErrCorrupt and leave the table alone.
func TestWriteHostileEntry(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	for _, copied := range []bool{true, false} {
		p := filepath.Join(t.TempDir(), "img.qcow2")
		qemutest.Create(t, p, "qcow2", "cluster_size=4k", "1M")
		qemutest.IO(t, p, "qcow2", "write -P 0x11 0 4k")
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		be := func(off uint64) uint64 {
			var v uint64
			for _, c := range b[off : off+8] {
				v = v<<8 | uint64(c)
			}
			return v
		}
		l1 := be(40)
		l2 := be(l1) & offsetMask
		e := l1
		if copied {
			e |= entryCopied
		}
		for i := 0; i < 8; i++ {
			b[l2+uint64(i)] = byte(e >> (56 - 8*i))
		}
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		img := openRW(t, p)
		if _, err := img.WriteAt([]byte{1, 2, 3}, 10); !errors.Is(err, disk.ErrCorrupt) {
			t.Errorf("copied=%v: WriteAt over the L1 table = %v, want ErrCorrupt", copied, err)
		}
		img.Close()
		after, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		// Only the corrupt bit of the header's incompatible features
		// may have changed.
		if after[79]&2 == 0 {
			t.Errorf("copied=%v: the image is not marked corrupt", copied)
		}
		after[79] &^= 2
		if !bytes.Equal(after[:len(b)], b) {
			t.Errorf("copied=%v: the failed write changed the file", copied)
		}
		again := openRW(t, p)
		if _, err := again.WriteAt([]byte{1}, 100<<10); !errors.Is(err, disk.ErrNotSupported) {
			t.Errorf("copied=%v: writing an image marked corrupt = %v, want ErrNotSupported", copied, err)
		}
		again.Close()
	}
}

// BenchmarkWrite measures sequential 64 KiB writes into a 64 KiB-cluster
// image: "alloc" into a fresh image (every write allocates), "inplace"
// over clusters already allocated.
func BenchmarkWrite(b *testing.B) {
	qemutest.Require(b, "qemu-img")
	const size = 64 << 20
	for _, mode := range []string{"alloc", "inplace"} {
		b.Run(mode, func(b *testing.B) {
			p := filepath.Join(b.TempDir(), "img.qcow2")
			qemutest.Create(b, p, "qcow2", "", fmt.Sprint(size))
			img := openRW(b, p)
			defer func() { img.Close() }()
			buf := bytes.Repeat([]byte{0xa5}, 64<<10)
			if mode == "inplace" {
				for off := int64(0); off < size; off += int64(len(buf)) {
					if _, err := img.WriteAt(buf, off); err != nil {
						b.Fatal(err)
					}
				}
			}
			b.SetBytes(int64(len(buf)))
			b.ResetTimer()
			off := int64(0)
			for i := 0; i < b.N; i++ {
				if off+int64(len(buf)) > size {
					if mode == "alloc" {
						b.StopTimer()
						img.Close()
						qemutest.Create(b, p, "qcow2", "", fmt.Sprint(size))
						img = openRW(b, p)
						b.StartTimer()
					}
					off = 0
				}
				if _, err := img.WriteAt(buf, off); err != nil {
					b.Fatal(err)
				}
				off += int64(len(buf))
			}
		})
	}
}

// TestWriteFaults fails every host write (or sync) from the i-th on, for
// each i a workload reaches: the failing write and every later one must
// return an error, and neither the file as left nor what a crash would
// leave may be corrupt (leaks are allowed).
func TestWriteFaults(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	p := filepath.Join(dir, "img.qcow2")
	qemutest.Create(t, p, "qcow2", "cluster_size=512", "256k")
	qemutest.IO(t, p, "qcow2", "write -P 0x11 0 4k")
	content, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	for _, op := range []hostfiletest.Op{hostfiletest.OpWrite, hostfiletest.OpSync} {
		for i := int64(0); ; i++ {
			mem := hostfiletest.NewMemFile(p, content)
			ff := hostfiletest.NewFaulty(mem)
			img, err := Open(ff, disk.OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			ff.FailAfter(op, i, nil)
			r := rand.New(rand.NewPCG(uint64(i), 5))
			failed := false
			for j := 0; j < 12; j++ {
				data := bytes.Repeat([]byte{byte(j + 1)}, 1+r.IntN(1500))
				_, err := img.WriteAt(data, int64(r.IntN(256<<10-len(data))))
				if failed && err == nil {
					t.Fatalf("%v fault %d: write %d succeeded after a failed one", op, i, j)
				}
				if err != nil {
					failed = true
				}
			}
			img.Close()
			for what, b := range map[string][]byte{"as left": mem.Bytes(), "after a crash": mem.Crash().Bytes()} {
				cp := filepath.Join(dir, "fault.qcow2")
				if err := os.WriteFile(cp, b, 0o644); err != nil {
					t.Fatal(err)
				}
				if r := qemuCheck(t, cp); r.Corruptions != 0 {
					t.Fatalf("%v fault %d: image %s is corrupt", op, i, what)
				}
			}
			if !failed {
				break // the workload no longer reaches fault i
			}
		}
	}
}

// TestWriteConformance runs the disktest conformance suite, write tests
// included, over writable images of several shapes; after each subtest
// closes its image, qemu-img check must find it clean.
func TestWriteConformance(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	big := func(opts string, snapshot bool) func(t *testing.T, dir string) string {
		return func(t *testing.T, dir string) string {
			p := filepath.Join(dir, "img.qcow2")
			qemutest.Create(t, p, "qcow2", opts, "24M")
			qemutest.IO(t, p, "qcow2", "write -P 0x11 0 3M", "write -z 5M 1M", "write -P 0x22 9M 2M")
			if snapshot {
				qemutest.Img(t, "snapshot", "-c", "s1", p)
			}
			return p
		}
	}
	// The 512-byte-cluster shapes are large enough that the parallel
	// cases grow L2 tables, refcount blocks and the refcount table.
	parallel := disktest.Options{ParallelSize: 16 << 20}
	shapes := []struct {
		name  string
		build func(t *testing.T, dir string) string
		opts  disktest.Options
	}{
		{"cs512", big("cluster_size=512", false), parallel},
		{"cs512-lazy", big("cluster_size=512,lazy_refcounts=on", false), parallel},
		{"cs512-snapshot", big("cluster_size=512", true), parallel},
		{"v3-4k", func(t *testing.T, dir string) string {
			p := filepath.Join(dir, "img.qcow2")
			qemutest.Create(t, p, "qcow2", "cluster_size=4k", "2M")
			qemutest.IO(t, p, "qcow2", "write -P 0x11 0 100000", "write -z 200000 50000", "write -P 0x22 1000000 300000")
			return p
		}, disktest.Options{}},
		{"v2-64k-backing", func(t *testing.T, dir string) string {
			base := filepath.Join(dir, "base.qcow2")
			qemutest.Create(t, base, "qcow2", "compat=0.10", "2M")
			qemutest.IO(t, base, "qcow2", "write -P 0x33 0 1500000")
			p := filepath.Join(dir, "img.qcow2")
			qemutest.Create(t, p, "qcow2", "compat=0.10", "2M", "-b", "base.qcow2", "-F", "qcow2")
			qemutest.IO(t, p, "qcow2", "write -P 0x44 70000 10000")
			return p
		}, disktest.Options{DiscardKeepsData: true, SlowZero: true}},
		{"compressed", func(t *testing.T, dir string) string {
			src := filepath.Join(dir, "src.raw")
			if err := os.WriteFile(src, qemutest.Compressible(3, 256<<10), 0o644); err != nil {
				t.Fatal(err)
			}
			p := filepath.Join(dir, "z.qcow2")
			qemutest.Img(t, "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=8k", src, p)
			return p
		}, disktest.Options{}},
	}
	for _, shape := range shapes {
		t.Run(shape.name, func(t *testing.T) {
			t.Parallel()
			model := qemutest.RawBytes(t, shape.build(t, t.TempDir()))
			opts := shape.opts
			opts.Model = model
			disktest.Run(t, func(t *testing.T) disk.Image {
				p := shape.build(t, t.TempDir())
				img, err := disk.Open(p, disk.OpenOptions{Format: "qcow2"})
				if err != nil {
					t.Fatalf("disk.Open(%s): %v", p, err)
				}
				t.Cleanup(func() {
					if r := qemuCheck(t, p); r.Leaks != 0 {
						t.Errorf("qemu-img check: %d leaked clusters", r.Leaks)
					}
				})
				return img
			}, opts)
		})
	}
}

// TestWriteReadersSeeOldOrNew has readers check, while writers allocate
// clusters, that each cluster reads whole as its backing data or whole as
// what was written: never a mix, never zeros.
func TestWriteReadersSeeOldOrNew(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	const cs, size = 4096, 4 << 20
	base := filepath.Join(dir, "base.qcow2")
	qemutest.Create(t, base, "qcow2", "cluster_size=4k", fmt.Sprint(size))
	qemutest.IO(t, base, "qcow2", fmt.Sprintf("write -P 0x5a 0 %d", size))
	p := filepath.Join(dir, "img.qcow2")
	qemutest.Create(t, p, "qcow2", "cluster_size=4k", fmt.Sprint(size), "-b", "base.qcow2", "-F", "qcow2")
	img := openRW(t, p)
	value := func(i int) byte { return 0xa0 + byte(i%64) }
	const writers, readers = 3, 3
	errs := make(chan error, writers+readers)
	stop := make(chan struct{})
	for g := 0; g < writers; g++ {
		go func(g int) {
			r := rand.New(rand.NewPCG(uint64(g), 3))
			var mine []int
			for i := g; i < size/cs; i += writers {
				mine = append(mine, i)
			}
			r.Shuffle(len(mine), func(a, b int) { mine[a], mine[b] = mine[b], mine[a] })
			for _, i := range mine {
				if _, err := img.WriteAt(bytes.Repeat([]byte{value(i)}, cs), int64(i*cs)); err != nil {
					errs <- err
					return
				}
			}
			errs <- nil
		}(g)
	}
	for g := 0; g < readers; g++ {
		go func(g int) {
			r := rand.New(rand.NewPCG(uint64(g), 4))
			buf := make([]byte, cs)
			for {
				select {
				case <-stop:
					errs <- nil
					return
				default:
				}
				i := r.IntN(size / cs)
				if _, err := img.ReadAt(buf, int64(i*cs)); err != nil {
					errs <- err
					return
				}
				if (buf[0] != 0x5a && buf[0] != value(i)) || !bytes.Equal(buf, bytes.Repeat(buf[:1], cs)) {
					errs <- fmt.Errorf("cluster %d reads %#x...%#x, want all %#x or all %#x", i, buf[0], buf[cs-1], 0x5a, value(i))
					return
				}
			}
		}(g)
	}
	for g := 0; g < writers; g++ {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	close(stop)
	for g := 0; g < readers; g++ {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	model := make([]byte, size)
	for i := 0; i < size/cs; i++ {
		copy(model[i*cs:(i+1)*cs], bytes.Repeat([]byte{value(i)}, cs))
	}
	finishWrites(t, img, p, model)
}
