package qcow2_test

// Repairs (qemu-img check -r leaks and -r all) against qemu-img's: each
// image is made by qemu-img and qemu-io, damaged at test time by editing
// its bytes, checked by both (numbers, exit status, messages), then two
// copies are repaired, one by qemu-img, one by Check, and the results
// compared: the reports, the files (byte for byte: we follow QEMU's
// repair algorithms, the rebuild's placement included), the guest
// content (qemu-img compare), and qemu-img check of our repaired image.

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/disk/hostfile"
	"github.com/imgloop/imgloop/disk/hostfile/hostfiletest"
	"github.com/imgloop/imgloop/disk/qcow2"
	"github.com/imgloop/imgloop/internal/qemutest"
)

// checkRepair runs qcow2.Check with mode on path, opened for writing.
func checkRepair(t *testing.T, path string, mode qcow2.RepairMode) *qcow2.CheckResult {
	t.Helper()
	f, err := hostfile.Open(path, false)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	r, err := qcow2.Check(f, qcow2.CheckOptions{Repair: mode})
	if err != nil {
		t.Fatalf("Check -r (%s): %v", path, err)
	}
	return r
}

// qemuRepair runs qemu-img check -r arg --output=json on path and returns
// its JSON numbers, exit status and standard error.
func qemuRepair(t *testing.T, path, arg string) (map[string]int64, int, string) {
	t.Helper()
	return runQemuCheck(t, "-r", arg, path)
}

// clusterBits returns the cluster_bits of the image at path.
func clusterBits(t *testing.T, path string) uint {
	t.Helper()
	return uint(readRawHeader(t, path).clusterBits)
}

// hostClusterOf returns the host cluster mapped at guest offset guest.
func hostClusterOf(t *testing.T, path string, guest int64) uint64 {
	t.Helper()
	_, e := l2EntryAt(t, path, guest)
	return (e & 0x00ff_ffff_ffff_fe00) >> clusterBits(t, path)
}

// firstRefblock returns the file offset of the first refcount block.
func firstRefblock(t *testing.T, path string) int64 {
	t.Helper()
	rt := int64(readU64(t, path, hRefcountTableOffset))
	return int64(readU64(t, path, rt) &^ 0x1ff)
}

// setDirty sets the dirty bit of a v3 image.
func setDirty(t *testing.T, path string) {
	t.Helper()
	patchU64(t, path, hIncompatibleFeatures, readU64(t, path, hIncompatibleFeatures)|1)
}

// repairCase is an image damaged on purpose, with the exit statuses
// qemu-img check gives it before and after each repair.
type repairCase struct {
	name string
	opts string // qemu-img create -o; the image is 4 MiB with data at [0,128k) and [1M,1M+64k)
	// prepare runs after the data is written, before damage (snapshots).
	prepare func(t *testing.T, p string)
	damage  func(t *testing.T, p string)
	// check, leaks, all: qemu-img check's exit status on the damaged
	// image, and after -r leaks and -r all.
	check, leaks, all int
	// qemuFailsAll: qemu-img check -r all fails (its rebuild trips on
	// its own overlap check) where ours repairs.
	qemuFailsAll bool
}

