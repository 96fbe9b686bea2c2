package main

import (
	"encoding/binary"
	"os"
	"path/filepath"
	"testing"
)

// TestErrors checks that bad command lines and bad images fail with one
// line on stderr.
func TestErrors(t *testing.T) {
	dir, _ := sharedImages(t)
	tests := [][]string{
		{},
		{"bogus"},
		{"info"},
		{"info", "nonexistent.qcow2"},
		{"info", "-f", "qcow2", "disk.raw"},
		{"info", "-f", "nosuchformat", "disk.raw"},
		{"info", "--output=xml", "disk.raw"},
		{"info", "--snapshot", "1", "-f", "raw", "disk.raw"},
		{"info", "a", "b"},
		{"map", "nonexistent.qcow2"},
		{"map", "-f", "qcow2", "disk.raw"},
		{"map", "--offset", "-1", "plain.qcow2"},
		{"map", "--offset", "8388608", "plain.qcow2"},
		{"map", "--offset", "abc", "plain.qcow2"},
		{"map", "--offset", "99999999999999999999", "plain.qcow2"},
		{"map", "--output=yaml", "plain.qcow2"},
		{"convert", "-O", "qcow2", "-o", "cluster_size=3k", "plain.qcow2", "out.qcow2"},
		{"convert", "-O", "vmdk", "plain.qcow2", "out.vmdk"},
		{"convert", "plain.qcow2"},
		{"convert", "nonexistent.qcow2", "out.raw"},
		{"convert", "-f", "qcow2", "disk.raw", "out.raw"},
		{"convert", "plain.qcow2", "plain.qcow2"},
		{"convert", "top.qcow2", "base.qcow2"},
		{"convert", "ext.qcow2", "ext.data"},
		{"convert", "plain.qcow2", "."},
		{"convert", "plain.qcow2", "no/such/dir/out.raw"},
		{"convert", "-j", "-2", "plain.qcow2", "out.raw"},
		{"convert", "-j", "100000", "plain.qcow2", "out.raw"},
		{"convert", "-S", "1000", "plain.qcow2", "out.raw"},
		{"convert", "-t", "none", "plain.qcow2", "out.raw"},
		{"info", "-f", "qcow2", "empty"},
	}
	for _, args := range tests {
		checkFailure(t, imgloop(t, dir, args...), args)
	}
	// The sources survive refused conversions onto themselves.
	for _, name := range []string{"plain.qcow2", "base.qcow2", "ext.qcow2"} {
		mustRun(t, dir, "convert", "-t", "unsafe", name, filepath.Join(t.TempDir(), "out.raw"))
	}
}

// TestHostile runs every command on damaged qcow2 images: each must
// succeed or fail with one line, never crash or hang.
func TestHostile(t *testing.T) {
	shared, _ := sharedImages(t)
	dir := t.TempDir()
	good, err := os.ReadFile(filepath.Join(shared, "top.qcow2"))
	if err != nil {
		t.Fatal(err)
	}
	base, err := os.ReadFile(filepath.Join(shared, "base.qcow2"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "base.qcow2"), base, 0o644); err != nil {
		t.Fatal(err)
	}
	be64 := func(b []byte, off int, v uint64) { binary.BigEndian.PutUint64(b[off:], v) }
	be32 := func(b []byte, off int, v uint32) { binary.BigEndian.PutUint32(b[off:], v) }
	corrupters := map[string]func(b []byte) []byte{
		"truncated header":   func(b []byte) []byte { return b[:50] },
		"truncated tables":   func(b []byte) []byte { return b[:0x30000] },
		"version 9":          func(b []byte) []byte { be32(b, 4, 9); return b },
		"cluster bits 40":    func(b []byte) []byte { be32(b, 20, 40); return b },
		"huge size":          func(b []byte) []byte { be64(b, 24, 1<<62); return b },
		"huge l1 size":       func(b []byte) []byte { be32(b, 36, 0xffffffff); return b },
		"l1 past eof":        func(b []byte) []byte { be64(b, 40, 1<<40); return b },
		"l1 entry past eof":  func(b []byte) []byte { l1 := binary.BigEndian.Uint64(b[40:]); be64(b, int(l1), 1<<63|1<<40); return b },
		"backing name long":  func(b []byte) []byte { be32(b, 16, 0xffffff); return b },
		"backing loop":       func(b []byte) []byte { return renameBacking(b, "bad.qcow2") },
		"snapshots past eof": func(b []byte) []byte { be32(b, 60, 1000); be64(b, 64, 1<<40); return b },
		"refcount order 9":   func(b []byte) []byte { be32(b, 96, 9); return b },
	}
	for name, corrupt := range corrupters {
		t.Run(name, func(t *testing.T) {
			path := filepath.Join(dir, "bad.qcow2")
			if err := os.WriteFile(path, corrupt(append([]byte(nil), good...)), 0o644); err != nil {
				t.Fatal(err)
			}
			for _, args := range [][]string{
				{"info", "bad.qcow2"}, {"info", "--output=json", "bad.qcow2"}, {"info", "--header", "bad.qcow2"},
				{"map", "--output=json", "bad.qcow2"}, {"map", "--offset", "0", "bad.qcow2"},
				{"convert", "-O", "raw", "bad.qcow2", "bad.raw"},
			} {
				r := imgloop(t, dir, args...)
				if r.code != 0 {
					checkFailure(t, r, args)
				}
			}
		})
	}
}

// renameBacking points the backing file name of a qcow2 image (stored
// after the header) at name, keeping its length field in step.
func renameBacking(b []byte, name string) []byte {
	off := binary.BigEndian.Uint64(b[8:])
	if off == 0 || int(off)+len(name) > len(b) {
		return b
	}
	copy(b[off:], name)
	binary.BigEndian.PutUint32(b[16:], uint32(len(name)))
	return b
}
