package qcow2_test

// The consistency checker against `qemu-img check --output=json`: clean
// images of many shapes, images damaged on purpose (leaks, wrong
// refcounts, metadata overlaps, entries past the end of the file, wrong
// OFLAG_COPIED flags), and hostile refcount structures.

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/disk/hostfile"
	"github.com/imgloop/imgloop/disk/hostfile/hostfiletest"
	"github.com/imgloop/imgloop/disk/qcow2"
	"github.com/imgloop/imgloop/internal/qemutest"
)

// qemuCheck runs qemu-img check --output=json and returns its report and
// exit status.
func qemuCheck(t *testing.T, path string) (map[string]int64, int, string) {
	t.Helper()
	qemutest.Require(t, "qemu-img")
	return runQemuCheck(t, path)
}

// runQemuCheck runs qemu-img check --output=json with args (options, then
// the image) and returns the numbers of its JSON report (empty when it
// printed none), its exit status and its standard error.
func runQemuCheck(t testing.TB, args ...string) (map[string]int64, int, string) {
	t.Helper()
	cmd := exec.Command("qemu-img", append([]string{"check", "--output=json"}, args...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("qemu-img check %v: %v", args, err)
	}
	m := map[string]int64{}
	if stdout.Len() > 0 {
		var raw map[string]any
		if err := json.Unmarshal(stdout.Bytes(), &raw); err != nil {
			t.Fatalf("qemu-img check json: %v\n%s", err, stdout.String())
		}
		for k, v := range raw {
			if f, ok := v.(float64); ok {
				m[k] = int64(f)
			}
		}
	}
	return m, code, stderr.String()
}

// ourCheck runs qcow2.Check on path.
func ourCheck(t *testing.T, path string) *qcow2.CheckResult {
	t.Helper()
	f, err := hostfile.Open(path, true)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	r, err := qcow2.Check(f, qcow2.CheckOptions{})
	if err != nil {
		t.Fatalf("Check(%s): %v", path, err)
	}
	return r
}

// ourJSON returns our result as qemu-img's JSON keys.
func ourJSON(t *testing.T, r *qcow2.CheckResult) map[string]int64 {
	t.Helper()
	b, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	var raw map[string]any
	if err := json.Unmarshal(b, &raw); err != nil {
		t.Fatal(err)
	}
	m := map[string]int64{}
	for k, v := range raw {
		if f, ok := v.(float64); ok {
			m[k] = int64(f)
		}
	}
	return m
}

// compareWithQemu checks path with both and compares every number, the
// exit status, and that each of our messages appears in qemu-img's
// standard error.
func compareWithQemu(t *testing.T, path string) *qcow2.CheckResult {
	t.Helper()
	want, wantCode, stderr := qemuCheck(t, path)
	r := ourCheck(t, path)
	got := ourJSON(t, r)
	if len(want) == 0 {
		// qemu-img's check failed: no report, exit status 1.
		if r.Failure == "" || r.ExitCode() != 1 || wantCode != 1 {
			t.Errorf("%s: qemu-img's check failed (exit %d), ours: exit %d, failure %q\n%s", filepath.Base(path), wantCode, r.ExitCode(), r.Failure, stderr)
		}
		want = got
	}
	for _, k := range []string{"check-errors", "corruptions", "leaks", "image-end-offset",
		"total-clusters", "allocated-clusters", "fragmented-clusters", "compressed-clusters"} {
		if got[k] != want[k] {
			t.Errorf("%s: %s = %d, qemu-img says %d\nour messages: %q\nqemu-img stderr:\n%s", filepath.Base(path), k, got[k], want[k], r.Messages, stderr)
		}
	}
	if r.ExitCode() != wantCode {
		t.Errorf("%s: exit code %d, qemu-img %d", filepath.Base(path), r.ExitCode(), wantCode)
	}
	lines := map[string]bool{}
	for _, l := range strings.Split(stderr, "\n") {
		lines[l] = true
	}
	for _, m := range r.Messages {
		if !lines[m] && !strings.Contains(stderr, m) {
			t.Errorf("%s: our message %q is not in qemu-img's output:\n%s", filepath.Base(path), m, stderr)
		}
	}
	return r
}

func TestCheckClean(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	t.Parallel()
	dir := t.TempDir()
	comp := filepath.Join(dir, "comp.raw")
	writeFile(t, comp, mixedData(7, 1<<20))
	base := filepath.Join(dir, "base.qcow2")
	mkqcow2(t, base, "", "4M")
	qio(t, base, "write -P 1 0 1M")
	cases := []struct {
		name  string
		build func(t *testing.T, path string)
	}{
		{"v3-64k", func(t *testing.T, p string) {
			mkqcow2(t, p, "", "4M")
			qio(t, p, "write -P 1 0 100k", "write -P 2 1M 64k", "write -P 3 512k 4k")
		}},
		{"empty", func(t *testing.T, p string) { mkqcow2(t, p, "", "1G") }},
		{"v2", func(t *testing.T, p string) {
			mkqcow2(t, p, "compat=0.10", "4M")
			qio(t, p, "write -P 1 0 100k", "write -P 2 3M 64k")
		}},
		{"c512-rb1", func(t *testing.T, p string) {
			mkqcow2(t, p, "cluster_size=512,refcount_bits=1", "2M")
			qio(t, p, "write -P 1 0 100k", "write -P 2 1M 3k")
		}},
		{"c4k-rb64", func(t *testing.T, p string) {
			mkqcow2(t, p, "cluster_size=4096,refcount_bits=64", "4M")
			qio(t, p, "write -P 1 0 100k", "write -P 2 2M 8k")
		}},
		{"rb2", func(t *testing.T, p string) {
			mkqcow2(t, p, "cluster_size=4096,refcount_bits=2", "4M")
			qio(t, p, "write -P 1 4k 100k")
		}},
		{"rb4-snap", func(t *testing.T, p string) {
			mkqcow2(t, p, "cluster_size=4096,refcount_bits=4", "4M")
			qio(t, p, "write -P 1 0 64k")
			qemutest.Img(t, "snapshot", "-c", "s1", p)
			qio(t, p, "write -P 2 0 8k")
		}},
		{"rb8", func(t *testing.T, p string) {
			mkqcow2(t, p, "refcount_bits=8", "4M")
			qio(t, p, "write -P 1 0 200k")
		}},
		{"rb32", func(t *testing.T, p string) {
			mkqcow2(t, p, "refcount_bits=32", "4M")
			qio(t, p, "write -P 1 0 200k")
		}},
		{"compressed", func(t *testing.T, p string) {
			qemutest.Img(t, "convert", "-c", "-f", "raw", "-O", "qcow2", comp, p)
		}},
		{"compressed-4k", func(t *testing.T, p string) {
			qemutest.Img(t, "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", comp, p)
		}},
		{"snapshots", func(t *testing.T, p string) {
			mkqcow2(t, p, "", "4M")
			qio(t, p, "write -P 1 0 256k")
			qemutest.Img(t, "snapshot", "-c", "s1", p)
			qio(t, p, "write -P 2 64k 64k", "write -P 3 2M 64k")
			qemutest.Img(t, "snapshot", "-c", "s2", p)
			qio(t, p, "write -P 4 0 4k")
		}},
		{"extended-l2", func(t *testing.T, p string) {
			mkqcow2(t, p, "extended_l2=on,cluster_size=64k", "4M")
			qio(t, p, "write -P 1 0 4k", "write -P 2 130k 10k", "write -z 1M 64k", "write -z 2M 8k")
		}},
		{"zero-clusters", func(t *testing.T, p string) {
			mkqcow2(t, p, "", "4M")
			qio(t, p, "write -P 1 0 256k", "write -z 0 64k", "write -z -u 128k 64k", "write -z 1M 64k")
		}},
		{"data-file", func(t *testing.T, p string) {
			mkqcow2(t, p, "data_file="+p+".data", "4M")
			qio(t, p, "write -P 1 0 100k", "write -P 2 2M 64k")
		}},
		{"backing", func(t *testing.T, p string) {
			mkqcow2(t, p, "backing_file="+base+",backing_fmt=qcow2", "4M")
			qio(t, p, "write -P 2 64k 64k", "write -P 3 3M 4k")
		}},
		{"bitmaps", func(t *testing.T, p string) {
			mkqcow2(t, p, "", "4M")
			qio(t, p, "write -P 1 0 100k")
			qemutest.Img(t, "bitmap", "--add", p, "b0")
			qemutest.Img(t, "bitmap", "--add", "-g", "512k", p, "b1")
		}},
		{"preallocated", func(t *testing.T, p string) {
			mkqcow2(t, p, "preallocation=metadata", "4M")
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(dir, tc.name+".qcow2")
			tc.build(t, p)
			r := compareWithQemu(t, p)
			if r.ExitCode() != 0 || len(r.Messages) != 0 {
				t.Errorf("clean image: exit %d, messages %q", r.ExitCode(), r.Messages)
			}
			if tc.name == "bitmaps" && r.Bitmaps != 2 {
				t.Errorf("bitmaps counted: %d, want 2", r.Bitmaps)
			}
		})
	}
}

// refcountLoc returns the file offset of the refcount block holding the
// refcount of host cluster k of the image at path, the entry's index in
// the block, and the refcount order.
func refcountLoc(t *testing.T, path string, k uint64) (block int64, idx uint64, order uint32) {
	t.Helper()
	h := readRawHeader(t, path)
	order = 4
	if readU64(t, path, hVersion-4)&0xffffffff >= 3 {
		order = uint32(readU64(t, path, hRefcountOrder-4) & 0xffffffff)
	}
	rtOff := int64(readU64(t, path, hRefcountTableOffset))
	bb := uint64(h.clusterBits) + 3 - uint64(order)
	e := readU64(t, path, rtOff+8*int64(k>>bb))
	if e == 0 {
		t.Fatalf("no refcount block for cluster %d", k)
	}
	return int64(e &^ 0x1ff), k & (1<<bb - 1), order
}

// setRefcount patches the stored refcount of host cluster k.
func setRefcount(t *testing.T, path string, k, v uint64) {
	t.Helper()
	block, idx, order := refcountLoc(t, path, k)
	switch {
	case order < 3:
		bits := uint64(1) << order
		per := 8 / bits
		at := block + int64(idx/per)
		b := readFileAt(t, path, at, 1)[0]
		shift := (idx % per) * bits
		b = b&^byte((1<<bits-1)<<shift) | byte(v<<shift)
		patchBytes(t, path, at, []byte{b})
	default:
		w := int64(1) << (order - 3)
		buf := make([]byte, 8)
		binary.BigEndian.PutUint64(buf, v)
		patchBytes(t, path, block+int64(idx)*w, buf[8-w:])
	}
}

// appendCluster grows the file at path by one zeroed cluster and returns
// its index.
func appendCluster(t *testing.T, path string) uint64 {
	t.Helper()
	h := readRawHeader(t, path)
	cs := int64(1) << h.clusterBits
	size := roundUp(fileSize(t, path), cs)
	if err := os.Truncate(path, size+cs); err != nil {
		t.Fatal(err)
	}
	return uint64(size / cs)
}

func TestCheckDamaged(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	t.Parallel()
	dir := t.TempDir()
	// base: v3, 64 KiB clusters; data at guest [0,128k) and [1M,1M+64k).
	base := func(t *testing.T, name, opts string) string {
		p := filepath.Join(dir, name+".qcow2")
		mkqcow2(t, p, opts, "4M")
		qio(t, p, "write -P 1 0 128k", "write -P 2 1M 64k")
		return p
	}
	hostCluster := func(t *testing.T, p string, guest int64) uint64 {
		_, e := l2EntryAt(t, p, guest)
		return (e & 0x00ff_ffff_ffff_fe00) >> readRawHeader(t, p).clusterBits
	}
	comp := filepath.Join(dir, "comp.raw")
	writeFile(t, comp, mixedData(3, 1<<20))
	compressed := func(t *testing.T, name, _ string) string {
		p := filepath.Join(dir, name+".qcow2")
		qemutest.Img(t, "convert", "-c", "-f", "raw", "-O", "qcow2", comp, p)
		return p
	}
	extended := func(t *testing.T, name, _ string) string {
		p := filepath.Join(dir, name+".qcow2")
		mkqcow2(t, p, "extended_l2=on", "4M")
		qio(t, p, "write -P 1 0 4k", "write -P 2 1M 64k")
		return p
	}
	snapshot := func(t *testing.T, name, _ string) string {
		p := base(t, name, "")
		qemutest.Img(t, "snapshot", "-c", "s1", p)
		qio(t, p, "write -P 3 0 64k")
		return p
	}
	withBitmap := func(t *testing.T, name, _ string) string {
		p := base(t, name, "")
		qemutest.Img(t, "bitmap", "--add", p, "b0")
		return p
	}
	dataFile := func(t *testing.T, name, _ string) string {
		p := filepath.Join(dir, name+".qcow2")
		mkqcow2(t, p, "data_file="+p+".data", "4M")
		qio(t, p, "write -P 1 0 128k")
		return p
	}
	twoTables := func(t *testing.T, name, _ string) string {
		p := filepath.Join(dir, name+".qcow2")
		mkqcow2(t, p, "", "2G")
		qio(t, p, "write -P 1 0 128k", "write -P 2 512M 64k", "write -P 3 1G 64k")
		return p
	}
	cases := []struct {
		name string
		opts string
		// damage patches the image; want is the exit status qemu-img gives.
		damage func(t *testing.T, p string)
		want   int
		// build makes the image (base when nil).
		build func(t *testing.T, name, opts string) string
	}{
		{"leak-bump", "", func(t *testing.T, p string) {
			rt := readU64(t, p, hRefcountTableOffset)
			setRefcount(t, p, rt>>16, 2)
		}, 3, nil},
		{"refcount-bump-data", "", func(t *testing.T, p string) {
			setRefcount(t, p, hostCluster(t, p, 0), 2) // also breaks OFLAG_COPIED
		}, 2, nil},
		{"leak-appended", "", func(t *testing.T, p string) {
			setRefcount(t, p, appendCluster(t, p), 1)
		}, 3, nil},
		{"leak-appended-rb1", "refcount_bits=1,cluster_size=4096", func(t *testing.T, p string) {
			setRefcount(t, p, appendCluster(t, p), 1)
		}, 3, nil},
		{"refcount-zero", "", func(t *testing.T, p string) {
			setRefcount(t, p, hostCluster(t, p, 64<<10), 0)
		}, 2, nil},
		{"refcount-zero-rb64", "refcount_bits=64", func(t *testing.T, p string) {
			setRefcount(t, p, hostCluster(t, p, 0), 0)
		}, 2, nil},
		{"l2-into-l1", "", func(t *testing.T, p string) {
			at, e := l2EntryAt(t, p, 1<<20)
			l1 := uint64(readRawHeader(t, p).l1Offset)
			patchU64(t, p, at, e&^0x00ff_ffff_ffff_fe00|l1)
		}, 2, nil},
		{"l2-into-refblock", "", func(t *testing.T, p string) {
			at, e := l2EntryAt(t, p, 1<<20)
			block, _, _ := refcountLoc(t, p, 0)
			patchU64(t, p, at, e&^0x00ff_ffff_ffff_fe00|uint64(block))
		}, 2, nil},
		{"l2-past-eof", "", func(t *testing.T, p string) {
			at, e := l2EntryAt(t, p, 1<<20)
			patchU64(t, p, at, e&^0x00ff_ffff_ffff_fe00|uint64(roundUp(fileSize(t, p), 1<<16)+10<<16))
		}, 2, nil},
		{"l2-unaligned", "", func(t *testing.T, p string) {
			at, e := l2EntryAt(t, p, 1<<20)
			patchU64(t, p, at, e+512)
		}, 2, nil},
		{"l2-reserved", "", func(t *testing.T, p string) {
			at, e := l2EntryAt(t, p, 1<<20)
			patchU64(t, p, at, e|1<<57)
		}, 2, nil},
		{"copied-cleared", "", func(t *testing.T, p string) {
			at, e := l2EntryAt(t, p, 0)
			patchU64(t, p, at, e&^(1<<63))
		}, 2, nil},
		{"copied-cleared-l1", "", func(t *testing.T, p string) {
			at, e := l1EntryAt(t, p, 0)
			patchU64(t, p, at, e&^(1<<63))
		}, 2, nil},
		{"l1-reserved", "", func(t *testing.T, p string) {
			at, e := l1EntryAt(t, p, 0)
			patchU64(t, p, at, e|1<<58)
		}, 2, nil},
		{"refblock-unaligned", "", func(t *testing.T, p string) {
			rt := int64(readU64(t, p, hRefcountTableOffset))
			patchU64(t, p, rt, readU64(t, p, rt)+4096)
		}, 1, nil},
		{"refblock-reserved", "", func(t *testing.T, p string) {
			rt := int64(readU64(t, p, hRefcountTableOffset))
			patchU64(t, p, rt, readU64(t, p, rt)|1)
		}, 2, nil},
		{"refblock-past-eof", "", func(t *testing.T, p string) {
			rt := int64(readU64(t, p, hRefcountTableOffset))
			patchU64(t, p, rt, uint64(roundUp(fileSize(t, p), 1<<16)+(5<<16)))
		}, 2, nil},
		{"compressed-refcount-zero", "", func(t *testing.T, p string) {
			_, host, _ := compressedAt(t, p, 0)
			setRefcount(t, p, uint64(host)>>16, 0)
		}, 2, compressed},
		{"compressed-copied", "", func(t *testing.T, p string) {
			at, _, _ := compressedAt(t, p, 0)
			patchU64(t, p, at, readU64(t, p, at)|1<<63)
		}, 2, compressed},
		{"extended-bitmap-both", "", func(t *testing.T, p string) {
			at, _ := l2EntryAt(t, p, 0)
			patchU64(t, p, at+8, 1|1<<32)
		}, 2, extended},
		{"extended-unallocated-bitmap", "", func(t *testing.T, p string) {
			at, _ := l2EntryAt(t, p, 3<<20)
			patchU64(t, p, at+8, 1)
		}, 2, extended},
		{"zero-alloc-unaligned", "", func(t *testing.T, p string) {
			qio(t, p, "write -z 0 64k")
			at, e := l2EntryAt(t, p, 0)
			patchU64(t, p, at, e+512)
		}, 2, nil},
		{"snapshot-l1-leak", "", func(t *testing.T, p string) {
			img := openImage(t, p, disk.OpenOptions{ReadOnly: true})
			l1 := img.(*qcow2.Image).Snapshots()[0].L1TableOffset
			setRefcount(t, p, l1>>16, 2)
		}, 3, snapshot},
		{"snapshot-shared-refcount-one", "", func(t *testing.T, p string) {
			setRefcount(t, p, hostCluster(t, p, 64<<10), 1)
		}, 2, snapshot},
		{"bitmap-table-refcount-zero", "", func(t *testing.T, p string) {
			img := openImage(t, p, disk.OpenOptions{ReadOnly: true})
			tbl := img.(*qcow2.Image).Header().Bitmaps[0].TableOffset
			setRefcount(t, p, tbl>>16, 0)
		}, 2, withBitmap},
		{"l1-duplicate", "", func(t *testing.T, p string) {
			_, e := l1EntryAt(t, p, 0)
			at1, _ := l1EntryAt(t, p, 512<<20)
			at2, _ := l1EntryAt(t, p, 1<<30)
			patchU64(t, p, at1, e)
			patchU64(t, p, at2, e)
		}, 2, twoTables},
		{"l1-duplicate-snapshot", "", func(t *testing.T, p string) {
			qemutest.Img(t, "snapshot", "-c", "s1", p)
			_, e := l1EntryAt(t, p, 0)
			at1, _ := l1EntryAt(t, p, 512<<20)
			patchU64(t, p, at1, e)
		}, 2, twoTables},
		{"data-file-leak", "", func(t *testing.T, p string) {
			setRefcount(t, p, appendCluster(t, p), 1)
		}, 3, dataFile},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			build := tc.build
			if build == nil {
				build = base
			}
			p := build(t, tc.name, tc.opts)
			tc.damage(t, p)
			r := compareWithQemu(t, p)
			if r.ExitCode() != tc.want {
				t.Errorf("exit code %d, want %d (messages %q)", r.ExitCode(), tc.want, r.Messages)
			}
		})
	}
}

