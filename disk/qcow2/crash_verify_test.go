package qcow2_test

// Running the crash sweeps' workloads and checking what survives (see
// crash_test.go).

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime/debug"
	"slices"
	"strconv"
	"testing"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/disk/hostfile/hostfiletest"
	"github.com/imgloop/imgloop/disk/qcow2"
	"github.com/imgloop/imgloop/internal/qemutest"
)

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
	rec := &crashRecorder{MemFile: hostfiletest.NewMemFile(ci.path, ci.initial)}
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
	m, code, stderr := runQemuCheck(t, "-f", "qcow2", path)
	if len(m) == 0 {
		t.Fatalf("qemu-img check exit %d: no JSON report\n%s", code, stderr)
	}
	return m, code, stderr
}