// repairCases covers the damage classes qemu-img check repairs or
// refuses, over refcount widths, cluster sizes and snapshots.
func repairCases() []repairCase {
	snapshot := func(t *testing.T, p string) {
		qemutest.Img(t, "snapshot", "-c", "s1", p)
		qio(t, p, "write -P 3 64k 64k")
	}
	appendLeak := func(t *testing.T, p string) { setRefcount(t, p, appendCluster(t, p), 1) }
	zeroData := func(t *testing.T, p string) { setRefcount(t, p, hostClusterOf(t, p, 0), 0) }
	zeroRefblock := func(t *testing.T, p string) {
		cs := int64(1) << clusterBits(t, p)
		patchBytes(t, p, firstRefblock(t, p), make([]byte, cs))
	}
	l2Into := func(target func(t *testing.T, p string) uint64) func(t *testing.T, p string) {
		return func(t *testing.T, p string) {
			at, e := l2EntryAt(t, p, 1<<20)
			patchU64(t, p, at, e&^0x00ff_ffff_ffff_fe00|target(t, p))
		}
	}
	reftable := func(t *testing.T, p string) uint64 { return readU64(t, p, hRefcountTableOffset) }
	l1Table := func(t *testing.T, p string) uint64 { return uint64(readRawHeader(t, p).l1Offset) }
	refblock := func(t *testing.T, p string) uint64 { return uint64(firstRefblock(t, p)) }
	return []repairCase{
		// Leaks: refcounts above the references.
		{name: "leak-reftable", damage: func(t *testing.T, p string) {
			setRefcount(t, p, readU64(t, p, hRefcountTableOffset)>>clusterBits(t, p), 2)
		}, check: 3},
		{name: "leak-appended", damage: func(t *testing.T, p string) {
			appendLeak(t, p)
			appendLeak(t, p)
		}, check: 3},
		{name: "leak-data-copied", damage: func(t *testing.T, p string) {
			setRefcount(t, p, hostClusterOf(t, p, 0), 2)
		}, check: 2},
		{name: "leak-dirty", damage: func(t *testing.T, p string) {
			appendLeak(t, p)
			setDirty(t, p)
		}, check: 3},
		{name: "leak-corrupt-bit", damage: func(t *testing.T, p string) {
			appendLeak(t, p)
			patchU64(t, p, hIncompatibleFeatures, readU64(t, p, hIncompatibleFeatures)|3)
		}, check: 3},
		{name: "leak-rb1-c512", opts: "refcount_bits=1,cluster_size=512", damage: appendLeak, check: 3},
		{name: "leak-rb64", opts: "refcount_bits=64", damage: func(t *testing.T, p string) {
			setRefcount(t, p, readU64(t, p, hRefcountTableOffset)>>16, 1<<40)
		}, check: 3},
		{name: "leak-c2M", opts: "cluster_size=2M", damage: appendLeak, check: 3},
		{name: "leak-rb4", opts: "refcount_bits=4,cluster_size=4096", damage: func(t *testing.T, p string) {
			setRefcount(t, p, hostClusterOf(t, p, 0), 9)
		}, check: 2},
		// Refcounts below the references, not 0: -r all raises them.
		{name: "low-shared", prepare: snapshot, damage: func(t *testing.T, p string) {
			setRefcount(t, p, hostClusterOf(t, p, 0), 1)
		}, check: 2, leaks: 2},
		{name: "low-shared-and-leaks", prepare: snapshot, damage: func(t *testing.T, p string) {
			setRefcount(t, p, hostClusterOf(t, p, 0), 1)
			appendLeak(t, p)
			setRefcount(t, p, readU64(t, p, hRefcountTableOffset)>>16, 3)
		}, check: 2, leaks: 2},
		{name: "low-shared-rb2", opts: "refcount_bits=2,cluster_size=4096", prepare: snapshot, damage: func(t *testing.T, p string) {
			setRefcount(t, p, hostClusterOf(t, p, 0), 1)
		}, check: 2, leaks: 2},
		{name: "low-shared-rb64", opts: "refcount_bits=64", prepare: snapshot, damage: func(t *testing.T, p string) {
			setRefcount(t, p, hostClusterOf(t, p, 0), 1)
		}, check: 2, leaks: 2},
		// Refcount 0 for a cluster in use, broken or missing refcount
		// blocks: -r all rebuilds the refcount structures.
		{name: "zero-data", damage: zeroData, check: 2, leaks: 1},
		{name: "zero-data-and-leak", damage: func(t *testing.T, p string) {
			zeroData(t, p)
			appendLeak(t, p)
		}, check: 2, leaks: 1},
		{name: "zero-l2", damage: func(t *testing.T, p string) {
			_, e := l1EntryAt(t, p, 0)
			setRefcount(t, p, (e&0x00ff_ffff_ffff_fe00)>>16, 0)
		}, check: 2, leaks: 1},
		{name: "zero-snapshot", prepare: snapshot, damage: zeroData, check: 2, leaks: 1},
		{name: "zero-rb1-c512", opts: "refcount_bits=1,cluster_size=512", damage: zeroData, check: 2, leaks: 1},
		{name: "zero-rb64", opts: "refcount_bits=64", damage: zeroData, check: 2, leaks: 1},
		{name: "zero-c2M", opts: "cluster_size=2M", damage: zeroData, check: 2, leaks: 1},
		{name: "refblock-zeroed", damage: zeroRefblock, check: 2, leaks: 1},
		{name: "refblock-zeroed-c512", opts: "cluster_size=512", damage: zeroRefblock, check: 2, leaks: 1},
		{name: "refblock-zeroed-rb1-c512", opts: "refcount_bits=1,cluster_size=512", damage: zeroRefblock, check: 2, leaks: 1},
		{name: "refblock-zeroed-snapshot-rb64", opts: "refcount_bits=64", prepare: snapshot, damage: zeroRefblock, check: 2, leaks: 1},
		{name: "refblock-zeroed-c2M", opts: "cluster_size=2M", damage: zeroRefblock, check: 2, leaks: 1},
		{name: "refblock-zeroed-dirty-lazy", opts: "lazy_refcounts=on", damage: func(t *testing.T, p string) {
			zeroRefblock(t, p)
			setDirty(t, p)
		}, check: 2, leaks: 1},
		{name: "reftable-entry-missing", opts: "cluster_size=512", damage: func(t *testing.T, p string) {
			// 512-byte clusters, 16-bit refcounts: a block covers 128
			// KiB; the data at 1M is covered by a later block.
			rt := int64(readU64(t, p, hRefcountTableOffset))
			patchU64(t, p, rt+8*int64(hostClusterOf(t, p, 1<<20)>>8), 0)
		}, check: 2, leaks: 1},
		{name: "reftable-into-l1", damage: func(t *testing.T, p string) {
			rt := int64(readU64(t, p, hRefcountTableOffset))
			patchU64(t, p, rt, l1Table(t, p))
		}, check: 2, leaks: 1},
		{name: "refblock-reserved", damage: func(t *testing.T, p string) {
			rt := int64(readU64(t, p, hRefcountTableOffset))
			patchU64(t, p, rt, readU64(t, p, rt)|1)
		}, check: 2, leaks: 1, qemuFailsAll: true},
		{name: "refblock-past-eof", damage: func(t *testing.T, p string) {
			rt := int64(readU64(t, p, hRefcountTableOffset))
			patchU64(t, p, rt+8, uint64(roundUp(fileSize(t, p), 1<<16)+(5<<16)))
		}, check: 2, leaks: 2},
		// L2 entries into metadata: -r all raises the refcount (the
		// cluster is then shared, its OFLAG_COPIED cleared), as QEMU.
		{name: "l2-into-reftable", damage: l2Into(reftable), check: 2, leaks: 2},
		{name: "l2-into-l1", damage: l2Into(l1Table), check: 2, leaks: 2},
		{name: "l2-into-refblock", damage: l2Into(refblock), check: 2, leaks: 1},
		{name: "l2-into-l1-c512-rb1", opts: "cluster_size=512,refcount_bits=1", damage: l2Into(l1Table), check: 2, leaks: 2, all: 2},
		// OFLAG_COPIED.
		{name: "copied-cleared", damage: func(t *testing.T, p string) {
			at, e := l2EntryAt(t, p, 0)
			patchU64(t, p, at, e&^(1<<63))
		}, check: 2},
		{name: "copied-cleared-l1", damage: func(t *testing.T, p string) {
			at, e := l1EntryAt(t, p, 0)
			patchU64(t, p, at, e&^(1<<63))
		}, check: 2},
		{name: "copied-set-shared", prepare: snapshot, damage: func(t *testing.T, p string) {
			at, e := l2EntryAt(t, p, 0)
			patchU64(t, p, at, e|1<<63)
		}, check: 2},
		{name: "copied-and-leak", damage: func(t *testing.T, p string) {
			at, e := l2EntryAt(t, p, 0)
			patchU64(t, p, at, e&^(1<<63))
			appendLeak(t, p)
		}, check: 2},
		// Unaligned preallocated cluster: -r all makes it a zero cluster.
		{name: "prealloc-unaligned", prepare: func(t *testing.T, p string) {
			qio(t, p, "write -z 0 64k")
		}, damage: func(t *testing.T, p string) {
			at, e := l2EntryAt(t, p, 0)
			patchU64(t, p, at, e+512)
		}, check: 2, leaks: 2},
		{name: "prealloc-unaligned-extended", opts: "extended_l2=on", prepare: func(t *testing.T, p string) {
			qio(t, p, "write -z 1M 64k")
		}, damage: func(t *testing.T, p string) {
			at, e := l2EntryAt(t, p, 1<<20)
			if e&0x00ff_ffff_ffff_fe00 == 0 {
				t.Skip("qemu-io left no preallocated cluster")
			}
			patchU64(t, p, at, e+512)
		}, check: 2, leaks: 1},
		// The snapshot table: entries whose L1 table cannot be walked
		// are corruptions no repair fixes (with an L1 table claiming 256
		// MiB, QEMU's overlap check then fails -r all, and ours too);
		// extra data beyond 1 KiB fails the check, -r all drops it;
		// incomplete v3 entries are completed.
		{name: "snapshot-l1-unaligned", prepare: snapshot, damage: func(t *testing.T, p string) {
			at := int64(readU64(t, p, hSnapshotsOffset))
			patchU64(t, p, at, readU64(t, p, at)+512)
		}, check: 2, leaks: 2, all: 2},
		{name: "snapshot-l1-huge", prepare: snapshot, damage: func(t *testing.T, p string) {
			at := int64(readU64(t, p, hSnapshotsOffset))
			patchU32(t, p, at+8, 0x2000000)
		}, check: 2, leaks: 2, all: 1},
		{name: "snapshot-extra-data", prepare: snapshot, damage: func(t *testing.T, p string) {
			at := int64(readU64(t, p, hSnapshotsOffset))
			patchU32(t, p, at+36, 2000)
		}, check: 1, leaks: 1},
		{name: "snapshot-incomplete", prepare: snapshot, damage: snapshotIncomplete, check: 2, leaks: 2},
		{name: "snapshot-incomplete-c512", opts: "cluster_size=512", prepare: snapshot, damage: snapshotIncomplete, check: 2, leaks: 2},
		// What no repair fixes.
		{name: "l2-reserved-stays", damage: func(t *testing.T, p string) {
			at, e := l2EntryAt(t, p, 1<<20)
			patchU64(t, p, at, e|1<<57)
			appendLeak(t, p)
		}, check: 2, leaks: 2, all: 2},
		{name: "refblock-unaligned", damage: func(t *testing.T, p string) {
			rt := int64(readU64(t, p, hRefcountTableOffset))
			patchU64(t, p, rt, readU64(t, p, rt)+4096)
		}, check: 1, leaks: 1, qemuFailsAll: true},
	}
}

