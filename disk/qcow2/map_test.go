package qcow2

import (
	"errors"
	"fmt"
	"path/filepath"
	"testing"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/internal/qemutest"
)

// mapSpan is one range of a map, in qemu-img map's terms.
type mapSpan struct {
	start, end          int64
	present, zero, data bool
	depth               int
	offset              int64 // -1 if none
}

func (s mapSpan) String() string {
	return fmt.Sprintf("[%#x,%#x) present=%v zero=%v data=%v depth=%d offset=%#x",
		s.start, s.end, s.present, s.zero, s.data, s.depth, s.offset)
}

// merge joins adjacent spans that qemu-img map would print as one.
func merge(in []mapSpan) []mapSpan {
	var out []mapSpan
	for _, s := range in {
		if n := len(out); n > 0 {
			p := &out[n-1]
			same := p.present == s.present && p.zero == s.zero && p.data == s.data && p.depth == s.depth
			contiguous := (p.offset < 0 && s.offset < 0) || (p.offset >= 0 && s.offset >= 0 && p.offset+p.end-p.start == s.offset)
			if same && contiguous && p.end == s.start {
				p.end = s.end
				continue
			}
		}
		out = append(out, s)
	}
	return out
}

// compareMap compares img's extents with `qemu-img map --output=json` of
// the image at p, after merging the ranges qemu-img would print as one.
func compareMap(t *testing.T, img *Image, p string) {
	t.Helper()
	var got []mapSpan
	err := disk.Extents(img, 0, img.Size(), func(e disk.Extent) error {
		got = append(got, mapSpan{e.Offset, e.Offset + e.Length, e.Status&disk.StatusAllocated != 0,
			e.Status&disk.StatusZero != 0, e.Status&disk.StatusData != 0, e.Depth, e.HostOffset})
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	var want []mapSpan
	for _, e := range qemutest.Map(t, p) {
		s := mapSpan{e.Start, e.Start + e.Length, e.Present, e.Zero, e.Data, e.Depth, -1}
		// qemu-img also prints the host offset of unallocated
		// subclusters of an allocated cluster; imgloop does not.
		if e.Offset != nil && e.Present {
			s.offset = *e.Offset
		}
		want = append(want, s)
	}
	got, want = merge(got), merge(want)
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("map of %s differs from qemu-img:\n got  %v\n want %v", filepath.Base(p), got, want)
	}
}

// TestMapMatchesQemu compares Map with `qemu-img map --output=json`.
func TestMapMatchesQemu(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	qemutest.Create(t, base, "qcow2", "cluster_size=4096", "3M")
	qemutest.IO(t, base, "qcow2", "write -P 0x11 0 1M", "write -z 1M 64k")
	// A compressed layer in the middle.
	data := qemutest.Compressible(3, 2<<20)
	clear(data[512<<10 : 768<<10]) // a hole showing the base
	src := writeFile(t, dir, "src.raw", data)
	mid := filepath.Join(dir, "mid.qcow2")
	qemutest.Img(t, "convert", "-c", "-f", "raw", "-O", "qcow2", src, mid)
	qemutest.Img(t, "rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", mid)
	qemutest.IO(t, mid, "qcow2", "discard 0 256k", "write -z 1M 64k", "write -P 0x22 1536k 64k")
	qemutest.Img(t, "resize", mid, "4M")
	top := filepath.Join(dir, "top.qcow2")
	qemutest.Create(t, top, "qcow2", "extended_l2=on,preallocation=off", "5M", "-b", "mid.qcow2", "-F", "qcow2")
	qemutest.IO(t, top, "qcow2", "write -P 0x33 4096 4096", "write -z 65536 8192", "write -P 0x44 4M 100k",
		"write -z 4500000 100000")

	for _, p := range []string{base, mid, top} {
		t.Run(filepath.Base(p), func(t *testing.T) {
			compareMap(t, openImage(t, p, disk.OpenOptions{ReadOnly: true}), p)
		})
	}

	img := openImage(t, top, disk.OpenOptions{ReadOnly: true})
	// Every extent starts at off and stays within n.
	for _, tc := range []struct{ off, n int64 }{{0, 1}, {4095, 2}, {4096, 100}, {65536 + 100, 1}, {5<<20 - 1, 1}} {
		e, err := img.Map(tc.off, tc.n)
		if err != nil || e.Offset != tc.off || e.Length <= 0 || e.Length > tc.n {
			t.Errorf("Map(%d, %d) = %+v, %v", tc.off, tc.n, e, err)
		}
	}
	for _, tc := range []struct{ off, n int64 }{{-1, 1}, {0, 5<<20 + 1}, {5 << 20, 1}, {0, 0}} {
		if _, err := img.Map(tc.off, tc.n); !errors.Is(err, disk.ErrOutOfRange) {
			t.Errorf("Map(%d, %d) = %v, want ErrOutOfRange", tc.off, tc.n, err)
		}
	}

	// Locate follows the chain.
	clusterOf := func(p string, off int64) int64 {
		t.Helper()
		for _, e := range qemutest.Map(t, p) {
			if e.Start <= off && off < e.Start+e.Length && e.Offset != nil {
				return *e.Offset + off - e.Start
			}
		}
		t.Fatalf("qemu-img map of %s has no offset for %#x", p, off)
		return 0
	}
	tests := []struct {
		off      int64
		typ      string
		depth    int
		file     string
		host     int64 // -1: none; -2: as qemu-img map says, rounded down to the cluster
		inClust  int64
		compSize bool
	}{
		{4096 + 10, "normal", 0, top, -2, 4096 + 10, false},
		{65536 + 10, "zero", 0, "", -1, 10, false},
		{4<<20 + 5, "normal", 0, top, -2, 5, false},
		{4500000 + 70000, "zero", 0, "", -1, (4500000 + 70000) % 65536, false},
		{256 << 10, "compressed", 1, mid, -3, 0, true},
		{100, "zero", 1, "", -1, 100, false}, // discarded over a backing file
		{1<<20 + 100, "zero", 1, "", -1, 100, false},
		{1536<<10 + 7, "normal", 1, mid, -2, 7, false},
		{600 << 10, "normal", 2, base, -2, 600 << 10 % 65536, false},
		{2<<20 + 5, "zero", 1, "", -1, 5, false},                                // zeroed by the resize too
		{3<<20 + 5, "zero", 1, "", -1, 5, false},                                // qemu-img resize zeroed the new part
		{4<<20 + 200<<10, "unallocated", 0, "", -1, (200 << 10) % 65536, false}, // past mid's end
	}
	for _, tc := range tests {
		loc, err := img.Locate(tc.off)
		if err != nil {
			t.Errorf("Locate(%#x): %v", tc.off, err)
			continue
		}
		want := Location{Offset: tc.off, ClusterType: tc.typ, HostClusterOffset: tc.host, OffsetInCluster: tc.inClust,
			Depth: tc.depth, File: tc.file}
		if tc.depth == 2 {
			want.OffsetInCluster = tc.off % 4096 // base has 4 KiB clusters
		}
		switch tc.host {
		case -2:
			// The cluster holding the byte: qemu-img map's offset for it,
			// rounded down.
			var p string
			switch tc.depth {
			case 0:
				p = top
			case 1:
				p = mid
			default:
				p = base
			}
			want.HostClusterOffset = clusterOf(p, tc.off) - want.OffsetInCluster
		case -3:
			want.HostClusterOffset = loc.HostClusterOffset
			if loc.HostClusterOffset <= 0 {
				t.Errorf("Locate(%#x): compressed cluster at %d", tc.off, loc.HostClusterOffset)
			}
		}
		if tc.compSize {
			want.CompressedLength = loc.CompressedLength
			if loc.CompressedLength <= 0 || loc.CompressedLength > 2*65536 {
				t.Errorf("Locate(%#x): compressed length %d", tc.off, loc.CompressedLength)
			}
		}
		if loc != want {
			t.Errorf("Locate(%#x) =\n %+v, want\n %+v", tc.off, loc, want)
		}
	}
	if _, err := img.Locate(5 << 20); !errors.Is(err, disk.ErrOutOfRange) {
		t.Errorf("Locate(size) = %v, want ErrOutOfRange", err)
	}
}

// TestMapHostHoles: where the host file has holes under allocated
// clusters, Map reports zeros exactly where qemu-img map does: in images
// QEMU takes to be preallocated (preallocation=metadata), and not in
// others (QEMU's threshold, qcow2_detect_metadata_preallocation).
func TestMapHostHoles(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	prealloc := filepath.Join(dir, "prealloc.qcow2")
	qemutest.Create(t, prealloc, "qcow2", "preallocation=metadata", "8M")
	written := filepath.Join(dir, "written.qcow2")
	qemutest.Create(t, written, "qcow2", "preallocation=metadata,cluster_size=4096", "4M")
	qemutest.IO(t, written, "qcow2", "write -P 1 0 100k", "write -P 2 1M 3k", "write -z 2M 64k")
	// COW areas left as host holes, in an image that is not preallocated
	// (qemu-img map reports no zeros there) and in one whose discards
	// make it look preallocated (it does).
	cow := filepath.Join(dir, "cow.qcow2")
	qemutest.Create(t, cow, "qcow2", "", "16M")
	qemutest.IO(t, cow, "qcow2", "write -P 0x77 4097k 3k")
	mixed := filepath.Join(dir, "mixed.qcow2")
	qemutest.Create(t, mixed, "qcow2", "cluster_size=65536", "12M")
	qemutest.IO(t, mixed, "qcow2", "write -P 0xaa 0 1M", "write -P 0x55 3M 64k", "write -z 1M 128k",
		"write -c -P 0x11 8M 256k", "discard 0 64k", "write -P 0x77 4097k 3k")
	for _, p := range []string{prealloc, written, cow, mixed} {
		t.Run(filepath.Base(p), func(t *testing.T) {
			compareMap(t, openImage(t, p, disk.OpenOptions{ReadOnly: true}), p)
		})
	}
}
