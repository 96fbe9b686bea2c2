package qcow2

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/disk/hostfile"
	"github.com/imgloop/imgloop/internal/qemutest"
)

// snapshotImage creates an image with opts and four snapshots, "one",
// "two", "1" (ID 3: its name is another snapshot's ID) and "with space",
// with data written between them.
func snapshotImage(t *testing.T, dir, opts string) string {
	t.Helper()
	path := createImage(t, dir, "snap.qcow2", opts, "4M")
	for i, name := range []string{"one", "two", "1", "with space"} {
		qemutest.IO(t, path, "qcow2", "write -P "+string(rune('1'+i))+" "+[]string{"0", "65536", "131072", "1048576"}[i]+" 64k")
		qemutest.Img(t, "snapshot", "-c", name, path)
	}
	return path
}

// parseSnapshots parses the header and the snapshot table of b.
func parseSnapshots(b []byte) ([]SnapshotEntry, error) {
	h, err := parseBytes(b)
	if err != nil {
		return nil, err
	}
	return readSnapshots(bytes.NewReader(b), h, int64(len(b)))
}

func TestReadSnapshots(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	for _, opts := range []string{"", "compat=0.10", "cluster_size=512", "cluster_size=2M,extended_l2=on"} {
		t.Run(opts, func(t *testing.T) {
			dir := t.TempDir()
			path := snapshotImage(t, dir, opts)
			b := readFile(t, path)
			list, err := parseSnapshots(b)
			if err != nil {
				t.Fatal(err)
			}
			if len(list) != 4 {
				t.Fatalf("%d snapshots, want 4", len(list))
			}
			var infos []disk.Snapshot
			for i, s := range list {
				if s.DiskSize != 4<<20 {
					t.Errorf("snapshot %d: disk size %d, want %d", i, s.DiskSize, 4<<20)
				}
				if s.L1Size == 0 || s.L1TableOffset == 0 {
					t.Errorf("snapshot %d: L1 table %d entries at %#x", i, s.L1Size, s.L1TableOffset)
				}
				if info := s.Info(); info.VirtualSize != 4<<20 {
					t.Errorf("snapshot %d: Info().VirtualSize %d", i, info.VirtualSize)
				}
				infos = append(infos, s.Info())
			}
			info := qemutest.Info(t, path)
			if got, want := asJSON(t, infos), info["snapshots"]; !reflect.DeepEqual(got, want) {
				t.Errorf("snapshots:\n got %v\nwant %v", got, want)
			}
			// qemu-img snapshot -l: ID and tag columns.
			out := qemutest.Img(t, "snapshot", "-l", path)
			for _, s := range list {
				found := false
				for _, line := range strings.Split(out, "\n") {
					if strings.HasPrefix(line, s.ID+" ") && strings.Contains(line, " "+s.Name+" ") {
						found = true
					}
				}
				if !found {
					t.Errorf("snapshot %s %q not in qemu-img snapshot -l:\n%s", s.ID, s.Name, out)
				}
			}
			// "1" is snapshot 1's ID and snapshot 3's name: the ID wins.
			for _, tt := range []struct{ key, id string }{{"1", "1"}, {"one", "1"}, {"two", "2"}, {"3", "3"}, {"with space", "4"}} {
				s, err := findSnapshot(list, tt.key)
				if err != nil || s.ID != tt.id {
					t.Errorf("findSnapshot(%q) = %+v, %v; want ID %s", tt.key, s, err, tt.id)
				}
			}
		})
	}
}

// TestSnapshotInfoFields rewrites the times, VM state size and icount of
// snapshot entries and checks that Info reports them as qemu-img does.
func TestSnapshotInfoFields(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	path := snapshotImage(t, dir, "")
	b := readFile(t, path)
	list, err := parseSnapshots(b)
	if err != nil {
		t.Fatal(err)
	}
	be := binary.BigEndian
	// Snapshot 0: large clock, a 64-bit VM state size, an icount.
	e := list[0].Offset
	be.PutUint32(b[e+16:], 0xfffffff0)   // date_sec
	be.PutUint32(b[e+20:], 999999999)    // date_nsec
	be.PutUint64(b[e+24:], 123456789012) // vm_clock_nsec
	be.PutUint32(b[e+32:], 0)            // 32-bit vm_state_size, overridden
	be.PutUint64(b[e+40:], 5<<32)        // vm_state_size_large
	be.PutUint64(b[e+56:], 424242)       // icount
	// Snapshot 1: icount "none".
	e = list[1].Offset
	be.PutUint64(b[e+56:], ^uint64(0))
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	list, err = parseSnapshots(b)
	if err != nil {
		t.Fatal(err)
	}
	s := list[0]
	if s.VMStateSize != 5<<32 || s.VMClockNsec != 123456789012 || s.ICount == nil || *s.ICount != 424242 {
		t.Errorf("snapshot 0: %+v", s)
	}
	if list[1].ICount != nil {
		t.Errorf("snapshot 1: icount %d, want none", *list[1].ICount)
	}
	var infos []disk.Snapshot
	for _, s := range list {
		infos = append(infos, s.Info())
	}
	info := qemutest.Info(t, path)
	if got, want := asJSON(t, infos), info["snapshots"]; !reflect.DeepEqual(got, want) {
		t.Errorf("snapshots:\n got %v\nwant %v", got, want)
	}
}

