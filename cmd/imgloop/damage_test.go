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