// snapshotIncomplete rewrites the first snapshot table entry of the image
// at path without extra data (an incomplete v3 entry).
func snapshotIncomplete(t *testing.T, path string) {
	t.Helper()
	at := int64(readU64(t, path, hSnapshotsOffset))
	e := readFileAt(t, path, at, int(min(40+1024+2*65535, fileSize(t, path)-at)))
	ids, names := int(binary.BigEndian.Uint16(e[12:])), int(binary.BigEndian.Uint16(e[14:]))
	extra := int(binary.BigEndian.Uint32(e[36:]))
	rest := append([]byte(nil), e[40+extra:40+extra+ids+names]...)
	binary.BigEndian.PutUint32(e[36:], 0)
	patchBytes(t, path, at, append(append(e[:40:40], rest...), make([]byte, extra)...))
}

// TestCheckRepair damages images as repairCases say, and compares Check
// with qemu-img check before any repair, with -r leaks and with -r all.
func TestCheckRepair(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	t.Parallel()
	dir := t.TempDir()
	for _, tc := range repairCases() {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(dir, tc.name+".qcow2")
			mkqcow2(t, p, tc.opts, "4M")
			qio(t, p, "write -P 1 0 128k", "write -P 2 1M 64k")
			if tc.prepare != nil {
				tc.prepare(t, p)
			}
			tc.damage(t, p)
			r := compareWithQemu(t, p)
			if r.ExitCode() != tc.check {
				t.Errorf("check: exit %d, want %d (%q)", r.ExitCode(), tc.check, r.Messages)
			}
			for _, mode := range []qcow2.RepairMode{qcow2.RepairLeaks, qcow2.RepairAll} {
				want, qwant := tc.leaks, tc.leaks
				if mode == qcow2.RepairAll {
					want, qwant = tc.all, tc.all
					if tc.qemuFailsAll {
						qwant = 1
					}
				}
				compareRepair(t, p, mode, want, qwant)
			}
		})
	}
}

