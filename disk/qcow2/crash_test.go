package qcow2_test

// Crash-safety sweeps (issue 3, "In-process crash sweeps").
//
// A seeded workload (allocating writes, partial and unaligned writes,
// overwrites, write-zeroes with and without disk.ZeroNoUnmap, discards,
// flushes) runs once on a qcow2 image made by qemu-img and loaded into a
// hostfiletest.MemFile, through a recording wrapper that logs every mutating
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
//   - TestCrashFaultSweep runs the workload again on a hostfiletest.Faulty
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
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/disk/hostfile/hostfiletest"
	"github.com/imgloop/imgloop/disk/qcow2"
)

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

			replay := hostfiletest.NewMemFile(ci.path, ci.initial)
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
					var crashed *hostfiletest.MemFile
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
				case hostfiletest.OpWrite:
					nw++
				case hostfiletest.OpSync:
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
				op     hostfiletest.Op
				i      int
				sticky bool
			}
			var faults []fault
			for k, i := range crashPoints(r, nw, budget*2/3) {
				faults = append(faults, fault{hostfiletest.OpWrite, i, k%3 == 2})
			}
			for k, i := range crashPoints(r, ns, budget-budget*2/3) {
				faults = append(faults, fault{hostfiletest.OpSync, i, k%3 == 2})
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
				fl.op, fl.i, fl.sticky = hostfiletest.OpWrite, i, strings.HasSuffix(only, ":sticky")
				if kind == "sync" {
					fl.op = hostfiletest.OpSync
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
func runFaultPoint(t *testing.T, v *crashVerifier, ci *crashImage, steps []crashStep, label string, op hostfiletest.Op, i int, sticky, powerCut bool) bool {
	t.Helper()
	mem := hostfiletest.NewMemFile(ci.path, ci.initial)
	fy := hostfiletest.NewFaulty(mem)
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
		mem := hostfiletest.NewMemFile(ci.path, ci.initial)
		fy := hostfiletest.NewFaulty(mem)
		img, err := qcow2.Open(fy, disk.OpenOptions{})
		if err != nil {
			t.Fatal(err)
		}
		a := bytes.Repeat([]byte{0xaa}, 4096)
		if _, err := img.WriteAt(a, 0); err != nil {
			t.Fatal(err)
		}
		n := fy.Count(hostfiletest.OpWrite)
		if sticky {
			fy.FailAfter(hostfiletest.OpWrite, n, nil)
		} else {
			fy.FailNth(hostfiletest.OpWrite, n, nil)
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
	rec := &crashRecorder{MemFile: hostfiletest.NewMemFile(ci.path, ci.initial)}
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
	replay := hostfiletest.NewMemFile(ci.path, ci.initial)
	for i := 0; i < before; i++ {
		if err := ops[i].replay(replay); err != nil {
			t.Fatal(err)
		}
	}
	i := before
	for ; i < len(ops) && ops[i].kind != hostfiletest.OpSync; i++ {
		if err := ops[i].replay(replay); err != nil {
			t.Fatal(err)
		}
	}
	var pend []crashHostOp
	for j := 0; j < before; j++ {
		if ops[j].kind == hostfiletest.OpSync {
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
		return op.kind == hostfiletest.OpWrite && op.off+int64(len(op.data)) <= eof
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
