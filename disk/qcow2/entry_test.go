package qcow2

import (
	"strings"
	"testing"
)

func TestDecodeL1(t *testing.T) {
	g := geometry{clusterBits: 16, version: 3, fileSize: 1 << 20, dataSize: 1 << 20}
	tests := []struct {
		name  string
		entry uint64
		want  uint64
		bad   string // substring of the complaint, "" for a valid entry
	}{
		{"unallocated", 0, 0, ""},
		{"copied only", 1 << 63, 0, ""},
		{"table", 0x30000, 0x30000, ""},
		{"table copied", 1<<63 | 0x30000, 0x30000, ""},
		{"last cluster", 0xf0000, 0xf0000, ""},
		{"reserved low bit", 0x30001, 0, "reserved"},
		{"reserved bit 8", 0x30100, 0, "reserved"},
		{"reserved bit 56", 1<<56 | 0x30000, 0, "reserved"},
		{"reserved bit 62", 1<<62 | 0x30000, 0, "reserved"},
		{"unaligned", 0x30200, 0, "aligned"},
		{"at end of file", 0x100000, 0, "past the end"},
		{"past end of file", 0x7f0000, 0, "past the end"},
		{"huge", 0x00ff_ffff_ffff_0000, 0, "past the end"},
	}
	for _, tc := range tests {
		got, bad := g.decodeL1(tc.entry)
		if !matches(bad, tc.bad) || (tc.bad == "" && got != tc.want) {
			t.Errorf("%s: decodeL1(%#x) = %#x, %q; want %#x, %q", tc.name, tc.entry, got, bad, tc.want, tc.bad)
		}
	}
}

func matches(got, want string) bool {
	if want == "" {
		return got == ""
	}
	return strings.Contains(got, want)
}