// TestCheckSnapshotRefcounts: a cluster shared with a snapshot has
// refcount 2; lowering it to 1 or 0 is an error, and the OFLAG_COPIED
// check then disagrees too.
func TestCheckSnapshotRefcounts(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	t.Parallel()
	dir := t.TempDir()
	for _, v := range []uint64{0, 1} {
		p := filepath.Join(dir, "snap.qcow2")
		os.Remove(p)
		mkqcow2(t, p, "", "4M")
		qio(t, p, "write -P 1 0 128k")
		qemutest.Img(t, "snapshot", "-c", "s1", p)
		_, e := l2EntryAt(t, p, 0)
		setRefcount(t, p, (e&0x00ff_ffff_ffff_fe00)>>16, v)
		r := compareWithQemu(t, p)
		if r.ExitCode() != 2 {
			t.Errorf("refcount %d: exit %d, want 2 (%q)", v, r.ExitCode(), r.Messages)
		}
	}
}

// TestCheckDirty: an image left dirty by an aborted writer with lazy
// refcounts is checked like any other.
func TestCheckDirty(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	t.Parallel()
	p := filepath.Join(t.TempDir(), "dirty.qcow2")
	mkqcow2(t, p, "lazy_refcounts=on", "4M")
	qemutest.Try("qemu-io", "-c", "write -P 1 0 256k", "-c", "abort", p)
	if readU64(t, p, hIncompatibleFeatures)&1 == 0 {
		t.Skip("qemu-io abort did not leave the dirty bit set")
	}
	r := compareWithQemu(t, p)
	if r.ExitCode() == 0 {
		t.Errorf("dirty image with lost refcounts checked clean")
	}
}

