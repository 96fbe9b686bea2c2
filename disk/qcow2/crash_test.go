package qcow2_test

// Crash-safety sweeps (issue 3, "In-process crash sweeps").
//
// A seeded workload (allocating writes, partial and unaligned writes,
// overwrites, write-zeroes with and without disk.ZeroNoUnmap, discards,
// flushes) runs once on a qcow2 image made by qemu-img and loaded into a
// hostfile.MemFile, through a recording wrapper that logs every mutating
// host operation (write, sync, truncate, punch, zero range). Then:
//
//   - TestCrashSweep replays the log into a fresh MemFile and, before
//     each chosen operation i, crashes it: the unsynced operations are
//     dropped (all of them, none of them, or a seeded subset, each kept
//     whole, as a disk that reorders writes between flushes would). The
//     surviving bytes must open read-write through qcow2.Open; every
//     write acknowledged before the last completed Flush must read back
//     (bytes written after it may read old or new, per write); the image
//     must take more writes; and qcow2.Check must report no corruption
//     (leaks are allowed) before and after the reopen, and nothing at all
//     after a RepairLeaks. A sample is also checked with `qemu-img check`.
//
//   - TestCrashFaultSweep runs the workload again on a hostfile.Faulty
//     that fails the i-th host write or sync (only that one, or every one
//     from it on, like a dead disk): the call that hit the fault must
//     return an error, later calls may work or fail, nothing may panic,
//     and after Close the surviving bytes (as the process left them, and
//     as a power cut right after would) must meet the same invariants.
//
// The tests use only the public API (qcow2.Open, disk.Image, disk.Discard,
// disk.WriteZeroes, qcow2.Check) and disk/hostfile, so they hold across
// rewrites of the write path. Discard may not be implemented: a workload
// step whose Discard returns an error matching disk.ErrNotSupported is
// skipped (counted and logged); any other error fails the test.
//
// Also: TestCrashCloseAfterFault and TestCrashLeakPastEOF, the smallest
// forms of two failures the sweeps found (see their comments).
//
// Knobs (environment):
//   - IMGLOOP_CRASH_POINTS=N or "all": crash points per shape (default
//     30 crashes and 18 faults; 12 and 9 with -short);
//   - IMGLOOP_CRASH_SEED=N: another workload seed (default 1);
//   - IMGLOOP_CRASH_STEPS=N: the workload length (default 120, 60 with
//     -short);
//   - IMGLOOP_CRASH_FAULT=write:N or sync:N, ":sticky" appended for that
//     one and every later one: only that fault of TestCrashFaultSweep;
//   - IMGLOOP_CRASH_TRACE=1: log the workload's steps;
//   - IMGLOOP_CRASH_CLOSE_UNTRUSTED=1: in TestCrashFaultSweep, do not
//     count a Close that returned nil as a flush (to look past a Close
//     that wrongly reports success, see TestCrashCloseAfterFault).

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/disk/hostfile"
	"github.com/imgloop/imgloop/disk/qcow2"
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

// crashBuf is a plain in-memory disk.File (no crash model): the cheap
// file the surviving bytes are reopened and checked in.
type crashBuf struct {
	name   string
	mu     sync.Mutex
	b      []byte
	closed bool
}

func (c *crashBuf) ReadAt(p []byte, off int64) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if off < 0 {
		return 0, errors.New("crashBuf: negative offset")
	}
	if off >= int64(len(c.b)) {
		return 0, io.EOF
	}
	n := copy(p, c.b[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (c *crashBuf) WriteAt(p []byte, off int64) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return 0, os.ErrClosed
	}
	if off < 0 || off+int64(len(p)) > hostfile.MemMaxSize {
		return 0, errors.New("crashBuf: bad offset")
	}
	if end := off + int64(len(p)); end > int64(len(c.b)) {
		c.b = append(c.b, make([]byte, end-int64(len(c.b)))...)
	}
	return copy(c.b[off:], p), nil
}

func (c *crashBuf) Size() (int64, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return int64(len(c.b)), nil
}

func (c *crashBuf) Sync() error { return nil }