// TestSnapshotAfterResize checks that a snapshot keeps the disk size it
// was taken with after the image grows.
func TestSnapshotAfterResize(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	path := createImage(t, t.TempDir(), "r.qcow2", "", "4M")
	qemutest.Img(t, "snapshot", "-c", "small", path)
	qemutest.Img(t, "resize", "-q", path, "3G")
	b := readFile(t, path)
	h, err := parseBytes(b)
	if err != nil {
		t.Fatal(err)
	}
	list, err := readSnapshots(bytes.NewReader(b), h, int64(len(b)))
	if err != nil {
		t.Fatal(err)
	}
	if h.Size != 3<<30 || len(list) != 1 || list[0].DiskSize != 4<<20 || list[0].L1Size != 1 || h.L1Size < 6 {
		t.Errorf("size %d, l1_size %d, snapshots %+v", h.Size, h.L1Size, list)
	}
}

func TestFindSnapshot(t *testing.T) {
	list := []SnapshotEntry{{ID: "1", Name: "a"}, {ID: "2", Name: "1"}, {ID: "3", Name: "b"}, {ID: "4", Name: "b"}}
	tests := []struct {
		key, id string
		err     error
	}{
		{"1", "1", nil},
		{"2", "2", nil},
		{"a", "1", nil},
		{"b", "3", nil},
		{"x", "", ErrSnapshotNotFound},
		{"", "", ErrSnapshotNotFound},
	}
	for _, tt := range tests {
		s, err := findSnapshot(list, tt.key)
		if tt.err != nil {
			if !errors.Is(err, tt.err) || !strings.Contains(err.Error(), `"`+tt.key+`"`) {
				t.Errorf("findSnapshot(%q): error %v, want %v naming the key", tt.key, err, tt.err)
			}
			continue
		}
		if err != nil || s.ID != tt.id {
			t.Errorf("findSnapshot(%q) = %+v, %v; want ID %s", tt.key, s, err, tt.id)
		}
	}
	if _, err := findSnapshot(nil, "1"); !errors.Is(err, ErrSnapshotNotFound) {
		t.Errorf("empty list: %v", err)
	}
}

func TestSnapshotInfoClock(t *testing.T) {
	one := uint64(7)
	s := SnapshotEntry{ID: "9", Name: "n", DateSec: 1700000000, DateNsec: 5, VMClockNsec: 3_500_000_000,
		VMStateSize: 1 << 40, DiskSize: 1 << 30, ICount: &one}
	want := disk.Snapshot{ID: "9", Name: "n", VMStateSize: 1 << 40, DateSec: 1700000000, DateNsec: 5,
		VMClockSec: 3, VMClockNsec: 500_000_000, ICount: &one, VirtualSize: 1 << 30}
	if got := s.Info(); !reflect.DeepEqual(got, want) {
		t.Errorf("Info() = %+v, want %+v", got, want)
	}
	if got := s.Info(); got.ICount == s.ICount {
		t.Errorf("Info shares the ICount pointer")
	}
}

// snapTable builds a synthetic image for readSnapshots: 512-byte clusters,
// the snapshot table at 0x200 made of entries, then pad bytes of zeros.
type snapEntry struct {
	l1Offset  uint64
	l1Size    uint32
	id, name  string
	extra     []byte
	idSize    int // overrides len(id) when > 0
	extraSize int // overrides len(extra) when > 0
}