// compareRepair repairs two copies of the damaged image at damaged, one
// with qemu-img check -r, one with Check, and compares them. want is our
// exit status after the repair, qwant qemu-img's.
func compareRepair(t *testing.T, damaged string, mode qcow2.RepairMode, want, qwant int) {
	t.Helper()
	arg := map[qcow2.RepairMode]string{qcow2.RepairLeaks: "leaks", qcow2.RepairAll: "all"}[mode]
	before, err := os.ReadFile(damaged)
	if err != nil {
		t.Fatal(err)
	}
	base := strings.TrimSuffix(damaged, ".qcow2")
	ours, theirs := base+"-"+arg+".qcow2", base+"-"+arg+"-qemu.qcow2"
	writeFile(t, ours, before)
	writeFile(t, theirs, before)
	qjson, qcode, qmsg := qemuRepair(t, theirs, arg)
	r := checkRepair(t, ours, mode)
	if r.ExitCode() != want || qcode != qwant {
		t.Fatalf("-r %s: exit %d, qemu-img %d, want %d and %d\nours: %q (%s)\nqemu-img: %s", arg, r.ExitCode(), qcode, want, qwant, r.Messages, r.Failure, qmsg)
	}
	if want != qwant {
		// We repair what qemu-img fails to: qemu-img finds our repair
		// clean, and the guest content is the damaged image's.
		if w, code, msg := qemuCheck(t, ours); code != 0 {
			t.Errorf("-r %s: qemu-img check of our repair: exit %d, %v\n%s", arg, code, w, msg)
		}
		if got, want := qemutest.RawBytes(t, ours), qemutest.RawBytes(t, damaged); !bytes.Equal(got, want) {
			t.Errorf("-r %s: guest content changed at %d", arg, qemutest.FirstDiff(got, want))
		}
		return
	}
	for _, m := range r.Messages {
		if i := strings.Index(m, "(overlaps with "); i >= 0 {
			// QEMU also marks the image corrupt, and words the
			// error as an errno: only the overlap must match.
			m = m[i : i+strings.Index(m[i:], ")")+1]
		}
		if !strings.Contains(qmsg, m) {
			t.Errorf("-r %s: our message %q is not in qemu-img's:\n%s", arg, m, qmsg)
		}
	}
	if qcode == 1 {
		// The check failed for both: nothing to compare but the file,
		// which a failed -r leaks leaves as it was.
		if after, _ := os.ReadFile(ours); mode == qcow2.RepairLeaks && !bytes.Equal(before, after) {
			t.Errorf("-r leaks: a failed repair changed the file")
		}
		return
	}
	got := ourJSON(t, r)
	for k, v := range qjson {
		if got[k] != v {
			t.Errorf("-r %s: %s = %d, qemu-img %d\nours: %q\nqemu-img: %s", arg, k, got[k], v, r.Messages, qmsg)
		}
	}
	for k := range got {
		if _, ok := qjson[k]; !ok {
			t.Errorf("-r %s: we report %s = %d, qemu-img does not", arg, k, got[k])
		}
	}
	after, _ := os.ReadFile(ours)
	q, _ := os.ReadFile(theirs)
	if !bytes.Equal(after, q) {
		t.Errorf("-r %s: our repaired file differs from qemu-img's at byte %d (sizes %d, %d)", arg, qemutest.FirstDiff(after, q), len(after), len(q))
	}
	// Same guest content (qemu-img cannot read images left corrupt).
	if want != 2 {
		if out, err := qemutest.Try("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", ours, theirs); err != nil {
			t.Errorf("-r %s: qemu-img compare: %v\n%s", arg, err, out)
		}
	}
	// qemu-img finds our repair as it finds its own.
	w, code, msg := qemuCheck(t, ours)
	if code != want {
		t.Errorf("-r %s: qemu-img check of our repair: exit %d, want %d, %v\n%s", arg, code, want, w, msg)
	}
	if want == 0 && readU64(t, ours, hIncompatibleFeatures)&3 != 0 {
		t.Errorf("-r %s: dirty/corrupt bits left set: %#x", arg, readU64(t, ours, hIncompatibleFeatures))
	}
}