func (c *crashBuf) Truncate(size int64) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if size < 0 || size > hostfile.MemMaxSize {
		return errors.New("crashBuf: bad size")
	}
	if size <= int64(len(c.b)) {
		c.b = c.b[:size]
	} else {
		c.b = append(c.b, make([]byte, size-int64(len(c.b)))...)
	}
	return nil
}

func (c *crashBuf) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	return nil
}

func (c *crashBuf) Name() string { return c.name }

// crashHostOp is one mutating host file operation.
type crashHostOp struct {
	kind   hostfile.Op // OpWrite, OpSync, OpTruncate, OpPunchHole, OpZeroRange
	off, n int64
	data   []byte
}

// crashRecorder wraps a MemFile and logs its mutating operations.
type crashRecorder struct {
	*hostfile.MemFile
	mu  sync.Mutex
	ops []crashHostOp
}

func (c *crashRecorder) log(op crashHostOp) {
	c.mu.Lock()
	c.ops = append(c.ops, op)
	c.mu.Unlock()
}

// count is the number of operations logged so far.
func (c *crashRecorder) count() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.ops)
}

func (c *crashRecorder) WriteAt(p []byte, off int64) (int, error) {
	n, err := c.MemFile.WriteAt(p, off)
	if err == nil {
		c.log(crashHostOp{kind: hostfile.OpWrite, off: off, data: append([]byte(nil), p...)})
	}
	return n, err
}

func (c *crashRecorder) Sync() error {
	err := c.MemFile.Sync()
	if err == nil {
		c.log(crashHostOp{kind: hostfile.OpSync})
	}
	return err
}

func (c *crashRecorder) Truncate(size int64) error {
	err := c.MemFile.Truncate(size)
	if err == nil {
		c.log(crashHostOp{kind: hostfile.OpTruncate, n: size})
	}
	return err
}

func (c *crashRecorder) PunchHole(off, n int64) error {
	err := c.MemFile.PunchHole(off, n)
	if err == nil {
		c.log(crashHostOp{kind: hostfile.OpPunchHole, off: off, n: n})
	}
	return err
}

func (c *crashRecorder) ZeroRange(off, n int64) error {
	err := c.MemFile.ZeroRange(off, n)
	if err == nil {
		c.log(crashHostOp{kind: hostfile.OpZeroRange, off: off, n: n})
	}
	return err
}

// replay applies op to m.
func (op *crashHostOp) replay(m *hostfile.MemFile) error {
	switch op.kind {
	case hostfile.OpWrite:
		_, err := m.WriteAt(op.data, op.off)
		return err
	case hostfile.OpSync:
		return m.Sync()
	case hostfile.OpTruncate:
		return m.Truncate(op.n)
	case hostfile.OpPunchHole:
		return m.PunchHole(op.off, op.n)
	case hostfile.OpZeroRange:
		return m.ZeroRange(op.off, op.n)
	}
	return fmt.Errorf("unknown op %v", op.kind)
}

// runCrashStep runs one workload step on img. skipped reports a Discard
// the image does not implement (an error matching disk.ErrNotSupported).
func runCrashStep(img disk.Image, s *crashStep) (skipped bool, err error) {
	switch s.kind {
	case stepWrite:
		var n int
		n, err = img.WriteAt(s.data, s.off)
		if err == nil && n != len(s.data) {
			err = fmt.Errorf("short write: %d of %d bytes", n, len(s.data))
		}
	case stepZero:
		err = disk.WriteZeroes(img, s.off, s.n, 0)
	case stepZeroNoUnmap:
		err = disk.WriteZeroes(img, s.off, s.n, disk.ZeroNoUnmap)
	case stepDiscard:
		err = disk.Discard(img, s.off, s.n)
		if errors.Is(err, disk.ErrNotSupported) {
			return true, nil
		}
	case stepFlush:
		err = img.Flush()
	}
	return false, err
}

// noPanic runs fn and turns a panic into an error with the stack.
func noPanic(fn func() error) (err error) {
	defer func() {
		if v := recover(); v != nil {
			err = fmt.Errorf("panic: %v\n%s", v, debug.Stack())
		}
	}()
	return fn()
}

// crashEnvInt reads a positive integer knob from the environment.
func crashEnvInt(t *testing.T, name string, def int) int {
	s := os.Getenv(name)
	if s == "" {
		return def
	}
	if s == "all" {
		return 1 << 30
	}
	v, err := strconv.Atoi(s)
	if err != nil || v <= 0 {
		t.Fatalf("%s=%q: want a positive number or \"all\"", name, s)
	}
	return v
}

