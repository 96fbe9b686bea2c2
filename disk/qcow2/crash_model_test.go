package qcow2_test

// The crash sweeps' shapes, seeded workload and byte model (see crash_test.go).

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/imgloop/imgloop/internal/qemutest"
)

// crashShape is an image layout the sweeps run on.
type crashShape struct {
	name string
	opts string // qemu-img create -o
	size int64  // virtual size in bytes (a multiple of 512)
	// backing: the image gets a qcow2 backing file (made by qemu-img and
	// written by qemu-io) of backingSize bytes.
	backing     bool
	backingSize int64
}

// crashShapes: 64 KiB clusters v3 (over 1 GiB, so several L2 tables, and
// a partial last cluster); 4 KiB clusters v2 (many L2 tables, refcount
// blocks added); 64 KiB clusters over a backing file (copy-on-write of
// partial clusters); lazy refcounts; 512-byte clusters with 64-bit
// refcounts (the refcount table grows within a few MiB).
var crashShapes = []crashShape{
	{name: "v3-64k", opts: "compat=1.1,cluster_size=65536", size: 1<<30 + 1<<20 + 3584},
	{name: "v2-4k", opts: "compat=0.10,cluster_size=4096", size: 64 << 20},
	{name: "backing-64k", opts: "compat=1.1,cluster_size=65536", size: 64 << 20, backing: true, backingSize: 40 << 20},
	{name: "lazy-64k", opts: "compat=1.1,cluster_size=65536,lazy_refcounts=on", size: 256 << 20},
	{name: "v3-512-rc64", opts: "compat=1.1,cluster_size=512,refcount_bits=64", size: 16 << 20},
}

// crashImage is a shape made on disk, ready to be loaded into MemFiles.
type crashImage struct {
	shape   crashShape
	path    string // absolute path of the image (the MemFile's name)
	initial []byte // its bytes as qemu-img made them
	backing []byte // the backing file's virtual disk, nil without one
	cluster int64
}