// TestCheckRepairKilledWriter: an image with lazy refcounts whose writer
// was killed mid-work is left dirty, its refcounts behind its tables;
// RepairAll (what the write path runs when it opens such an image) leaves
// it clean, with the guest content qemu-img's repair keeps.
func TestCheckRepairKilledWriter(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	t.Parallel()
	dir := t.TempDir()
	for _, opts := range []string{"lazy_refcounts=on", "lazy_refcounts=on,cluster_size=4096,refcount_bits=1"} {
		p := filepath.Join(dir, "killed.qcow2")
		os.Remove(p)
		mkqcow2(t, p, opts, "64M")
		// Thousands of small writes, spread so that new L2 tables and
		// refcount blocks keep being allocated; killed after a while.
		args := []string{"-f", "qcow2"}
		for i := range 4000 {
			args = append(args, "-c", fmt.Sprintf("write -P %d %d 4k", i%250+1, int64(i)*16411*4096%(64<<20)))
		}
		args = append(args, p)
		cmd := exec.Command("qemu-io", args...)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(300 * time.Millisecond)
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		killed := readU64(t, p, hIncompatibleFeatures)&1 != 0
		t.Logf("%s: writer killed mid-work: %v", opts, killed)
		if !killed {
			// The writer finished (or had not started): make the
			// damage by hand.
			setDirty(t, p)
			patchBytes(t, p, firstRefblock(t, p)+int64(1)<<clusterBits(t, p)/2, make([]byte, 64))
		}
		compareWithQemu(t, p)
		compareRepair(t, p, qcow2.RepairAll, 0, 0)
		// And the image reads as qemu-img reads it.
		ours := strings.TrimSuffix(p, ".qcow2") + "-all.qcow2"
		img := openImage(t, ours, disk.OpenOptions{ReadOnly: true})
		raw := qemutest.RawBytes(t, ours)
		got := make([]byte, len(raw))
		if _, err := img.ReadAt(got, 0); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, raw) {
			t.Errorf("%s: repaired image reads differently at %d", opts, qemutest.FirstDiff(got, raw))
		}
	}
}