func snapTable(entries []snapEntry, pad int) (*Header, []byte) {
	b := make([]byte, 0x200)
	for _, e := range entries {
		for len(b)%8 != 0 {
			b = append(b, 0)
		}
		var h [40]byte
		be := binary.BigEndian
		be.PutUint64(h[0:], e.l1Offset)
		be.PutUint32(h[8:], e.l1Size)
		idSize := len(e.id)
		if e.idSize > 0 {
			idSize = e.idSize
		}
		be.PutUint16(h[12:], uint16(idSize))
		be.PutUint16(h[14:], uint16(len(e.name)))
		extraSize := len(e.extra)
		if e.extraSize > 0 {
			extraSize = e.extraSize
		}
		be.PutUint32(h[36:], uint32(extraSize))
		b = append(b, h[:]...)
		b = append(b, e.extra...)
		b = append(b, e.id...)
		b = append(b, e.name...)
	}
	b = append(b, make([]byte, pad)...)
	h := &Header{Version: 3, ClusterBits: 9, NbSnapshots: uint32(len(entries)), SnapshotsOffset: 0x200}
	return h, b
}

// TestReadSnapshotsHostile reads damaged snapshot tables: a damaged
// table is refused, while a damaged entry's L1 table is refused only
// when the snapshot is used (checkL1), so that the active image stays
// readable, as in QEMU.
func TestReadSnapshotsHostile(t *testing.T) {
	extra16 := make([]byte, 16)
	good := snapEntry{l1Offset: 0x200, l1Size: 1, id: "1", name: "a", extra: extra16}
	tests := []struct {
		name    string
		entries []snapEntry
		pad     int
		edit    func(h *Header, b []byte) []byte
		text    string // in readSnapshots's error ("l1 ..." cases: checkL1's)
	}{
		{"valid", []snapEntry{good, good}, 0, nil, ""},
		{"count past EOF", []snapEntry{good}, 0, func(h *Header, b []byte) []byte { h.NbSnapshots = 3; return b }, "end of the file"},
		{"count limit", []snapEntry{good}, 0, func(h *Header, b []byte) []byte { h.NbSnapshots = 65537; return b }, "nb_snapshots"},
		{"table unaligned", []snapEntry{good}, 0, func(h *Header, b []byte) []byte { h.SnapshotsOffset = 0x208; return b }, "aligned"},
		{"table at 0", []snapEntry{good}, 0, func(h *Header, b []byte) []byte { h.SnapshotsOffset = 0; return b }, "aligned"},
		{"table past EOF", []snapEntry{good}, 0, func(h *Header, b []byte) []byte { h.SnapshotsOffset = 0x10000; return b }, "end of the file"},
		{"extra too big", []snapEntry{{l1Offset: 0x200, extra: make([]byte, 1032)}}, 0, nil, "extra data"},
		{"extra past EOF", []snapEntry{{l1Offset: 0x200, extraSize: 1000}}, 0, nil, "extra data"},
		{"id past EOF", []snapEntry{{l1Offset: 0x200, id: "x", idSize: 0xffff}}, 0, nil, "ID"},
		{"name cut", []snapEntry{{l1Offset: 0x200, id: "x", name: "abc"}}, 0, func(h *Header, b []byte) []byte { return b[:len(b)-1] }, "name"},
		{"l1 unaligned", []snapEntry{{l1Offset: 0x208, l1Size: 1}}, 0, nil, "aligned"},
		{"l1 past EOF", []snapEntry{{l1Offset: 0x400, l1Size: 100}}, 0, nil, "past the end"},
		{"l1 at 0", []snapEntry{{l1Offset: 0, l1Size: 1}}, 0, nil, "overlaps the header"},
		{"l1 huge", []snapEntry{{l1Offset: 0x200, l1Size: 1 << 30}}, 0, nil, "limit"},
		{"l1 wraps", []snapEntry{{l1Offset: 1<<64 - 0x200, l1Size: 1}}, 0, nil, "past the end"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h, b := snapTable(tt.entries, tt.pad)
			if tt.edit != nil {
				b = tt.edit(h, b)
			}
			list, err := readSnapshots(bytes.NewReader(b), h, int64(len(b)))
			if strings.HasPrefix(tt.name, "l1 ") {
				// The table reads; the entry fails when used.
				if err != nil || len(list) != 1 {
					t.Fatalf("got %d snapshots, %v; want the table read", len(list), err)
				}
				err = list[0].checkL1(512, int64(len(b)))
				if !errors.Is(err, disk.ErrCorrupt) || !strings.Contains(err.Error(), tt.text) {
					t.Errorf("checkL1: %v, want a corruption mentioning %q", err, tt.text)
				}
				return
			}
			if tt.text == "" {
				if err != nil || len(list) != len(tt.entries) {
					t.Fatalf("got %d snapshots, %v", len(list), err)
				}
				return
			}
			if err == nil {
				t.Fatalf("no error: %+v", list)
			}
			if !errors.Is(err, disk.ErrFormat) || !strings.Contains(err.Error(), tt.text) {
				t.Errorf("error %q: want a format error mentioning %q", err, tt.text)
			}
		})
	}
}