// TestCheckHostile: refcount structures that cannot be followed give a
// clear error or a counted finding, quickly and without huge allocations.
func TestCheckHostile(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	t.Parallel()
	dir := t.TempDir()
	cases := []struct {
		name    string
		damage  func(t *testing.T, p string)
		wantErr string // Check fails with this; "" means a result with findings
	}{
		// QEMU reads zeros for a refcount table past the end of the file
		// and reports every cluster; so does Check.
		{"reftable-past-eof", func(t *testing.T, p string) {
			patchU64(t, p, hRefcountTableOffset, 1<<40)
		}, ""},
		{"reftable-unaligned", func(t *testing.T, p string) {
			patchU64(t, p, hRefcountTableOffset, readU64(t, p, hRefcountTableOffset)+8)
		}, "refcount table"},
		{"reftable-huge", func(t *testing.T, p string) {
			patchU32(t, p, hRefcountTableClusters, 0xffffffff)
		}, "refcount_table_clusters"},
		{"refblock-far", func(t *testing.T, p string) {
			rt := int64(readU64(t, p, hRefcountTableOffset))
			patchU64(t, p, rt+8, 0x00ff_ffff_ffff_0000)
		}, ""},
		{"l2-far", func(t *testing.T, p string) {
			at, e := l2EntryAt(t, p, 0)
			patchU64(t, p, at, e&^0x00ff_ffff_ffff_fe00|0x00ff_ffff_ffff_0000)
		}, ""},
		{"l1-far", func(t *testing.T, p string) {
			at, e := l1EntryAt(t, p, 0)
			patchU64(t, p, at, e&^0x00ff_ffff_ffff_fe00|0x00ff_ffff_ffff_0000)
		}, ""},
		{"l1-all-same", func(t *testing.T, p string) {
			// A fresh 1 GiB image of 512-byte clusters: 32768 L1 entries,
			// all made to point to the first L2 table.
			os.Remove(p)
			mkqcow2(t, p, "cluster_size=512", "1G")
			qio(t, p, "write -P 1 0 8k")
			h := readRawHeader(t, p)
			e := readU64(t, p, h.l1Offset)
			b := make([]byte, 8*int(h.l1Size))
			for i := range int(h.l1Size) {
				binary.BigEndian.PutUint64(b[i*8:], e)
			}
			patchBytes(t, p, h.l1Offset, b)
		}, ""},
		{"refblock-huge", func(t *testing.T, p string) {
			rt := int64(readU64(t, p, hRefcountTableOffset))
			patchU64(t, p, rt, 1<<63)
		}, ""},
		{"refblock-at-eof", func(t *testing.T, p string) {
			rt := int64(readU64(t, p, hRefcountTableOffset))
			patchU64(t, p, rt+8, uint64(roundUp(fileSize(t, p), 1<<16)))
		}, ""},
		{"l1-unaligned", func(t *testing.T, p string) {
			at, e := l1EntryAt(t, p, 0)
			patchU64(t, p, at, e+4096)
		}, ""},
		{"l2-all-compressed-far", func(t *testing.T, p string) {
			at, _ := l2EntryAt(t, p, 0)
			b := make([]byte, 8*16)
			for i := range 16 {
				binary.BigEndian.PutUint64(b[i*8:], 1<<62|uint64(0x3fff)<<48|uint64(i)<<40)
			}
			patchBytes(t, p, at, b)
		}, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(dir, tc.name+".qcow2")
			mkqcow2(t, p, "", "4M")
			qio(t, p, "write -P 1 0 128k")
			tc.damage(t, p)
			f, err := hostfile.Open(p, true)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			var r *qcow2.CheckResult
			within(t, tc.name, func() { r, err = qcow2.Check(f, qcow2.CheckOptions{}) })
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("Check: err %v, want one mentioning %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("Check: %v", err)
			}
			if r.ExitCode() == 0 {
				t.Errorf("damaged image checked clean")
			}
			compareWithQemu(t, p)
		})
	}
}