func TestDecodeL2(t *testing.T) {
	v3 := geometry{clusterBits: 16, version: 3, fileSize: 1 << 20, dataSize: 1 << 20}
	v2 := v3
	v2.version = 2
	ext := v3
	ext.extended = true
	df := v3
	df.dataFile, df.dataSize = true, 1<<30
	small := geometry{clusterBits: 9, version: 3, fileSize: 1 << 20, dataSize: 1 << 20}

	tests := []struct {
		name   string
		g      geometry
		word   uint64
		bitmap uint64
		want   l2Entry
		bad    string
	}{
		{"unallocated", v3, 0, 0, l2Entry{kind: kindUnallocated}, ""},
		{"normal", v3, 1<<63 | 0x50000, 0, l2Entry{kind: kindNormal, host: 0x50000}, ""},
		{"normal needing COW", v3, 0x50000, 0, l2Entry{kind: kindNormal, host: 0x50000}, ""},
		{"zero plain", v3, 1, 0, l2Entry{kind: kindZero}, ""},
		{"zero alloc", v3, 1<<63 | 0x50000 | 1, 0, l2Entry{kind: kindZeroAlloc, host: 0x50000}, ""},
		{"zero alloc past EOF", v3, 0x7f0000 | 1, 0, l2Entry{kind: kindZeroAlloc, host: 0x7f0000}, ""},
		{"zero flag in v2", v2, 0x50000 | 1, 0, l2Entry{}, "zero flag"},
		{"zero flag with extended L2", ext, 0x50000 | 1, 0, l2Entry{}, "zero flag"},
		{"reserved bit 1", v3, 0x50002, 0, l2Entry{}, "reserved"},
		{"reserved bit 8", v3, 0x50100, 0, l2Entry{}, "reserved"},
		{"reserved bit 56", v3, 1<<56 | 0x50000, 0, l2Entry{}, "reserved"},
		{"reserved bit 61", v3, 1<<61 | 0x50000, 0, l2Entry{}, "reserved"},
		{"unaligned", v3, 0x50200, 0, l2Entry{}, "aligned"},
		{"past EOF", v3, 0x100000, 0, l2Entry{}, "past the end"},
		{"offset 0 copied", v3, 1 << 63, 0, l2Entry{}, "host offset 0"},
		{"data file offset 0", df, 1 << 63, 0, l2Entry{kind: kindNormal}, ""},
		{"data file beyond image", df, 1<<63 | 0x7f0000, 0, l2Entry{kind: kindNormal, host: 0x7f0000}, ""},
		{"data file compressed", df, 1<<62 | 0x1000, 0, l2Entry{}, "external data file"},

		{"extended normal", ext, 1<<63 | 0x50000, 0x3, l2Entry{kind: kindNormal, host: 0x50000, bitmap: 3}, ""},
		{"extended all zero", ext, 0, 0xffffffff << 32, l2Entry{kind: kindUnallocated, bitmap: 0xffffffff << 32}, ""},
		{"extended unallocated with host", ext, 0x7f0000, 0, l2Entry{kind: kindNormal, host: 0x7f0000}, ""},
		{"extended alloc and zero", ext, 0x50000, 1<<32 | 1, l2Entry{}, "both allocated and zero"},
		{"extended alloc without host", ext, 0, 1, l2Entry{}, "unallocated cluster"},
		{"extended alloc past EOF", ext, 0x7f0000, 1, l2Entry{}, "past the end"},
		{"extended compressed bitmap", ext, 1<<62 | 0x1000, 1, l2Entry{}, "bitmap"},

		// 64 KiB clusters: x = 62 - 8 = 54; the sector count is bits 54-61.
		{"compressed", v3, 1<<62 | 3<<54 | 0x1234, 0, l2Entry{kind: kindCompressed, host: 0x1234, csize: 4*512 - 0x34}, ""},
		{"compressed aligned", v3, 1<<62 | 0x1400, 0, l2Entry{kind: kindCompressed, host: 0x1400, csize: 512}, ""},
		{"compressed max sectors", v3, 1<<62 | 0xff<<54 | 0x1200, 0, l2Entry{kind: kindCompressed, host: 0x1200, csize: 256 * 512}, ""},
		{"compressed copied", v3, 3<<62 | 0x1234, 0, l2Entry{}, "copied"},
		{"compressed at 0", v3, 1 << 62, 0, l2Entry{}, "outside the file"},
		{"compressed past EOF", v3, 1<<62 | 0x100000, 0, l2Entry{}, "outside the file"},
		// 512-byte clusters: x = 61, one sector-count bit; offset bits
		// 56-60 must be zero.
		{"compressed small clusters", small, 1<<62 | 1<<61 | 0x2345, 0, l2Entry{kind: kindCompressed, host: 0x2345, csize: 2*512 - 0x145}, ""},
		{"compressed offset above bit 55", small, 1<<62 | 1<<56 | 0x2345, 0, l2Entry{}, "above 55"},
	}
	for _, tc := range tests {
		got, bad := tc.g.decodeL2(tc.word, tc.bitmap)
		if !matches(bad, tc.bad) || (tc.bad == "" && got != tc.want) {
			t.Errorf("%s: decodeL2(%#x, %#x) = %+v, %q; want %+v, %q", tc.name, tc.word, tc.bitmap, got, bad, tc.want, tc.bad)
		}
	}
}