// repeatedEntries is an endless snapshot table of identical maximal
// entries (no extra data, 65535-byte ID, 65529-byte name: 131104 bytes
// each, a multiple of 8), without the memory it would take.
type repeatedEntries struct{ start int64 }

const repeatedEntrySize = 40 + 65535 + 65529

func (r repeatedEntries) ReadAt(p []byte, off int64) (int, error) {
	for i := range p {
		pos := off + int64(i) - r.start
		rel := pos % repeatedEntrySize
		switch {
		case pos < 0:
			p[i] = 0
		case rel == 12 || rel == 13:
			p[i] = 0xff // id_str_size 65535
		case rel == 14:
			p[i] = 0xff // name_size 65529
		case rel == 15:
			p[i] = 0xf9
		case rel < 40:
			p[i] = 0
		default:
			p[i] = 'x'
		}
	}
	return len(p), nil
}

// TestReadSnapshotsTableLimit checks the 64 MiB limit on a table of 65536
// huge entries.
func TestReadSnapshotsTableLimit(t *testing.T) {
	h := &Header{Version: 3, ClusterBits: 16, NbSnapshots: 65536, SnapshotsOffset: 0x10000}
	r := repeatedEntries{start: 0x10000}
	_, err := readSnapshots(r, h, 1<<40)
	if !errors.Is(err, disk.ErrFormat) || !strings.Contains(err.Error(), "at most 67108864 bytes") {
		t.Fatalf("error %v, want the table size limit", err)
	}
	var fe *disk.FormatError
	if errors.As(err, &fe) && fe.Offset < 64<<20 {
		t.Errorf("error at %#x, before the limit", fe.Offset)
	}
	// 100 such entries (12.5 MiB) are fine.
	h.NbSnapshots = 100
	list, err := readSnapshots(r, h, 1<<40)
	if err != nil || len(list) != 100 || len(list[99].ID) != 65535 || len(list[99].Name) != 65529 {
		t.Fatalf("100 entries: %d, %v", len(list), err)
	}
}

// TestReadSnapshotsReadError checks that an I/O error is returned wrapped.
func TestReadSnapshotsReadError(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "f")
	if err := os.WriteFile(path, make([]byte, 0x400), 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	f.Close() // reads now fail with os.ErrClosed
	h := &Header{Version: 3, ClusterBits: 9, NbSnapshots: 1, SnapshotsOffset: 0x200}
	_, err = readSnapshots(f, h, 0x400)
	if !errors.Is(err, os.ErrClosed) {
		t.Fatalf("error %v does not wrap os.ErrClosed", err)
	}
}

// TestOpenDamagedSnapshotEntry opens an image whose first snapshot's
// entry names an unaligned L1 table: the active image and the other
// snapshots open read-only and read as qemu-img reads them; the damaged
// snapshot, and a read-write open (whose allocator keeps off every
// snapshot's L1 table), are refused as corrupt, naming the snapshot.
func TestOpenDamagedSnapshotEntry(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	path := snapshotImage(t, t.TempDir(), "")
	b := readFile(t, path)
	entry := binary.BigEndian.Uint64(b[offSnapshotsOffset:])
	binary.BigEndian.PutUint64(b[entry:], binary.BigEndian.Uint64(b[entry:])+512)
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, snap := range []string{"", "two", "with space"} {
		img := openImage(t, path, disk.OpenOptions{ReadOnly: true, Snapshot: snap})
		got := make([]byte, img.Size())
		if _, err := img.ReadAt(got, 0); err != nil {
			t.Fatalf("snapshot %q: ReadAt: %v", snap, err)
		}
		var args []string
		if snap != "" {
			args = []string{"-l", snap}
		}
		if d := qemutest.FirstDiff(got, qemutest.RawBytes(t, path, args...)); d >= 0 {
			t.Errorf("snapshot %q differs from qemu-img's at %d", snap, d)
		}
	}
	for _, opts := range []disk.OpenOptions{{ReadOnly: true, Snapshot: "one"}, {}} {
		f, err := hostfile.Open(path, opts.ReadOnly)
		if err != nil {
			t.Fatal(err)
		}
		img, err := Open(f, opts)
		if err == nil {
			img.Close()
		} else {
			f.Close()
		}
		if !errors.Is(err, disk.ErrCorrupt) || !strings.Contains(err.Error(), `snapshot 1 ("one")`) {
			t.Errorf("Open(%+v) = %v, want a corruption naming snapshot 1", opts, err)
		}
	}
}