func TestCheckMemoryLimit(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	t.Parallel()
	p := filepath.Join(t.TempDir(), "big.qcow2")
	mkqcow2(t, p, "cluster_size=512", "4M")
	if err := os.Truncate(p, 1<<30); err != nil { // a sparse 1 GiB file: 2 Mi clusters
		t.Fatal(err)
	}
	f, err := hostfile.Open(p, true)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := qcow2.Check(f, qcow2.CheckOptions{MaxMemory: 1 << 20}); err == nil || !strings.Contains(err.Error(), "memory limit") {
		t.Fatalf("Check with a 1 MiB limit on 2 Mi clusters: %v, want a memory limit error", err)
	}
}

func TestCheckJSONKeys(t *testing.T) {
	r := &qcow2.CheckResult{Filename: "a", Format: "qcow2", Leaks: 2, TotalClusters: 3}
	b, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	want := `{"filename":"a","format":"qcow2","check-errors":0,"leaks":2,"total-clusters":3}`
	if string(b) != want {
		t.Errorf("JSON %s, want %s", b, want)
	}
	for _, tc := range []struct {
		r    qcow2.CheckResult
		want int
	}{
		{qcow2.CheckResult{}, 0},
		{qcow2.CheckResult{Leaks: 1}, 3},
		{qcow2.CheckResult{Leaks: 1, Corruptions: 1}, 2},
		{qcow2.CheckResult{CheckErrors: 1, Corruptions: 1}, 1},
	} {
		if got := tc.r.ExitCode(); got != tc.want {
			t.Errorf("ExitCode(%+v) = %d, want %d", tc.r, got, tc.want)
		}
	}
}

