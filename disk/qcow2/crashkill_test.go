package qcow2_test

// SIGKILL crash test (issue 3, "Crash test"). TestCrashKill re-executes
// its own test binary as a child (-test.run=^TestCrashKillChild$ with
// IMGLOOP_CRASHKILL_CHILD=1) that opens a qcow2 file on disk read-write
// and runs a seeded workload of writes, write-zeroes, discards and
// flushes, printing "flushed G N" after each completed Flush of writer G
// (N: how many of G's steps it covers) on standard output, a pipe. The parent kills the child
// with SIGKILL at a random moment, then:
//
//   - `qemu-img check --output=json` finds no corruption (leaks allowed);
//   - qcow2.Check with RepairLeaks repairs the leaks, after which
//     `qemu-img check` finds the image clean;
//   - every step before the last reported flush reads back; the steps
//     after it, up to the next flush, may have landed or not, each
//     byte reading old or new.
//
// The iterations chain: each child reopens the image the previous one
// left. The workload is a pure function of (seed, writer, step index), so
// the parent rebuilds it. Three images: 64 KiB clusters v3 (30 kills);
// the same with lazy refcounts (15 kills), where a killed child leaves
// the image dirty and imgloop must rebuild its refcounts when it next
// opens it read-write (done before the checks); and 64 KiB clusters v3
// with three goroutines writing and flushing at once, each in a zone of
// its own (15 kills). IMGLOOP_CRASHKILL_ITER sets the number of kills
// per image (a quarter with -short). Discards that return an error
// matching disk.ErrNotSupported are skipped by the child (the model
// allows either).

import (
	"bufio"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/disk/hostfile"
	"github.com/imgloop/imgloop/disk/qcow2"
	"github.com/imgloop/imgloop/internal/qemutest"
)

// Child environment.
const (
	killEnvChild   = "IMGLOOP_CRASHKILL_CHILD"
	killEnvImage   = "IMGLOOP_CRASHKILL_IMAGE"
	killEnvSeed    = "IMGLOOP_CRASHKILL_SEED"
	killEnvCluster = "IMGLOOP_CRASHKILL_CLUSTER"
	killEnvWriters = "IMGLOOP_CRASHKILL_WRITERS"
)

// killWriter returns writer g's workload seed and zone (-1: any) when
// the child runs writers goroutines: each writer of several keeps to a
// zone of its own, so that the parent can model each one's writes
// independently of the others' timing.
func killWriter(seed uint64, g, writers int) (uint64, int) {
	if writers == 1 {
		return seed, -1
	}
	return seed + uint64(g)<<40, g
}

// killSize is the virtual size of the kill test's image.
const killSize = 64 << 20

// killChildLimit ends a child that was never killed (a lost parent).
const killChildLimit = 30 * time.Second

// killStep returns step j of the kill workload of seed: a pure function
// of (seed, j), inside crashZones(size)[zone], or any of them when zone
// is negative.
func killStep(seed uint64, j int, size, cluster int64, zone int) crashStep {
	r := rand.New(rand.NewPCG(seed, uint64(j)))
	zones := crashZones(size)
	zi := r.IntN(len(zones))
	if zone >= 0 {
		zi = zone
	}
	z := zones[zi]
	zl := z.end - z.off
	var ln, align int64
	switch r.IntN(4) {
	case 0:
		ln, align = 1+r.Int64N(1500), 1
	case 1:
		ln, align = 512*(1+r.Int64N(max(1, cluster/512))), 512
	case 2:
		ln, align = cluster*(1+r.Int64N(4)), cluster
	default:
		ln, align = 1+r.Int64N(256<<10), 1
	}
	ln = min(ln, zl)
	off := max(z.off, (z.off+r.Int64N(zl-ln+1))&^(align-1))
	s := crashStep{off: off, n: ln}
	switch p := r.IntN(100); {
	case p < 18:
		s = crashStep{kind: stepFlush}
	case p < 72:
		s.kind = stepWrite
		s.data = make([]byte, ln)
		fillRandom(r, s.data)
	case p < 80:
		s.kind = stepZero
	case p < 88:
		s.kind = stepZeroNoUnmap
	default:
		s.kind = stepDiscard
	}
	return s
}