// crashSeed is the workload seed (IMGLOOP_CRASH_SEED, default 1).
func crashSeed(t *testing.T) uint64 {
	return uint64(crashEnvInt(t, "IMGLOOP_CRASH_SEED", 1))
}

// crashSteps is the workload length.
func crashSteps(t *testing.T) int {
	def := 120
	if testing.Short() {
		def = 60
	}
	return crashEnvInt(t, "IMGLOOP_CRASH_STEPS", def)
}

// crashPoints returns up to limit sorted distinct values of [0, n): all of
// them when n <= limit, else limit values spread evenly with seeded jitter,
// always including the first and the last.
func crashPoints(r *rand.Rand, n, limit int) []int {
	if n <= limit {
		p := make([]int, n)
		for i := range p {
			p[i] = i
		}
		return p
	}
	set := map[int]bool{0: true, n - 1: true}
	for k := 0; k < limit-2; k++ {
		lo := k * n / (limit - 2)
		hi := (k + 1) * n / (limit - 2)
		set[lo+r.IntN(max(1, hi-lo))] = true
	}
	p := make([]int, 0, len(set))
	for v := range set {
		p = append(p, v)
	}
	slices.Sort(p)
	return p
}

// crashRecording is one run of the workload with every host operation
// logged.
type crashRecording struct {
	steps []crashStep
	// start[i], end[i]: host operations logged before and after step i
	// (the last step is the Close).
	start, end []int
	skipped    []bool
	ops        []crashHostOp
	nSkipped   int
}

// recordCrashWorkload runs steps on ci's image (then closes it) through
// a crashRecorder. Every step must succeed.
func recordCrashWorkload(t *testing.T, ci *crashImage, steps []crashStep) *crashRecording {
	t.Helper()
	rec := &crashRecorder{MemFile: hostfile.NewMemFile(ci.path, ci.initial)}
	img, err := qcow2.Open(rec, disk.OpenOptions{})
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	cr := &crashRecording{steps: steps}
	trace := os.Getenv("IMGLOOP_CRASH_TRACE") != ""
	for i := range steps {
		if trace {
			t.Logf("step %d: %v", i, &steps[i])
		}
		cr.start = append(cr.start, rec.count())
		skipped, err := runCrashStep(img, &steps[i])
		if err != nil {
			t.Fatalf("step %d (%v): %v", i, &steps[i], err)
		}
		if skipped {
			cr.nSkipped++
		}
		cr.skipped = append(cr.skipped, skipped)
		cr.end = append(cr.end, rec.count())
	}
	// The Close: a final flush.
	cr.start = append(cr.start, rec.count())
	if err := img.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	cr.end = append(cr.end, rec.count())
	cr.ops = rec.ops
	// Without a crash, the image must hold exactly what the workload
	// wrote (discards aside).
	model := newCrashModel(ci)
	for i := range steps {
		if !cr.skipped[i] {
			model.apply(&steps[i], true)
		}
	}
	img, err = qcow2.Open(&crashBuf{name: ci.path, b: rec.Bytes()}, disk.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatalf("reopen after the workload: %v", err)
	}
	defer img.Close()
	for zi, z := range model.zones {
		got := make([]byte, z.end-z.off)
		if _, err := img.ReadAt(got, z.off); err != nil {
			t.Fatalf("read after the workload: %v", err)
		}
		if err := model.verify(zi, got, nil); err != nil {
			t.Fatalf("after the workload and a clean close: %v", err)
		}
	}
	if cr.nSkipped > 0 {
		t.Logf("%d discards skipped: Discard returns disk.ErrNotSupported", cr.nSkipped)
	}
	return cr
}

// crashVerifier checks the image left by a crash or a fault.
type crashVerifier struct {
	t  *testing.T
	ci *crashImage
	r  *rand.Rand
	// qemuEvery runs `qemu-img check` on every qemuEvery-th image checked.
	qemuEvery, checked int
	dir                string
}