// BenchmarkCheck checks a 256 GiB image with preallocated metadata (4 Mi
// mapped clusters) and two snapshots sharing its L2 tables.
func BenchmarkCheck(b *testing.B) {
	qemutest.Require(b, "qemu-img")
	p := filepath.Join(b.TempDir(), "big.qcow2")
	qemutest.Create(b, p, "qcow2", "preallocation=metadata", "256G")
	qemutest.Img(b, "snapshot", "-c", "s1", p)
	qemutest.Img(b, "snapshot", "-c", "s2", p)
	f, err := hostfile.Open(p, true)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	b.ResetTimer()
	for b.Loop() {
		r, err := qcow2.Check(f, qcow2.CheckOptions{})
		if err != nil || r.ExitCode() != 0 {
			b.Fatalf("Check: %v %+v", err, r)
		}
	}
}

// FuzzCheck checks (and repairs, both ways) arbitrary images held in
// memory: Check may fail or report findings, but never panic, hang or
// allocate beyond its bounds. Seeds are small images made by qemu-img.
func FuzzCheck(f *testing.F) {
	if _, err := exec.LookPath("qemu-img"); err == nil {
		dir := f.TempDir()
		for i, opts := range []string{"cluster_size=512", "cluster_size=512,refcount_bits=1", "cluster_size=512,compat=0.10", "cluster_size=16384,extended_l2=on"} {
			p := filepath.Join(dir, "seed"+string(rune('a'+i))+".qcow2")
			if _, err := qemutest.Try("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, p, "64k"); err != nil {
				f.Fatal(err)
			}
			qemutest.Try("qemu-io", "-c", "write -P 1 0 3k", "-c", "write -P 2 32k 1k", p)
			if i == 0 {
				qemutest.Try("qemu-img", "snapshot", "-c", "s", p)
				qemutest.Try("qemu-io", "-c", "write -P 3 0 1k", p)
			}
			b, err := os.ReadFile(p)
			if err != nil {
				f.Fatal(err)
			}
			f.Add(b)
			if i == 1 {
				// For the repair paths: the first refcount block zeroed
				// (a rebuild), and a dirty image with a leak.
				be := binary.BigEndian
				rt := be.Uint64(b[48:])
				rb := be.Uint64(b[rt:]) &^ 0x1ff
				zeroed := bytes.Clone(b)
				clear(zeroed[rb : rb+512])
				f.Add(zeroed)
				dirty := bytes.Clone(b)
				dirty[79] |= 1
				dirty[rb] |= 1 << 7
				f.Add(dirty)
			}
		}
	}
	f.Add([]byte("QFI\xfb\x00\x00\x00\x03"))
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) > 1<<20 {
			return
		}
		for _, mode := range []qcow2.RepairMode{qcow2.RepairNone, qcow2.RepairLeaks, qcow2.RepairAll} {
			file := hostfiletest.NewMemFile("fuzz.qcow2", data)
			r, err := qcow2.Check(file, qcow2.CheckOptions{Repair: mode, MaxMemory: 64 << 20})
			if err != nil {
				return
			}
			if c := r.ExitCode(); c < 0 || c > 3 {
				t.Fatalf("exit code %d", c)
			}
		}
	})
}
