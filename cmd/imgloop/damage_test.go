package main

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/imgloop/imgloop/internal/qemutest"
)

// TestDamagedSnapshotEntry damages the first of two internal snapshots'
// table entries: the active image, which does not use it, still reads as
// qemu-img reads it (info, map, convert), and so does the other
// snapshot; the damaged one is refused when used (--snapshot, or a
// read-write open, whose allocator must keep off every snapshot's L1
// table); check reports it as qemu-img check does, repairs included.
func TestDamagedSnapshotEntry(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	qemutest.Create(t, base, "qcow2", "", "4M")
	qemutest.IO(t, base, "qcow2", "write -P 0x11 0 64k", "write -P 0x12 1M 64k")
	qemutest.Img(t, "snapshot", "-c", "first", base)
	qemutest.IO(t, base, "qcow2", "write -P 0x22 0 32k")
	qemutest.Img(t, "snapshot", "-c", "second", base)
	qemutest.IO(t, base, "qcow2", "write -P 0x33 2M 64k")
	good, err := os.ReadFile(base)
	if err != nil {
		t.Fatal(err)
	}
	entry := int(binary.BigEndian.Uint64(good[64:])) // the first entry of the snapshot table
	cases := []struct {
		name   string
		off    int    // in the entry: 0 l1_table_offset, 8 l1_size
		value  []byte // written there
		refuse string // in the refusal of --snapshot first
	}{
		{"l1-unaligned", 0, binary.BigEndian.AppendUint64(nil, binary.BigEndian.Uint64(good[entry:])+512), "not aligned"},
		{"l1-too-large", 8, binary.BigEndian.AppendUint32(nil, 32<<20/8+1), "exceeds the limit"},
		{"l1-past-eof", 0, binary.BigEndian.AppendUint64(nil, 1<<28), "past the end of the file"},
		{"l1-at-zero", 0, binary.BigEndian.AppendUint64(nil, 0), "overlaps the header"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			name := c.name + ".qcow2"
			p := filepath.Join(dir, name)
			b := bytes.Clone(good)
			copy(b[entry+c.off:], c.value)
			if err := os.WriteFile(p, b, 0o644); err != nil {
				t.Fatal(err)
			}
			// The active image, as qemu-img sees it.
			for _, args := range [][]string{{"info", name}, {"info", "--output=json", name}, {"map", "--output=json", name}} {
				if got, want := mustRun(t, dir, args...), qemuImg(t, dir, args...); got != want {
					t.Errorf("imgloop %v:\n%s\nqemu-img:\n%s", args, got, want)
				}
			}
			out := filepath.Join(t.TempDir(), "out.raw")
			mustRun(t, dir, "convert", name, out)
			if got, err := os.ReadFile(out); err != nil || !bytes.Equal(got, qemutest.RawBytes(t, p)) {
				t.Errorf("convert differs from qemu-img convert -O raw (%v)", err)
			}
			// The sound snapshot still reads.
			mustRun(t, dir, "convert", "--snapshot", "second", name, out)
			if got, err := os.ReadFile(out); err != nil || !bytes.Equal(got, qemutest.RawBytes(t, p, "-l", "second")) {
				t.Errorf("convert --snapshot second differs from qemu-img convert -l second (%v)", err)
			}
			// The damaged one is refused when used.
			for _, args := range [][]string{
				{"convert", "--snapshot", "first", name, out},
				{"info", "--snapshot", "first", name},
				{"resize", name, "+1M"},
			} {
				r := imgloop(t, dir, args...)
				checkFailure(t, r, args)
				if !strings.Contains(r.stderr, `snapshot 1 ("first")`) || !strings.Contains(r.stderr, c.refuse) {
					t.Errorf("imgloop %v: %q, want a refusal naming snapshot 1 and %q", args, r.stderr, c.refuse)
				}
			}
			if after, _ := os.ReadFile(p); !bytes.Equal(after, b) {
				t.Error("a refused command changed the image")
			}
			// check reports it, and repairs, as qemu-img check does.
			compareCheck(t, dir, name)
			compareCheck(t, dir, "--output=json", name)
			for _, args := range [][]string{{"-r", "leaks"}, {"-r", "all"}} {
				compareRepair(t, dir, args, name)
			}
		})
	}
}

// TestCheckHeaderDamage points the header's tables where they must not
// be: check diagnoses what qemu-img check diagnoses (the refcount table
// over the header, past the end of the file or empty; the L1 table over
// the header, the refcount table or past the end of the file), with the
// same report, findings and exit status, and repairs as it repairs; and
// fails as it fails where QEMU cannot open the image (tables unaligned
// or over QEMU's size limits).
func TestCheckHeaderDamage(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	qemutest.Create(t, base, "qcow2", "", "4M")
	qemutest.IO(t, base, "qcow2", "write -P 0x11 0 128k", "write -P 0x12 1M 64k")
	good, err := os.ReadFile(base)
	if err != nil {
		t.Fatal(err)
	}
	be := binary.BigEndian
	l1, rt := be.Uint64(good[40:]), be.Uint64(good[48:])
	u64 := func(v uint64) []byte { return be.AppendUint64(nil, v) }
	u32 := func(v uint32) []byte { return be.AppendUint32(nil, v) }
	cases := []struct {
		name  string
		off   int    // header field
		value []byte // written there
		code  int    // qemu-img check's exit status
	}{
		{"refcount-table-over-header", 48, u64(0), 2},
		{"refcount-table-past-eof", 48, u64(1 << 40), 2},
		{"refcount-table-just-past-eof", 48, u64(uint64(len(good)+0xffff) &^ 0xffff), 2},
		{"refcount-table-empty", 56, u32(0), 2},
		{"refcount-table-over-l1", 48, u64(l1), 1}, // qemu-img: "Check failed"
		{"l1-over-header", 40, u64(0), 2},
		{"l1-over-refcount-table", 40, u64(rt), 2},
		{"l1-past-eof", 40, u64(1 << 40), 2},
		// QEMU refuses to open these, so the check fails.
		{"refcount-table-unaligned", 48, u64(rt + 512), 1},
		{"refcount-table-too-large", 56, u32(1 << 31), 1},
		{"l1-unaligned", 40, u64(l1 + 512), 1},
		{"l1-too-large", 36, u32(1 << 31), 1},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			name := c.name + ".qcow2"
			b := bytes.Clone(good)
			copy(b[c.off:], c.value)
			if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
				t.Fatal(err)
			}
			if r := qemuImgCheck(t, dir, name); r.code != c.code {
				t.Fatalf("qemu-img check: exit %d, want %d (the case is not what it says)\n%s", r.code, c.code, r.stderr)
			}
			if c.code == 1 && !strings.Contains(c.name, "over") {
				// QEMU cannot open it: one line, in our words.
				for _, args := range [][]string{{"check", name}, {"check", "--output=json", name}} {
					r := imgloop(t, dir, args...)
					checkFailure(t, r, args)
					if r.code != 1 {
						t.Errorf("imgloop %v: exit %d, want 1", args, r.code)
					}
				}
				return
			}
			compareCheck(t, dir, name)
			compareCheck(t, dir, "--output=json", name)
			if c.code == 1 {
				return
			}
			for _, args := range [][]string{{"-r", "leaks"}, {"-r", "all"}} {
				compareRepair(t, dir, args, name)
			}
		})
	}
}