// crashDirty reports whether the image in b has the dirty bit set (qcow2
// version 3 incompatible feature bit 0, header offset 72).
func crashDirty(b []byte) bool {
	return len(b) >= 80 && binary.BigEndian.Uint32(b[4:8]) >= 3 && binary.BigEndian.Uint64(b[72:80])&1 != 0
}

// check runs the invariants on the surviving bytes b of a crash at label:
// b opens read-write and reads back as the model allows (extra: steps
// that may or may not have landed); it takes more writes; qcow2.Check
// finds no corruption before (unless the image is dirty, whose refcounts
// may lag by design) and after the reopen, and RepairLeaks leaves it
// clean. It returns false after reporting a failure.
func (v *crashVerifier) check(label string, b []byte, m *crashModel, extra []*crashStep) bool {
	t := v.t
	t.Helper()
	v.checked++
	qemu := v.qemuEvery > 0 && v.checked%v.qemuEvery == 0
	fail := func(format string, args ...any) bool {
		t.Helper()
		t.Errorf("%s: %s", label, fmt.Sprintf(format, args...))
		return false
	}
	dirty := crashDirty(b)
	if !dirty {
		res, err := qcow2.Check(&crashBuf{name: v.ci.path, b: b}, qcow2.CheckOptions{})
		if err != nil {
			return fail("check of the crashed image: %v", err)
		}
		if res.Corruptions != 0 || res.CheckErrors != 0 {
			return fail("crashed image: %d corruptions, %d check errors: %v", res.Corruptions, res.CheckErrors, res.Messages)
		}
		if qemu && !v.qemuCheck(label+" (crashed)", b, true) {
			return false
		}
	}
	f := &crashBuf{name: v.ci.path, b: slices.Clone(b)}
	img, err := qcow2.Open(f, disk.OpenOptions{})
	if err != nil {
		return fail("reopen read-write: %v", err)
	}
	got := make([][]byte, len(m.zones))
	for zi, z := range m.zones {
		got[zi] = make([]byte, z.end-z.off)
		if _, err := img.ReadAt(got[zi], z.off); err != nil {
			img.Close()
			return fail("read zone %#x: %v", z.off, err)
		}
		if err := m.verify(zi, got[zi], extra); err != nil {
			img.Close()
			return fail("%v", err)
		}
	}
	// Outside the zones: the original content.
	for k := 0; k < 2; k++ {
		off := v.r.Int64N(v.ci.shape.size - 4096)
		inZone := false
		for _, z := range m.zones {
			inZone = inZone || (off < z.end && off+4096 > z.off)
		}
		if inZone {
			continue
		}
		p := make([]byte, 4096)
		if _, err := img.ReadAt(p, off); err != nil {
			img.Close()
			return fail("read %#x: %v", off, err)
		}
		for i, c := range p {
			if c != v.ci.baseAt(off+int64(i)) {
				img.Close()
				return fail("guest byte %#x outside the workload reads %#02x, want %#02x", off+int64(i), c, v.ci.baseAt(off+int64(i)))
			}
		}
	}
	// More writes: allocating (in a zone's untouched or touched parts),
	// partial, and zeroes; then a clean close.
	for k := 0; k < 3; k++ {
		zi := v.r.IntN(len(m.zones))
		z := m.zones[zi]
		n := 1 + v.r.Int64N(min(3*v.ci.cluster, z.end-z.off))
		off := z.off + v.r.Int64N(z.end-z.off-n+1)
		p := make([]byte, n)
		fillRandom(v.r, p)
		if _, err := img.WriteAt(p, off); err != nil {
			img.Close()
			return fail("write after reopen at %#x+%#x: %v", off, n, err)
		}
		copy(got[zi][off-z.off:], p)
	}
	if err := img.Flush(); err != nil {
		img.Close()
		return fail("flush after reopen: %v", err)
	}
	if err := img.Close(); err != nil {
		return fail("close after reopen: %v", err)
	}
	after := f.b
	res, err := qcow2.Check(&crashBuf{name: v.ci.path, b: after}, qcow2.CheckOptions{})
	if err != nil {
		return fail("check after reopen: %v", err)
	}
	if res.Corruptions != 0 || res.CheckErrors != 0 {
		return fail("after reopen and writes: %d corruptions, %d check errors: %v", res.Corruptions, res.CheckErrors, res.Messages)
	}
	fixed := &crashBuf{name: v.ci.path, b: slices.Clone(after)}
	res, err = qcow2.Check(fixed, qcow2.CheckOptions{Repair: qcow2.RepairLeaks})
	if err != nil {
		return fail("check -r leaks: %v", err)
	}
	if res.Corruptions != 0 || res.CheckErrors != 0 || res.Leaks != 0 {
		return fail("after check -r leaks: %d corruptions, %d leaks, %d check errors: %v", res.Corruptions, res.Leaks, res.CheckErrors, res.Messages)
	}
	img2, err := qcow2.Open(fixed, disk.OpenOptions{ReadOnly: true})
	if err != nil {
		return fail("reopen after repair: %v", err)
	}
	defer img2.Close()
	for zi, z := range m.zones {
		p := make([]byte, z.end-z.off)
		if _, err := img2.ReadAt(p, z.off); err != nil {
			return fail("read zone %#x after repair: %v", z.off, err)
		}
		if !bytes.Equal(p, got[zi]) {
			d := qemutest.FirstDiff(p, got[zi])
			return fail("after the writes that followed the reopen, and the repair: guest byte %#x reads %#02x, want %#02x", z.off+d, p[d], got[zi][d])
		}
	}
	if qemu && !v.qemuCheck(label+" (repaired)", fixed.b, false) {
		return false
	}
	return true
}