// TestCrashKillChild is the child of TestCrashKill; it is skipped unless
// IMGLOOP_CRASHKILL_CHILD is set.
func TestCrashKillChild(t *testing.T) {
	if os.Getenv(killEnvChild) == "" {
		t.Skip("helper process of TestCrashKill")
	}
	path := os.Getenv(killEnvImage)
	seed, err1 := strconv.ParseUint(os.Getenv(killEnvSeed), 10, 64)
	cluster, err2 := strconv.ParseInt(os.Getenv(killEnvCluster), 10, 64)
	writers, err3 := strconv.Atoi(os.Getenv(killEnvWriters))
	if err := errors.Join(err1, err2, err3); err != nil {
		fmt.Printf("error bad environment: %v\n", err)
		os.Exit(2)
	}
	time.AfterFunc(killChildLimit, func() { os.Exit(3) })
	img, err := disk.Open(path, disk.OpenOptions{Format: "qcow2"})
	if err != nil {
		fmt.Printf("error open: %v\n", err)
		os.Exit(1)
	}
	fmt.Println("ready")
	for g := range writers {
		go func() {
			wseed, zone := killWriter(seed, g, writers)
			for j := 0; ; j++ {
				s := killStep(wseed, j, killSize, cluster, zone)
				if _, err := runCrashStep(img, &s); err != nil {
					fmt.Printf("error writer %d step %d (%v): %v\n", g, j, &s, err)
					os.Exit(1)
				}
				if s.kind == stepFlush {
					// One write(2) per line: lines of several
					// writers do not interleave.
					fmt.Printf("flushed %d %d\n", g, j+1)
				}
			}
		}()
	}
	select {}
}

// killIterations is the number of kills of an image: def, a quarter of
// it with -short, or IMGLOOP_CRASHKILL_ITER.
func killIterations(t *testing.T, def int) int {
	if testing.Short() {
		def = max(2, def/4)
	}
	return crashEnvInt(t, "IMGLOOP_CRASHKILL_ITER", def)
}

// TestCrashKill kills a writing child process many times (see the file
// comment).
func TestCrashKill(t *testing.T) {
	if os.Getenv(killEnvChild) != "" {
		t.Skip("in the child")
	}
	qemutest.Require(t, "qemu-img")
	for _, tc := range []struct {
		name, opts     string
		writers, iters int
	}{
		{"v3-64k", "compat=1.1,cluster_size=65536", 1, 30},
		{"lazy-64k", "compat=1.1,cluster_size=65536,lazy_refcounts=on", 1, 15},
		{"v3-64k-3writers", "compat=1.1,cluster_size=65536", 3, 15},
	} {
		t.Run(tc.name, func(t *testing.T) { crashKill(t, tc.opts, tc.writers, killIterations(t, tc.iters)) })
	}
}