func TestSubcluster(t *testing.T) {
	std := geometry{clusterBits: 16, version: 3}
	ext := geometry{clusterBits: 16, version: 3, extended: true}
	tests := []struct {
		name      string
		g         geometry
		e         l2Entry
		sc        uint
		wantKind  clusterKind
		wantCount uint
	}{
		{"standard cluster is one unit", std, l2Entry{kind: kindNormal, host: 0x10000}, 0, kindNormal, 1},
		{"compressed has no subclusters", ext, l2Entry{kind: kindCompressed}, 3, kindCompressed, 29},
		{"first allocated", ext, l2Entry{kind: kindNormal, host: 0x10000, bitmap: 0b0111}, 0, kindNormal, 3},
		{"middle allocated", ext, l2Entry{kind: kindNormal, host: 0x10000, bitmap: 0b0111}, 1, kindNormal, 2},
		{"unallocated tail", ext, l2Entry{kind: kindNormal, host: 0x10000, bitmap: 0b0111}, 3, kindUnallocated, 29},
		{"zero alloc", ext, l2Entry{kind: kindNormal, host: 0x10000, bitmap: 0b11 << 32}, 0, kindZeroAlloc, 2},
		{"zero plain", ext, l2Entry{kind: kindUnallocated, bitmap: 0b1100 << 32}, 2, kindZero, 2},
		{"gap before zero", ext, l2Entry{kind: kindUnallocated, bitmap: 0b1100 << 32}, 0, kindUnallocated, 2},
		{"all allocated", ext, l2Entry{kind: kindNormal, host: 0x10000, bitmap: 0xffffffff}, 0, kindNormal, 32},
		{"last subcluster", ext, l2Entry{kind: kindNormal, host: 0x10000, bitmap: 1 << 31}, 31, kindNormal, 1},
		{"mixed", ext, l2Entry{kind: kindNormal, host: 0x10000, bitmap: 0b0110<<32 | 0b1001}, 1, kindZeroAlloc, 2},
	}
	for _, tc := range tests {
		kind, count := tc.g.subcluster(tc.e, tc.sc)
		if kind != tc.wantKind || count != tc.wantCount {
			t.Errorf("%s: subcluster(%d) = %v, %d; want %v, %d", tc.name, tc.sc, kind, count, tc.wantKind, tc.wantCount)
		}
	}
}

func TestRunAdd(t *testing.T) {
	r := run{host: -1, cluster: -1}
	steps := []struct {
		kind   clusterKind
		length int64
		host   int64
		want   bool
	}{
		{kindNormal, 100, 1000, true},
		{kindNormal, 50, 1100, true},     // contiguous
		{kindNormal, 50, 2000, false},    // not contiguous
		{kindZero, 50, -1, false},        // other kind
		{kindZeroAlloc, 50, 1150, false}, // other kind, even if contiguous
	}
	for i, s := range steps {
		if got := r.add(s.kind, s.length, s.host); got != s.want {
			t.Errorf("step %d: add = %v, want %v", i, got, s.want)
		}
	}
	if r.length != 150 || r.host != 1000 {
		t.Errorf("run = %+v, want 150 bytes at 1000", r)
	}
	z := run{host: -1}
	for range 2 {
		if !z.add(kindZero, 10, -1) {
			t.Errorf("zero run refused a zero piece: %+v", z)
		}
	}
	if z.length != 20 {
		t.Errorf("zero runs do not merge: %+v", z)
	}
	c := run{host: -1}
	if !c.add(kindCompressed, 10, 5000) || c.add(kindCompressed, 10, 5010) {
		t.Errorf("compressed runs merged: %+v", c)
	}
}

func TestResolveName(t *testing.T) {
	tests := []struct{ image, name, want string }{
		{"/a/b/top.qcow2", "base.qcow2", "/a/b/base.qcow2"},
		{"/a/b/top.qcow2", "/c/base.qcow2", "/c/base.qcow2"},
		{"sub/top.qcow2", "../base.qcow2", "sub/../base.qcow2"},
		{"top.qcow2", "base.qcow2", "base.qcow2"},
		{"", "base.qcow2", "base.qcow2"},
	}
	for _, tc := range tests {
		if got := resolveName(tc.image, tc.name); got != tc.want {
			t.Errorf("resolveName(%q, %q) = %q, want %q", tc.image, tc.name, got, tc.want)
		}
	}
	for name, want := range map[string]bool{
		"base.qcow2": false, "/x/y:z": false, "json:{}": true, "nbd://host/x": true, "file:x": true, "a/b:c": false,
	} {
		if got := isProtocolName(name); got != want {
			t.Errorf("isProtocolName(%q) = %v, want %v", name, got, want)
		}
	}
}