// qemuCheck runs `qemu-img check --output=json` on a copy of b: no
// corruptions and no check errors; leaks only when leaksOK.
func (v *crashVerifier) qemuCheck(label string, b []byte, leaksOK bool) bool {
	t := v.t
	t.Helper()
	path := filepath.Join(v.dir, "check.qcow2")
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	out, code, stderr := crashQemuCheck(t, path)
	ok := code == 0 || (leaksOK && code == 3)
	if !ok || out["corruptions"] != 0 || out["check-errors"] != 0 {
		t.Errorf("%s: qemu-img check exit %d: %v\n%s", label, code, out, stderr)
		return false
	}
	return true
}

// crashQemuCheck runs `qemu-img check -f qcow2 --output=json path` and
// returns its numeric JSON fields, exit status and standard error.
func crashQemuCheck(t testing.TB, path string) (map[string]int64, int, string) {
	t.Helper()
	cmd := exec.Command("qemu-img", "check", "-f", "qcow2", "--output=json", path)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("qemu-img check: %v", err)
	}
	var raw map[string]any
	if err := json.Unmarshal(stdout.Bytes(), &raw); err != nil {
		t.Fatalf("qemu-img check exit %d: bad JSON %q: %v\n%s", code, stdout.String(), err, stderr.String())
	}
	out := map[string]int64{}
	for k, v := range raw {
		if f, ok := v.(float64); ok {
			out[k] = int64(f)
		}
	}
	return out, code, stderr.String()
}

// crashFailLimit stops a sweep after this many failed points.
const crashFailLimit = 3