// crashFile is a MemFile that records, before each mutation and sync, the
// images a power cut would leave then: the durable content, and the
// durable content with every other unsynced operation applied.
type crashFile struct {
	*hostfiletest.MemFile
	crashes []*hostfiletest.MemFile
}

func (c *crashFile) snap() {
	c.crashes = append(c.crashes, c.MemFile.Crash(),
		c.MemFile.CrashKeeping(func(i int) bool { return i%2 == 1 }))
}

func (c *crashFile) WriteAt(p []byte, off int64) (int, error) {
	c.snap()
	return c.MemFile.WriteAt(p, off)
}

func (c *crashFile) Sync() error {
	c.snap()
	return c.MemFile.Sync()
}

func (c *crashFile) Truncate(size int64) error {
	c.snap()
	return c.MemFile.Truncate(size)
}

func (c *crashFile) PunchHole(off, n int64) error {
	c.snap()
	return c.MemFile.PunchHole(off, n)
}

// TestCheckRepairCrash: a power cut at any point of a repair (a rebuild
// of the refcount structures included) leaves an image whose guest
// content is intact and which RepairAll then repairs.
func TestCheckRepairCrash(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	t.Parallel()
	dir := t.TempDir()
	for _, tc := range repairCases() {
		switch tc.name {
		case "zero-data-and-leak", "refblock-zeroed-snapshot-rb64", "refblock-zeroed-rb1-c512",
			"refblock-past-eof", "low-shared-and-leaks", "copied-set-shared", "reftable-into-l1":
		default:
			continue
		}
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(dir, tc.name+".qcow2")
			mkqcow2(t, p, tc.opts, "4M")
			qio(t, p, "write -P 1 0 128k", "write -P 2 1M 64k")
			if tc.prepare != nil {
				tc.prepare(t, p)
			}
			tc.damage(t, p)
			guest := qemutest.RawBytes(t, p)
			data, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			f := &crashFile{MemFile: hostfiletest.NewMemFile(p, data)}
			r, err := qcow2.Check(f, qcow2.CheckOptions{Repair: qcow2.RepairAll})
			if err != nil || r.ExitCode() != tc.all {
				t.Fatalf("repair: %v, exit %d (%q)", err, r.ExitCode(), r.Messages)
			}
			for i, m := range f.crashes {
				readGuest(t, m, guest, i)
				r, err := qcow2.Check(m, qcow2.CheckOptions{Repair: qcow2.RepairAll})
				if err != nil || r.ExitCode() != tc.all {
					t.Fatalf("crash %d of %d: repair again: %v, exit %d (%q)", i, len(f.crashes), err, r.ExitCode(), r.Messages)
				}
				readGuest(t, m, guest, i)
			}
			t.Logf("%d crash points", len(f.crashes))
		})
	}
}

// readGuest reads the whole guest disk of the image in m with our reader
// and compares it with want.
func readGuest(t *testing.T, m *hostfiletest.MemFile, want []byte, crash int) {
	t.Helper()
	img, err := qcow2.Open(m, disk.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatalf("crash %d: open: %v", crash, err)
	}
	got := make([]byte, len(want))
	if _, err := img.ReadAt(got, 0); err != nil {
		t.Fatalf("crash %d: read: %v", crash, err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("crash %d: guest content differs at %d", crash, qemutest.FirstDiff(got, want))
	}
}
