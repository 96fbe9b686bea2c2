package qcow2

import (
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/internal/qemutest"
)

// The stress test drives an image as a guest with many requests in
// flight drives it: writers that each own some regions of the disk mix
// allocating writes (growing L2 tables, refcount blocks and, with
// 512-byte clusters, the refcount table), writes in place, discards and
// write-zeroes there, a flusher flushes, and readers read anywhere. Every
// 8-byte word written holds its own guest offset (and a version), so a
// reader can tell what it may legally see: zeros, or a word written at
// that very offset, old or new; never another range's bytes (a host
// cluster freed by a discard and reused by another range's write while
// a read still used it). The writers' model of the serialised result
// must then equal the image as qemu-img reads it, and qemu-img check must
// find it clean.

// stressTag is the word written at guest offset off (a multiple of 8) by
// the version-th write: never zero, and carrying off.
func stressTag(off int64, version uint64) uint64 {
	return uint64(off>>3)<<20 | (version%(1<<20-1) + 1)
}

// stressFill fills p (to be written at guest offset off, both multiples
// of 8) with the tags of version.
func stressFill(p []byte, off int64, version uint64) {
	for i := 0; i+8 <= len(p); i += 8 {
		binary.LittleEndian.PutUint64(p[i:], stressTag(off+int64(i), version))
	}
}

// stressCheck returns an error if a word of p, read at guest offset off,
// is neither zero nor a tag of its own offset.
func stressCheck(p []byte, off int64) error {
	for i := 0; i+8 <= len(p); i += 8 {
		w := binary.LittleEndian.Uint64(p[i:])
		if w != 0 && w>>20 != uint64(off+int64(i))>>3 {
			return fmt.Errorf("read at %d: word at guest offset %d holds %#x, written for guest offset %d",
				off, off+int64(i), w, int64(w>>20)<<3)
		}
	}
	return nil
}

type stressCase struct {
	name     string
	opts     string // qemu-img create -o
	size     int64
	region   int64 // bytes a writer owns at a time
	snapshot bool  // take an internal snapshot of the first content
}

func TestStress(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	cases := []stressCase{
		{"cs512", "cluster_size=512", 32 << 20, 8 << 10, false},
		{"cs512-lazy", "cluster_size=512,lazy_refcounts=on", 32 << 20, 8 << 10, false},
		{"cs512-snapshot", "cluster_size=512", 16 << 20, 8 << 10, true},
		{"cs64k", "cluster_size=64k", 2 << 30, 256 << 10, false},
		{"cs64k-lazy-snapshot", "cluster_size=64k,lazy_refcounts=on", 2 << 30, 256 << 10, true},
		{"cs64k-extended-l2", "cluster_size=64k,extended_l2=on", 2 << 30, 256 << 10, false},
	}
	ops := 1500
	if testing.Short() {
		ops = 300
	}
	if s := os.Getenv("IMGLOOP_STRESS_OPS"); s != "" {
		ops, _ = strconv.Atoi(s)
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			runStress(t, c, uint64(i+1), ops)
		})
	}
}