// TestCrashSweep crashes the workload before each chosen host operation
// (see the file comment).
func TestCrashSweep(t *testing.T) {
	for _, s := range crashShapes {
		t.Run(s.name, func(t *testing.T) {
			t.Parallel()
			ci := makeCrashImage(t, s)
			seed := crashSeed(t)
			steps := crashWorkload(seed, s.size, ci.cluster, crashSteps(t))
			cr := recordCrashWorkload(t, ci, steps)
			def := 30
			if testing.Short() {
				def = 12
			}
			r := rand.New(rand.NewPCG(seed, 77))
			points := crashPoints(r, len(cr.ops)+1, crashEnvInt(t, "IMGLOOP_CRASH_POINTS", def))
			t.Logf("seed %d: %d steps, %d host operations, %d crash points", seed, len(steps), len(cr.ops), len(points))
			v := &crashVerifier{t: t, ci: ci, r: r, qemuEvery: max(1, len(points)/6), dir: t.TempDir()}

			replay := hostfile.NewMemFile(ci.path, ci.initial)
			model := newCrashModel(ci)
			applied := 0 // steps applied to model (all before the last flush)
			failures := 0
			for pi, i := 0, 0; i <= len(cr.ops) && pi < len(points); i++ {
				if points[pi] == i {
					pi++
					// The last completed flush (or the Close) before op i.
					last := -1
					for k := range cr.start {
						isFlush := k == len(steps) || steps[k].kind == stepFlush
						if isFlush && cr.end[k] <= i {
							last = k
						}
					}
					for ; applied <= last && applied < len(steps); applied++ {
						if !cr.skipped[applied] {
							model.apply(&steps[applied], true)
						}
					}
					var extra []*crashStep
					for k := last + 1; k < len(steps); k++ {
						if cr.start[k] < i && !cr.skipped[k] {
							extra = append(extra, &steps[k])
						}
					}
					pending := replay.Pending()
					var crashed *hostfile.MemFile
					mode := "drop all unsynced"
					switch {
					case pending > 0 && pi%3 == 1:
						mode = "keep all unsynced"
						crashed = replay.CrashKeeping(func(int) bool { return true })
					case pending > 0 && pi%3 == 2:
						mode = "keep a random subset of unsynced"
						crashed = replay.CrashKeeping(func(int) bool { return r.IntN(2) == 0 })
					default:
						crashed = replay.Crash()
					}
					label := fmt.Sprintf("crash before host op %d/%d (%s of %d; last flush: step %d)", i, len(cr.ops), mode, pending, last)
					var ok bool
					if err := noPanic(func() error { ok = v.check(label, crashed.Bytes(), model, extra); return nil }); err != nil {
						t.Fatalf("%s: %v", label, err)
					}
					if !ok {
						if failures++; failures >= crashFailLimit {
							t.Fatalf("stopping after %d failed crash points", failures)
						}
					}
				}
				if i < len(cr.ops) {
					if err := cr.ops[i].replay(replay); err != nil {
						t.Fatal(err)
					}
				}
			}
		})
	}
}

// TestCrashFaultSweep fails the i-th host write or sync of the workload
// (see the file comment).
func TestCrashFaultSweep(t *testing.T) {
	for _, s := range crashShapes {
		t.Run(s.name, func(t *testing.T) {
			t.Parallel()
			ci := makeCrashImage(t, s)
			seed := crashSeed(t)
			steps := crashWorkload(seed, s.size, ci.cluster, crashSteps(t))
			cr := recordCrashWorkload(t, ci, steps)
			var nw, ns int
			for _, op := range cr.ops {
				switch op.kind {
				case hostfile.OpWrite:
					nw++
				case hostfile.OpSync:
					ns++
				}
			}
			def := 18
			if testing.Short() {
				def = 9
			}
			budget := crashEnvInt(t, "IMGLOOP_CRASH_POINTS", def)
			r := rand.New(rand.NewPCG(seed, 78))
			type fault struct {
				op     hostfile.Op
				i      int
				sticky bool
			}
			var faults []fault
			for k, i := range crashPoints(r, nw, budget*2/3) {
				faults = append(faults, fault{hostfile.OpWrite, i, k%3 == 2})
			}
			for k, i := range crashPoints(r, ns, budget-budget*2/3) {
				faults = append(faults, fault{hostfile.OpSync, i, k%3 == 2})
			}
			if only := os.Getenv("IMGLOOP_CRASH_FAULT"); only != "" {
				// One fault: write:I, sync:I, with ":sticky" to fail
				// every later one too.
				var kind string
				var i int
				var fl fault
				if _, err := fmt.Sscanf(strings.ReplaceAll(only, ":", " "), "%s %d", &kind, &i); err != nil || (kind != "write" && kind != "sync") {
					t.Fatalf("IMGLOOP_CRASH_FAULT=%q: want write:N or sync:N[:sticky]", only)
				}
				fl.op, fl.i, fl.sticky = hostfile.OpWrite, i, strings.HasSuffix(only, ":sticky")
				if kind == "sync" {
					fl.op = hostfile.OpSync
				}
				faults = []fault{fl, fl}
			}
			t.Logf("seed %d: %d steps, %d host writes, %d syncs, %d faults", seed, len(steps), nw, ns, len(faults))
			v := &crashVerifier{t: t, ci: ci, r: r, qemuEvery: max(1, len(faults)/5), dir: t.TempDir()}
			failures := 0
			for fi, fl := range faults {
				how := "only"
				if fl.sticky {
					how = "and every later one"
				}
				label := fmt.Sprintf("failing %v #%d (%s)", fl.op, fl.i, how)
				ok := true
				if err := noPanic(func() error {
					ok = runFaultPoint(t, v, ci, steps, label, fl.op, fl.i, fl.sticky, fi%2 == 0)
					return nil
				}); err != nil {
					t.Fatalf("%s: %v", label, err)
				}
				if !ok {
					if failures++; failures >= crashFailLimit {
						t.Fatalf("stopping after %d failed fault points", failures)
					}
				}
			}
		})
	}
}