// makeCrashImage creates the image of shape s in a temporary folder.
func makeCrashImage(t *testing.T, s crashShape) *crashImage {
	t.Helper()
	qemutest.Require(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	ci := &crashImage{shape: s, path: filepath.Join(dir, s.name+".qcow2")}
	var extra []string
	if s.backing {
		bpath := filepath.Join(dir, "base.qcow2")
		qemutest.Create(t, bpath, "qcow2", "cluster_size=65536", strconv.FormatInt(s.backingSize, 10))
		// Data in the first zone (plain and compressed clusters) and
		// in the middle one; the last zone lies past the backing file.
		qemutest.IO(t, bpath, "qcow2",
			"write -P 0x11 0 786432",
			"write -c -P 0x44 851968 65536",
			"write -P 0x22 32505856 262144",
			"write -P 0x33 33292288 98304",
			"write -P 0x55 33816576 4096")
		ci.backing = qemutest.RawBytes(t, bpath)
		extra = []string{"-b", bpath, "-F", "qcow2"}
	}
	qemutest.Create(t, ci.path, "qcow2", s.opts, strconv.FormatInt(s.size, 10), extra...)
	b, err := os.ReadFile(ci.path)
	if err != nil {
		t.Fatal(err)
	}
	ci.initial = b
	ci.cluster = int64(1) << binary.BigEndian.Uint32(b[20:24])
	return ci
}

// baseAt is the content of guest byte off before the workload: the
// backing file's, or zero.
func (ci *crashImage) baseAt(off int64) byte {
	if off < int64(len(ci.backing)) {
		return ci.backing[off]
	}
	return 0
}

// crashZones are the ranges of the virtual disk the workload touches:
// the start, the middle (straddling an L2 table boundary for power-of-two
// table spans) and the end, each zoneLen bytes.
func crashZones(size int64) []crashRange {
	zl := min(int64(1<<20), size/4)
	mid := (size/2)&^(1<<20-1) - zl/2
	return []crashRange{{0, zl}, {mid, mid + zl}, {size - zl, size}}
}

// crashRange is [off, end) of the virtual disk.
type crashRange struct{ off, end int64 }

// crashKind is a workload step's operation.
type crashKind uint8

const (
	stepWrite crashKind = iota
	stepZero
	stepZeroNoUnmap
	stepDiscard
	stepFlush
)

var crashKindNames = [...]string{"write", "write-zeroes", "write-zeroes(no-unmap)", "discard", "flush"}

func (k crashKind) String() string { return crashKindNames[k] }

// crashStep is one operation of a workload.
type crashStep struct {
	kind   crashKind
	off, n int64
	data   []byte // stepWrite's payload
}

func (s *crashStep) String() string {
	if s.kind == stepFlush {
		return "flush"
	}
	return fmt.Sprintf("%s %#x+%#x", s.kind, s.off, s.n)
}

// changes reports whether the step may change the disk's content.
func (s *crashStep) changes() bool { return s.kind != stepFlush }

// crashWorkload returns n seeded steps on a disk of size bytes with the
// given cluster size, inside crashZones(size): writes of every shape
// (sub-sector and unaligned, sector-aligned partial clusters, whole
// clusters, runs crossing clusters), overwrites of earlier writes,
// write-zeroes, discards and flushes.
func crashWorkload(seed uint64, size, cluster int64, n int) []crashStep {
	r := rand.New(rand.NewPCG(seed, 0xc4a54))
	zones := crashZones(size)
	var steps []crashStep
	var writes []int // indexes of write steps, for overwrites
	for len(steps) < n {
		z := zones[r.IntN(len(zones))]
		zl := z.end - z.off
		// span picks a length and an offset inside zone z.
		span := func() (int64, int64) {
			var ln, align int64
			switch r.IntN(5) {
			case 0: // tiny, unaligned
				ln, align = 1+r.Int64N(1500), 1
			case 1: // sector-aligned part of a cluster
				ln, align = 512*(1+r.Int64N(max(1, cluster/512))), 512
			case 2: // whole clusters
				ln, align = cluster*(1+r.Int64N(8)), cluster
			case 3: // unaligned, crossing clusters
				ln, align = cluster+r.Int64N(3*cluster), 1
			default: // up to 256 KiB, sector-aligned
				ln, align = 512*(1+r.Int64N(512)), 512
			}
			ln = min(ln, zl)
			off := z.off + r.Int64N(zl-ln+1)
			off = max(z.off, off&^(align-1))
			return off, ln
		}
		var s crashStep
		switch p := r.IntN(100); {
		case p < 14:
			s.kind = stepFlush
		case p < 26 && len(writes) > 0: // overwrite (part of) an earlier write
			w := steps[writes[r.IntN(len(writes))]]
			lo := r.Int64N(w.n)
			s.kind, s.off, s.n = stepWrite, w.off+lo, 1+r.Int64N(w.n-lo)
		case p < 72:
			s.kind = stepWrite
			s.off, s.n = span()
		case p < 86:
			s.kind = stepZero
			if r.IntN(2) == 0 {
				s.kind = stepZeroNoUnmap
			}
			s.off, s.n = span()
		default:
			s.kind = stepDiscard
			s.off, s.n = span()
		}
		if s.kind == stepWrite {
			s.data = make([]byte, s.n)
			fillRandom(r, s.data)
			writes = append(writes, len(steps))
		}
		steps = append(steps, s)
	}
	return steps
}

// fillRandom fills p with pseudo-random bytes from r.
func fillRandom(r *rand.Rand, p []byte) {
	for i := 0; i < len(p); i += 8 {
		var b [8]byte
		binary.LittleEndian.PutUint64(b[:], r.Uint64())
		copy(p[i:], b[:])
	}
}

// crashMaybe is a range whose bytes may hold what step wrote, on top of
// what the model holds: a write that was not acknowledged, or not flushed,
// or a discard (which may leave the old data, zeros, or the backing
// file's data).
type crashMaybe struct {
	off, end int64
	step     *crashStep
}

// crashModel is what the workload's zones of the virtual disk must hold:
// one definite value per byte, plus the ranges where other values are
// allowed (crashMaybe).
type crashModel struct {
	img    *crashImage
	zones  []crashRange
	val    [][]byte // per zone
	maybes []crashMaybe
}

func newCrashModel(ci *crashImage) *crashModel {
	m := &crashModel{img: ci, zones: crashZones(ci.shape.size)}
	for _, z := range m.zones {
		v := make([]byte, z.end-z.off)
		if z.off < int64(len(ci.backing)) {
			copy(v, ci.backing[z.off:])
		}
		m.val = append(m.val, v)
	}
	return m
}

// zoneOf returns the index of the zone holding [off, end).
func (m *crashModel) zoneOf(off, end int64) int {
	for i, z := range m.zones {
		if off >= z.off && end <= z.end {
			return i
		}
	}
	panic(fmt.Sprintf("range %#x-%#x outside the workload's zones", off, end))
}

// apply records step s in the model: certain when it was acknowledged
// (and is covered by a later flush), else as a maybe.
func (m *crashModel) apply(s *crashStep, certain bool) {
	if !s.changes() {
		return
	}
	if !certain || s.kind == stepDiscard {
		m.maybes = append(m.maybes, crashMaybe{s.off, s.off + s.n, s})
		return
	}
	zi := m.zoneOf(s.off, s.off+s.n)
	dst := m.val[zi][s.off-m.zones[zi].off:][:s.n]
	if s.kind == stepWrite {
		copy(dst, s.data)
	} else {
		clear(dst)
	}
	// The range is now definite: drop the maybes it covers.
	// (A new slice: a maybe the range splits becomes two.)
	var kept []crashMaybe
	for _, mb := range m.maybes {
		if mb.off < s.off {
			kept = append(kept, crashMaybe{mb.off, min(mb.end, s.off), mb.step})
		}
		if mb.end > s.off+s.n {
			kept = append(kept, crashMaybe{max(mb.off, s.off+s.n), mb.end, mb.step})
		}
	}
	m.maybes = kept
}

// allows reports whether step s may have left v at guest offset off.
func (m *crashModel) allows(s *crashStep, off int64, v byte) bool {
	switch s.kind {
	case stepWrite:
		return s.data[off-s.off] == v
	case stepZero, stepZeroNoUnmap:
		return v == 0
	case stepDiscard:
		return v == 0 || v == m.img.baseAt(off)
	}
	return false
}

// verify checks got, the content of zone zi, against the model, where
// the steps in extra (unflushed or unacknowledged) may also have landed.
// It returns nil or an error naming the first bad byte.
func (m *crashModel) verify(zi int, got []byte, extra []*crashStep) error {
	want := m.val[zi]
	if bytes.Equal(got, want) {
		return nil
	}
	z := m.zones[zi]
	var cands []crashMaybe
	for _, mb := range m.maybes {
		if mb.off < z.end && mb.end > z.off {
			cands = append(cands, mb)
		}
	}
	for _, s := range extra {
		if s.changes() && s.off < z.end && s.off+s.n > z.off {
			cands = append(cands, crashMaybe{s.off, s.off + s.n, s})
		}
	}
	const block = 512
	for b := 0; b < len(got); b += block {
		e := min(b+block, len(got))
		if bytes.Equal(got[b:e], want[b:e]) {
			continue
		}
	bytesLoop:
		for i := b; i < e; i++ {
			if got[i] == want[i] {
				continue
			}
			off := z.off + int64(i)
			for _, c := range cands {
				if off >= c.off && off < c.end && m.allows(c.step, off, got[i]) {
					continue bytesLoop
				}
			}
			var who []string
			for _, c := range cands {
				if off >= c.off && off < c.end {
					who = append(who, c.step.String())
				}
			}
			return fmt.Errorf("guest byte %#x reads %#02x, want %#02x (flushed state) or what one of %v left", off, got[i], want[i], who)
		}
	}
	return nil
}