func runStress(t *testing.T, c stressCase, seed uint64, ops int) {
	p := filepath.Join(t.TempDir(), "img.qcow2")
	qemutest.Create(t, p, "qcow2", c.opts, strconv.FormatInt(c.size, 10))
	const writers, readers = 4, 3
	regions := int(min(c.size/c.region, 256)) // regions in play, spread over the disk
	stride := c.size / int64(regions) / c.region * c.region
	regionAt := func(i int) int64 { return int64(i) * stride }
	// The model holds the regions in play only (the rest of the disk
	// stays zero): region i at i*c.region.
	model := make([]byte, int64(regions)*c.region)
	at := func(off int64) int64 { return off/stride*c.region + off%stride }

	// The first content: every other region written whole.
	img := openRW(t, p)
	buf := make([]byte, c.region)
	for i := 0; i < regions; i += 2 {
		stressFill(buf, regionAt(i), 0)
		if _, err := img.WriteAt(buf, regionAt(i)); err != nil {
			t.Fatal(err)
		}
		copy(model[at(regionAt(i)):], buf)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Dir(p)
	writeModel := func(name string) string {
		t.Helper()
		mp := filepath.Join(dir, name)
		f, err := os.Create(mp)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if err := f.Truncate(c.size); err != nil {
			t.Fatal(err)
		}
		for i := 0; i < regions; i++ {
			if _, err := f.WriteAt(model[int64(i)*c.region:int64(i+1)*c.region], regionAt(i)); err != nil {
				t.Fatal(err)
			}
		}
		return mp
	}
	var first string
	if c.snapshot {
		qemutest.Img(t, "snapshot", "-c", "s1", p)
		first = writeModel("first.raw")
	}

	img = openRW(t, p)

	var version atomic.Uint64
	var wg sync.WaitGroup
	errs := make(chan error, writers+readers+1)
	done := make(chan struct{})
	report := func(err error) {
		select {
		case errs <- err:
		default:
		}
	}
	for g := 0; g < writers; g++ {
		wg.Go(func() {
			r := rand.New(rand.NewPCG(seed, uint64(g)))
			wbuf := make([]byte, c.region)
			for n := 0; n < ops; n++ {
				ri := g + writers*r.IntN((regions+writers-1-g)/writers) // a region of writer g
				base := regionAt(ri)
				off := base + r.Int64N(c.region/512)*512
				k := min(base+c.region-off, 512*(1+r.Int64N(c.region/512)))
				var err error
				switch op := r.IntN(100); {
				case op < 50:
					v := version.Add(1)
					stressFill(wbuf[:k], off, v)
					_, err = img.WriteAt(wbuf[:k], off)
					copy(model[at(off):at(off)+k], wbuf[:k])
				case op < 70:
					err = img.Discard(off, k)
					if a, b := img.wholeUnits(off, k); a < b {
						b = min(b, base+c.region)
						clear(model[at(a) : at(a)+b-a])
					}
				case op < 95:
					var flags disk.ZeroFlags
					if r.IntN(2) == 0 {
						flags = disk.ZeroNoUnmap
					}
					err = img.WriteZeroes(off, k, flags)
					clear(model[at(off) : at(off)+k])
				default:
					err = img.Flush()
				}
				if err != nil {
					report(fmt.Errorf("writer %d op %d at %d (%d bytes): %w", g, n, off, k, err))
					return
				}
			}
		})
	}
	var rwg sync.WaitGroup
	for g := 0; g < readers; g++ {
		rwg.Go(func() {
			r := rand.New(rand.NewPCG(seed, 100+uint64(g)))
			rbuf := make([]byte, 2*c.region)
			for {
				select {
				case <-done:
					return
				default:
				}
				// Reads meet writes and discards of the same clusters:
				// most start inside a region in play.
				off := regionAt(r.IntN(regions)) + r.Int64N(c.region/512)*512
				if r.IntN(8) == 0 {
					off = r.Int64N(c.size/512) * 512
				}
				k := min(c.size-off, 512*(1+r.Int64N(2*c.region/512)))
				if _, err := img.ReadAt(rbuf[:k], off); err != nil {
					report(fmt.Errorf("reader %d: ReadAt(%d at %d): %w", g, k, off, err))
					return
				}
				if err := stressCheck(rbuf[:k], off); err != nil {
					report(fmt.Errorf("reader %d: %w", g, err))
					return
				}
			}
		})
	}
	rwg.Go(func() {
		for {
			select {
			case <-done:
				return
			case <-time.After(2 * time.Millisecond):
			}
			if err := img.Flush(); err != nil {
				report(fmt.Errorf("flusher: %w", err))
				return
			}
		}
	})
	wg.Wait()
	close(done)
	rwg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if t.Failed() {
		img.Close()
		return
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	res := qemuCheck(t, p)
	if res.Leaks != 0 {
		t.Errorf("qemu-img check: %d leaked clusters", res.Leaks)
	}
	if out, err := qemutest.Try("qemu-img", "compare", "-f", "qcow2", "-F", "raw", p, writeModel("model.raw")); err != nil {
		t.Fatalf("the image differs from the model: %v\n%s", err, out)
	}
	if first != "" {
		snap := filepath.Join(dir, "snap.raw")
		qemutest.Img(t, "convert", "-l", "s1", "-O", "raw", p, snap)
		if out, err := qemutest.Try("qemu-img", "compare", "-f", "raw", "-F", "raw", snap, first); err != nil {
			t.Fatalf("the snapshot changed: %v\n%s", err, out)
		}
	}
}