// runFaultPoint runs the workload with host operation i of kind op
// failing (and every later one when sticky), closes the image, and checks
// what is left: the bytes as the process left them, or, when powerCut,
// as a crash right after the close would.
func runFaultPoint(t *testing.T, v *crashVerifier, ci *crashImage, steps []crashStep, label string, op hostfile.Op, i int, sticky, powerCut bool) bool {
	t.Helper()
	mem := hostfile.NewMemFile(ci.path, ci.initial)
	fy := hostfile.NewFaulty(mem)
	if sticky {
		fy.FailAfter(op, int64(i), nil)
	} else {
		fy.FailNth(op, int64(i), nil)
	}
	// hit reports whether the failing operations overlap [before, after).
	hit := func(before, after int64) bool {
		if sticky {
			return after > before && after > int64(i)
		}
		return before <= int64(i) && int64(i) < after
	}
	errs := make([]error, len(steps))
	skipped := make([]bool, len(steps))
	opened := false
	var closeErr error
	before := fy.Count(op)
	img, err := qcow2.Open(fy, disk.OpenOptions{})
	if err != nil {
		if !hit(before, fy.Count(op)) {
			t.Errorf("%s: open failed without the fault: %v", label, err)
			return false
		}
	} else {
		opened = true
		for k := range steps {
			before := fy.Count(op)
			skipped[k], errs[k] = runCrashStep(img, &steps[k])
			if errs[k] == nil && hit(before, fy.Count(op)) {
				t.Errorf("%s: step %d (%v) hit the fault and returned no error", label, k, &steps[k])
				img.Close()
				return false
			}
		}
		before := fy.Count(op)
		closeErr = img.Close()
		if closeErr == nil && hit(before, fy.Count(op)) {
			t.Errorf("%s: Close hit the fault and returned no error", label)
			return false
		}
	}
	// The last acknowledged flush: a Flush that succeeded, or the Close.
	last := -1
	if opened {
		for k := range steps {
			if steps[k].kind == stepFlush && errs[k] == nil {
				last = k
			}
		}
		if closeErr == nil && os.Getenv("IMGLOOP_CRASH_CLOSE_UNTRUSTED") == "" {
			last = len(steps)
		}
	}
	model := newCrashModel(ci)
	var extra []*crashStep
	for k := range steps {
		if skipped[k] {
			continue
		}
		if k < last {
			model.apply(&steps[k], errs[k] == nil)
		} else if opened {
			extra = append(extra, &steps[k])
		}
	}
	b := mem.Bytes()
	mode := "as left"
	if powerCut {
		b = mem.Crash().Bytes()
		mode = "power cut after close"
	}
	nerr := 0
	for _, e := range errs {
		if e != nil {
			nerr++
		}
	}
	return v.check(fmt.Sprintf("%s, %s (%d steps failed, close: %v)", label, mode, nerr, closeErr), b, model, extra)
}

