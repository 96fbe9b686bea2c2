package qcow2

import (
	"encoding/binary"
	"errors"
	"path/filepath"
	"testing"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/disk/hostfile"
	"github.com/imgloop/imgloop/disk/hostfile/hostfiletest"
	"github.com/imgloop/imgloop/internal/qemutest"
)

func TestRefcountEntryDecoding(t *testing.T) {
	// One byte 0b1011_0110 and its decoding per order below 3 (entries
	// packed from the least significant bit).
	b := []byte{0xb6, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f}
	cases := []struct {
		order uint
		i     uint64
		want  uint64
	}{
		{0, 0, 0}, {0, 1, 1}, {0, 2, 1}, {0, 3, 0}, {0, 4, 1}, {0, 5, 1}, {0, 6, 0}, {0, 7, 1}, {0, 8, 1},
		{1, 0, 2}, {1, 1, 1}, {1, 2, 3}, {1, 3, 2}, {1, 4, 1},
		{2, 0, 6}, {2, 1, 0xb}, {2, 2, 1}, {2, 3, 0},
		{3, 0, 0xb6}, {3, 15, 0x0f},
		{4, 0, 0xb601}, {4, 1, 0x0203},
		{5, 1, 0x04050607},
		{6, 1, 0x08090a0b0c0d0e0f},
	}
	for _, tc := range cases {
		if got := refcountEntry(b, tc.order, tc.i); got != tc.want {
			t.Errorf("order %d entry %d = %#x, want %#x", tc.order, tc.i, got, tc.want)
		}
	}
}

func TestRefcountMax(t *testing.T) {
	for order, want := range []uint64{1, 3, 15, 255, 65535, 1<<32 - 1, 1<<64 - 1} {
		rt := &refcountTable{order: uint(order)}
		if got := rt.maxRefcount(); got != want {
			t.Errorf("order %d: max %#x, want %#x", order, got, want)
		}
	}
}

// memTable builds a refcount table over an in-memory file of fileSize
// bytes with 1 KiB clusters and 16-bit refcounts (512 per block).
func memTable(entries []uint64, fileSize int, fill func(b []byte)) *refcountTable {
	content := make([]byte, fileSize)
	fill(content)
	return &refcountTable{
		f:           hostfileMem(content),
		fileSize:    int64(fileSize),
		clusterBits: 10,
		order:       4,
		entries:     entries,
	}
}

func hostfileMem(b []byte) disk.File { return hostfiletest.NewMemFile("mem", b) }

func TestRefcountLookup(t *testing.T) {
	fill := func(b []byte) {
		// Block at 0x400: cluster k has refcount k+1.
		for k := range 512 {
			binary.BigEndian.PutUint16(b[0x400+2*k:], uint16(k+1))
		}
	}
	rt := memTable([]uint64{0x400, 0, 0x600, 0x800 | 1, 0x10000, 0x800}, 0xc00, fill)
	cases := []struct {
		cluster uint64
		want    uint64
		bad     string // error text, "" for none
	}{
		{0, 1, ""},
		{511, 512, ""},
		{512, 0, ""},               // table entry 0
		{1024, 0, "not cluster"},   // unaligned block
		{1536, 0, "reserved bits"}, // reserved bits
		{2048, 0, "past the end"},  // block past EOF
		{2560, 0, ""},              // block of zeros
		{1 << 40, 0, ""},           // past the table
	}
	for _, tc := range cases {
		got, err := rt.Refcount(tc.cluster)
		switch {
		case tc.bad == "" && err != nil:
			t.Errorf("cluster %d: %v", tc.cluster, err)
		case tc.bad != "" && (err == nil || !errors.Is(err, disk.ErrCorrupt) || !contains(err.Error(), tc.bad)):
			t.Errorf("cluster %d: err %v, want a corruption error mentioning %q", tc.cluster, err, tc.bad)
		case got != tc.want:
			t.Errorf("cluster %d: refcount %d, want %d", tc.cluster, got, tc.want)
		}
	}
}

func contains(s, sub string) bool {
	for i := 0; i+len(sub) <= len(s); i++ {
		if s[i:i+len(sub)] == sub {
			return true
		}
	}
	return false
}

func TestReadAtZero(t *testing.T) {
	f := hostfileMem([]byte{1, 2, 3, 4})
	for _, tc := range []struct {
		off  int64
		n    int
		want []byte
	}{
		{0, 4, []byte{1, 2, 3, 4}},
		{2, 4, []byte{3, 4, 0, 0}},
		{4, 2, []byte{0, 0}},
		{1 << 50, 2, []byte{0, 0}},
	} {
		p := make([]byte, tc.n)
		for i := range p {
			p[i] = 0xee
		}
		if err := readAtZero(f, p, tc.off, 4); err != nil {
			t.Fatal(err)
		}
		if string(p) != string(tc.want) {
			t.Errorf("readAtZero(%d, %d) = %v, want %v", tc.off, tc.n, p, tc.want)
		}
	}
}

// TestRefcountQemuImages reads every host cluster's refcount of images
// made by qemu-img with each refcount width and checks them against
// references computed independently: a clean image's refcounts equal its
// references, which Check verifies cluster by cluster.
func TestRefcountQemuImages(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	t.Parallel()
	dir := t.TempDir()
	for _, bits := range []string{"1", "2", "4", "8", "16", "32", "64"} {
		p := filepath.Join(dir, "rb"+bits+".qcow2")
		qemutest.Create(t, p, "qcow2", "cluster_size=4096,refcount_bits="+bits, "1M")
		qemutest.IO(t, p, "qcow2", "write -P 1 0 64k")
		f, err := hostfile.Open(p, true)
		if err != nil {
			t.Fatal(err)
		}
		size, _ := f.Size()
		h, err := readHeader(f, size)
		if err != nil {
			t.Fatal(err)
		}
		rt, err := readRefcountTable(f, h, size)
		if err != nil {
			t.Fatal(err)
		}
		// The header cluster, the refcount table and the first refcount
		// block have refcount 1; past the end of the file, 0.
		for _, k := range []uint64{0, h.RefcountTableOffset >> 12, rt.entries[0] >> 12} {
			if rc, err := rt.Refcount(k); err != nil || rc != 1 {
				t.Errorf("refcount_bits=%s: cluster %d: refcount %d, %v; want 1", bits, k, rc, err)
			}
		}
		if rc, err := rt.Refcount(uint64(size)>>12 + 1); err != nil || rc != 0 {
			t.Errorf("refcount_bits=%s: past EOF: refcount %d, %v; want 0", bits, rc, err)
		}
		r, err := Check(f, CheckOptions{})
		if err != nil || r.ExitCode() != 0 {
			t.Errorf("refcount_bits=%s: Check: %v %+v", bits, err, r)
		}
		f.Close()
	}
}