// crashKill runs iters kill iterations, with writers goroutines in the
// child, on a fresh image made with the qemu-img create options opts.
// An image left dirty (lazy refcounts:
// its refcounts lag by design) is first opened read-write and closed by
// imgloop, which must rebuild them, before the checks.
func crashKill(t *testing.T, opts string, writers, iters int) {
	dir := t.TempDir()
	path := filepath.Join(dir, "kill.qcow2")
	const cluster = 65536
	qemutest.Create(t, path, "qcow2", opts, strconv.Itoa(killSize))
	ci := &crashImage{shape: crashShape{name: "kill", size: killSize}, path: path, cluster: cluster}
	model := newCrashModel(ci)
	seed0 := crashSeed(t)
	r := rand.New(rand.NewPCG(seed0, 99))
	start := time.Now()
	var totalFlushed int
	for it := 0; it < iters; it++ {
		seed := seed0*1000 + uint64(it)
		// Most kills land 20-50 ms into the workload; one in five at
		// a random moment from the start, open included.
		early := it%5 == 4
		delay := time.Duration(20+r.IntN(31)) * time.Millisecond
		if early {
			delay = time.Duration(r.IntN(40)) * time.Millisecond
		}
		lines, ready := runKillChild(t, path, seed, cluster, writers, delay, early)
		flushed := make([]int, writers) // per writer
		nflushed := 0
		for _, l := range lines {
			if rest, ok := strings.CutPrefix(l, "flushed "); ok {
				var g, n int
				if _, err := fmt.Sscanf(rest, "%d %d", &g, &n); err != nil || g < 0 || g >= writers || n < flushed[g] {
					t.Fatalf("child printed %q", l)
				}
				nflushed += n - flushed[g]
				flushed[g] = n
			}
		}
		label := fmt.Sprintf("kill %d (seed %d, after %v, steps flushed per writer %v)", it, seed, delay, flushed)
		if !ready && nflushed > 0 {
			t.Fatalf("%s: flushes without ready", label)
		}
		head := make([]byte, 80)
		if f, err := os.Open(path); err != nil {
			t.Fatal(err)
		} else {
			f.ReadAt(head, 0)
			f.Close()
		}
		if crashDirty(head) {
			img, err := disk.Open(path, disk.OpenOptions{Format: "qcow2"})
			if err != nil {
				t.Fatalf("%s: open of the dirty image: %v", label, err)
			}
			if err := img.Close(); err != nil {
				t.Fatalf("%s: close of the dirty image: %v", label, err)
			}
			label += " (dirty: reopened)"
		}
		// qemu-img check: no corruption (leaks allowed).
		out, code, stderr := crashQemuCheck(t, path)
		if (code != 0 && code != 3) || out["corruptions"] != 0 || out["check-errors"] != 0 {
			t.Fatalf("%s: qemu-img check exit %d: %v\n%s", label, code, out, stderr)
		}
		leaks := out["leaks"]
		// imgloop check -r leaks, then qemu-img check finds nothing.
		f, err := hostfile.Open(path, false)
		if err != nil {
			t.Fatal(err)
		}
		res, err := qcow2.Check(f, qcow2.CheckOptions{Repair: qcow2.RepairLeaks})
		f.Close()
		if err != nil {
			t.Fatalf("%s: check -r leaks: %v", label, err)
		}
		if res.Corruptions != 0 || res.Leaks != 0 || res.CheckErrors != 0 {
			t.Fatalf("%s: after check -r leaks: %d corruptions, %d leaks, %d check errors: %v", label, res.Corruptions, res.Leaks, res.CheckErrors, res.Messages)
		}
		if res.LeaksFixed != leaks {
			t.Errorf("%s: qemu-img check counted %d leaks, imgloop fixed %d", label, leaks, res.LeaksFixed)
		}
		out, code, stderr = crashQemuCheck(t, path)
		if code != 0 || out["leaks"] != 0 || out["corruptions"] != 0 {
			t.Fatalf("%s: qemu-img check after the repair: exit %d: %v\n%s", label, code, out, stderr)
		}
		// The data: each writer's steps before its last flush are
		// certain (its own flush covers them; another writer's flush
		// may have covered more, which the model leaves open); the
		// rest, up to and including its next flush, may or may not be
		// there.
		var extra []*crashStep
		for g := 0; ready && g < writers; g++ {
			wseed, zone := killWriter(seed, g, writers)
			for j := 0; ; j++ {
				s := killStep(wseed, j, killSize, cluster, zone)
				if j < flushed[g] {
					model.apply(&s, true)
					continue
				}
				extra = append(extra, &s)
				if s.kind == stepFlush {
					break
				}
			}
		}
		img, err := disk.Open(path, disk.OpenOptions{Format: "qcow2", ReadOnly: true})
		if err != nil {
			t.Fatalf("%s: open: %v", label, err)
		}
		for zi, z := range model.zones {
			got := make([]byte, z.end-z.off)
			if _, err := img.ReadAt(got, z.off); err != nil {
				t.Fatalf("%s: read: %v", label, err)
			}
			if err := model.verify(zi, got, extra); err != nil {
				t.Fatalf("%s: %v", label, err)
			}
			// What is there now is the next iteration's starting point.
			model.val[zi] = got
		}
		model.maybes = nil
		img.Close()
		totalFlushed += nflushed
		t.Logf("%s: %d leaks fixed", label, res.LeaksFixed)
	}
	t.Logf("%d kills in %v; %d steps flushed in all", iters, time.Since(start).Round(time.Millisecond), totalFlushed)
}

// runKillChild runs the child on path with seed and kills it with
// SIGKILL delay after it reports ready (or after its start when
// fromStart). It returns the lines the child printed and whether it got
// as far as ready. A child that exits by itself fails t.
func runKillChild(t *testing.T, path string, seed uint64, cluster int64, writers int, delay time.Duration, fromStart bool) ([]string, bool) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestCrashKillChild$", "-test.count=1")
	cmd.Env = append(os.Environ(),
		killEnvChild+"=1",
		killEnvImage+"="+path,
		killEnvSeed+"="+strconv.FormatUint(seed, 10),
		killEnvCluster+"="+strconv.FormatInt(cluster, 10),
		killEnvWriters+"="+strconv.Itoa(writers))
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lineCh := make(chan string, 64)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			lineCh <- sc.Text()
		}
		close(lineCh)
	}()
	var lines []string
	ready := false
	var timer <-chan time.Time
	if fromStart {
		timer = time.After(delay)
	}
	deadline := time.After(killChildLimit)
	killed := false
	for {
		select {
		case l, ok := <-lineCh:
			if !ok {
				err := cmd.Wait()
				if !killed {
					t.Fatalf("child exited before the kill: %v\nstdout: %q\nstderr: %s", err, lines, stderr.String())
				}
				var ee *exec.ExitError
				if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
					t.Fatalf("child: %v (want killed by SIGKILL)\nstdout: %q\nstderr: %s", err, lines, stderr.String())
				}
				return lines, ready
			}
			lines = append(lines, l)
			if strings.HasPrefix(l, "error ") {
				t.Fatalf("child: %s\nstderr: %s", l, stderr.String())
			}
			if l == "ready" && !ready {
				ready = true
				if !fromStart {
					timer = time.After(delay)
				}
			}
		case <-timer:
			if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
			killed, timer = true, nil
		case <-deadline:
			cmd.Process.Signal(syscall.SIGKILL)
			t.Fatalf("child never became ready\nstdout: %q\nstderr: %s", lines, stderr.String())
		}
	}
}