// TestCrashCloseAfterFault: a write is acknowledged, a later write fails
// on the host (and every host write after it), and Close must then either
// report an error or have made the acknowledged write durable.
func TestCrashCloseAfterFault(t *testing.T) {
	ci := makeCrashImage(t, crashShape{name: "close-fault", opts: "compat=1.1,cluster_size=65536", size: 64 << 20})
	for _, sticky := range []bool{false, true} {
		mem := hostfile.NewMemFile(ci.path, ci.initial)
		fy := hostfile.NewFaulty(mem)
		img, err := qcow2.Open(fy, disk.OpenOptions{})
		if err != nil {
			t.Fatal(err)
		}
		a := bytes.Repeat([]byte{0xaa}, 4096)
		if _, err := img.WriteAt(a, 0); err != nil {
			t.Fatal(err)
		}
		n := fy.Count(hostfile.OpWrite)
		if sticky {
			fy.FailAfter(hostfile.OpWrite, n, nil)
		} else {
			fy.FailNth(hostfile.OpWrite, n, nil)
		}
		_, werr := img.WriteAt(a, 32<<20)
		cerr := img.Close()
		t.Logf("sticky=%v: second write: %v; close: %v", sticky, werr, cerr)
		if cerr != nil {
			continue
		}
		re, err := qcow2.Open(&crashBuf{name: ci.path, b: mem.Bytes()}, disk.OpenOptions{ReadOnly: true})
		if err != nil {
			t.Fatalf("sticky=%v: reopen: %v", sticky, err)
		}
		got := make([]byte, 4096)
		if _, err := re.ReadAt(got, 0); err != nil {
			t.Fatal(err)
		}
		re.Close()
		if !bytes.Equal(got, a) {
			t.Errorf("sticky=%v: Close returned nil, but the acknowledged write at 0 reads back %#x...", sticky, got[:8])
		}
	}
}

// TestCrashLeakPastEOF: a crash between a flush's refcount update and its
// sync, where the disk kept the refcount block write but not the data
// write that was to extend the file, leaves a leaked cluster past the
// end of the file (refcount 1, no reference). Writes after the reopen
// must not hand that cluster out with its refcount raised to 2.
func TestCrashLeakPastEOF(t *testing.T) {
	ci := makeCrashImage(t, crashShape{name: "leak-eof", opts: "compat=1.1,cluster_size=65536", size: 64 << 20})
	rec := &crashRecorder{MemFile: hostfile.NewMemFile(ci.path, ci.initial)}
	img, err := qcow2.Open(rec, disk.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	a := bytes.Repeat([]byte{0xaa}, 4096)
	if _, err := img.WriteAt(a, 0); err != nil {
		t.Fatal(err)
	}
	if err := img.Flush(); err != nil {
		t.Fatal(err)
	}
	eof, _ := rec.Size()
	if _, err := img.WriteAt(a, 1<<20); err != nil {
		t.Fatal(err)
	}
	before := rec.count()
	if err := img.Flush(); err != nil {
		t.Fatal(err)
	}
	ops := rec.ops
	img.Close()
	// Replay up to the first sync of the second Flush, keeping of its
	// unsynced writes only those inside the old end of the file.
	replay := hostfile.NewMemFile(ci.path, ci.initial)
	for i := 0; i < before; i++ {
		if err := ops[i].replay(replay); err != nil {
			t.Fatal(err)
		}
	}
	i := before
	for ; i < len(ops) && ops[i].kind != hostfile.OpSync; i++ {
		if err := ops[i].replay(replay); err != nil {
			t.Fatal(err)
		}
	}
	var pend []crashHostOp
	for j := 0; j < before; j++ {
		if ops[j].kind == hostfile.OpSync {
			pend = nil
		} else {
			pend = append(pend, ops[j])
		}
	}
	pend = append(pend, ops[before:i]...)
	if len(pend) != replay.Pending() {
		t.Fatalf("%d unsynced operations, the replay has %d", len(pend), replay.Pending())
	}
	crashed := replay.CrashKeeping(func(k int) bool {
		op := pend[k]
		return op.kind == hostfile.OpWrite && op.off+int64(len(op.data)) <= eof
	})
	b := crashed.Bytes()
	res, err := qcow2.Check(&crashBuf{name: ci.path, b: b}, qcow2.CheckOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("crashed image: %d corruptions, %d leaks: %v", res.Corruptions, res.Leaks, res.Messages)
	f := &crashBuf{name: ci.path, b: slices.Clone(b)}
	img, err = qcow2.Open(f, disk.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for k := int64(0); k < 4; k++ {
		if _, err := img.WriteAt(a, 8<<20+k<<16); err != nil {
			t.Fatal(err)
		}
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	res, err = qcow2.Check(&crashBuf{name: ci.path, b: f.b}, qcow2.CheckOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if res.Corruptions != 0 {
		t.Errorf("after the reopen and 4 allocating writes: %d corruptions: %v", res.Corruptions, res.Messages)
	}
}
