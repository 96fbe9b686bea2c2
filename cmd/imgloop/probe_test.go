package main

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/imgloop/imgloop/internal/imagetest"
	"github.com/imgloop/imgloop/internal/qemutest"
)

// TestProbeOtherFormats runs every command on images of the formats QEMU
// detects and imgloop has no driver for: probed, each is refused in one
// line naming the format (exit 1), where QEMU detects the same format;
// with -f raw, each reads as its file's bytes. qemu-img makes the images
// it can make; Bochs, cloop and DMG (which it only reads) and LUKS
// (whose creation benchmarks the CPU and flakes under load) come from
// internal/imagetest.
func TestProbeOtherFormats(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	dir := t.TempDir()
	create := func(format, opts string) func(p string) {
		return func(p string) { qemutest.Create(t, p, format, opts, "1M") }
	}
	write := func(b []byte) func(p string) {
		return func(p string) {
			if err := os.WriteFile(p, b, 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	qcow2Version := func(v uint32) func(p string) {
		return func(p string) {
			qemutest.Create(t, p, "qcow2", "", "1M")
			patchFile(t, p, 4, binary.BigEndian.AppendUint32(nil, v))
		}
	}
	data := bytes.Repeat([]byte("sixteen bytes!!\n"), 4096)
	cases := []struct {
		file  string
		make  func(p string)
		qemu  string // the format qemu-img info detects; "" when it cannot open the image
		want  string // in imgloop's refusal; "" when imgloop reads it as raw too
		qemuE string // with qemu == "": in qemu-img info's error
	}{
		{"sparse.vmdk", create("vmdk", ""), "vmdk", "VMDK (vmdk) image: not supported yet; use -f raw to read its bytes", ""},
		{"desc.vmdk", create("vmdk", "subformat=monolithicFlat"), "vmdk", "VMDK (vmdk) image", ""},
		{"dynamic.vhd", create("vpc", "subformat=dynamic"), "vpc", "dynamic.vhd: VHD (vpc) image: not supported yet; use -f raw to read its bytes", ""},
		// A fixed VHD's only footer is its last sector, which QEMU does
		// not probe: it is raw to both (see disk.Sample).
		{"fixed.vhd", create("vpc", "subformat=fixed"), "raw", "", ""},
		{"disk.vhdx", create("vhdx", ""), "vhdx", "VHDX (vhdx) image", ""},
		{"disk.vdi", create("vdi", ""), "vdi", "VDI (vdi) image", ""},
		{"disk.qed", create("qed", ""), "qed", "QED (qed) image", ""},
		{"disk.parallels", create("parallels", ""), "parallels", "Parallels (parallels) image", ""},
		{"disk.qcow", create("qcow", ""), "qcow", "qcow version 1 (qcow) image", ""},
		{"disk.luks", write(imagetest.LUKS(1 << 20)), "luks", "LUKS (luks) image", ""},
		{"disk.bochs", write(imagetest.Bochs(1 << 20)), "bochs", "Bochs (bochs) image", ""},
		{"disk.cloop", write(imagetest.Cloop(data, 16<<10)), "cloop", "compressed loop (cloop) image", ""},
		{"disk.dmg", write(imagetest.DMG(data)), "dmg", "DMG (dmg) image", ""},
		{"v4.qcow2", qcow2Version(4), "", "v4.qcow2: unsupported qcow2 version 4", "Unsupported qcow2 version 4"},
		// qcow's own complaint: QEMU took it for qcow version 1.
		{"v1.qcow2", qcow2Version(1), "", "v1.qcow2: qcow version 1 (qcow) image", "Cluster size must be between 512 and 64k"},
	}
	for _, c := range cases {
		t.Run(c.file, func(t *testing.T) {
			p := filepath.Join(dir, c.file)
			c.make(p)
			// What QEMU makes of it.
			out, err := qemutest.Try("qemu-img", "info", "--output=json", p)
			switch {
			case c.qemu == "" && (err == nil || !strings.Contains(err.Error(), c.qemuE)):
				t.Fatalf("qemu-img info: %v, want an error about %q", err, c.qemuE)
			case c.qemu != "":
				var info struct{ Format string }
				if err != nil || json.Unmarshal([]byte(out), &info) != nil || info.Format != c.qemu {
					t.Fatalf("qemu-img info: format %q (%v), want %q", info.Format, err, c.qemu)
				}
			}
			dst := filepath.Join(t.TempDir(), "out.raw")
			for _, args := range [][]string{{"info", p}, {"map", p}, {"convert", p, dst}, {"check", p}} {
				r := imgloop(t, dir, args...)
				if c.want == "" {
					if args[0] != "check" && r.code != 0 {
						t.Errorf("imgloop %s: exit %d: %s", strings.Join(args, " "), r.code, r.stderr)
					}
					continue
				}
				checkFailure(t, r, args)
				if r.code != 1 || !strings.Contains(r.stderr, c.want) {
					t.Errorf("imgloop %s: exit %d, stderr %q; want 1 and %q", strings.Join(args, " "), r.code, r.stderr, c.want)
				}
				if args[0] == "convert" {
					if _, err := os.Stat(dst); err == nil {
						t.Errorf("a refused convert left %s", dst)
					}
				}
			}
			// -f raw reads the file's bytes.
			want, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			os.Remove(dst)
			mustRun(t, dir, "convert", "-f", "raw", p, dst)
			if got, err := os.ReadFile(dst); err != nil || !bytes.Equal(got, want) {
				t.Errorf("convert -f raw: %d bytes (%v), differing from the file at %d", len(got), err, qemutest.FirstDiff(got, want))
			}
			var info struct {
				Format      string
				VirtualSize int64 `json:"virtual-size"`
			}
			if err := json.Unmarshal([]byte(mustRun(t, dir, "info", "-f", "raw", "--output=json", p)), &info); err != nil ||
				info.Format != "raw" || info.VirtualSize != int64(len(want)) {
				t.Errorf("info -f raw: %+v (%v), want raw of %d bytes", info, err, len(want))
			}
			mustRun(t, dir, "map", "-f", "raw", p)
			if r := imgloop(t, dir, "check", "-f", "raw", p); r.code != 63 {
				t.Errorf("check -f raw: exit %d, want 63 (no checks for raw), stderr %q", r.code, r.stderr)
			}
		})
	}
}

// patchFile writes b at off in the file at path.
func patchFile(t *testing.T, path string, off int64, b []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}
