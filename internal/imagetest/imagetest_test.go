package imagetest_test

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/imgloop/imgloop/internal/imagetest"
	"github.com/imgloop/imgloop/internal/qemutest"
)

// TestQEMUReadsThem has qemu-img detect, open and (where the image holds
// data) read every image the package builds: each is what QEMU takes
// for its format.
func TestQEMUReadsThem(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	dir := t.TempDir()
	data := bytes.Repeat([]byte("imagetest sector data, 32 bytes "), 2048) // 64 KiB
	cases := []struct {
		name    string
		content []byte
		format  string
		want    []byte // the virtual disk, nil to skip reading it
		info    string // in qemu-img info's output
	}{
		{"disk.bochs", imagetest.Bochs(1 << 20), "bochs", make([]byte, 1<<20), "virtual size: 1 MiB"},
		{"disk.cloop", imagetest.Cloop(data, 16<<10), "cloop", data, "virtual size: 64 KiB"},
		{"disk.dmg", imagetest.DMG(data), "dmg", data, "virtual size: 64 KiB"},
		{"disk.luks", imagetest.LUKS(1 << 20), "luks", nil, "payload offset: 2068480"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := filepath.Join(dir, c.name)
			if err := os.WriteFile(p, c.content, 0o644); err != nil {
				t.Fatal(err)
			}
			if got := qemutest.Info(t, p)["format"]; got != c.format {
				t.Fatalf("qemu-img info: format %v, want %s", got, c.format)
			}
			if out := qemutest.Img(t, "info", p); !strings.Contains(out, c.info) {
				t.Errorf("qemu-img info lacks %q:\n%s", c.info, out)
			}
			if c.want != nil {
				if got := qemutest.RawBytes(t, p, "-f", c.format); !bytes.Equal(got, c.want) {
					t.Errorf("qemu-img reads %d bytes differing from the data at %d", len(got), qemutest.FirstDiff(got, c.want))
				}
			}
		})
	}
}

// TestEncryptQcow2 checks that qemu-img sees the image EncryptQcow2
// makes as LUKS-encrypted qcow2, with the LUKS header in place, and that
// its refcounts count that header.
func TestEncryptQcow2(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	p := filepath.Join(t.TempDir(), "luks.qcow2")
	qemutest.Create(t, p, "qcow2", "", "1M")
	if err := imagetest.EncryptQcow2(p); err != nil {
		t.Fatal(err)
	}
	out := qemutest.Img(t, "info", p)
	for _, want := range []string{"encrypted: yes", "format: luks", "cipher alg: aes-256", "payload offset: 2068480"} {
		if !strings.Contains(out, want) {
			t.Errorf("qemu-img info lacks %q:\n%s", want, out)
		}
	}
	// qemu-img check opens the image for I/O, which needs the key; the
	// refcounts of the header clusters are checked by hand.
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if len(b) != 0x240000 {
		t.Errorf("file of %#x bytes, want %#x (qemu-img's layout)", len(b), 0x240000)
	}
	rb := int(beU64(b[beU64(b[48:]):]))
	for c := range 0x24 { // header, refcount table and block, L1 table, 32 of LUKS header
		if got := uint16(b[rb+2*c])<<8 | uint16(b[rb+2*c+1]); got != 1 {
			t.Errorf("refcount of cluster %d = %d, want 1", c, got)
		}
	}
	if got := uint16(b[rb+2*0x24])<<8 | uint16(b[rb+2*0x24+1]); got != 0 {
		t.Errorf("refcount of cluster 0x24, past the end, = %d", got)
	}
	if err := imagetest.EncryptQcow2(p); err == nil {
		t.Error("encrypting an encrypted image succeeded")
	}
}

func beU64(b []byte) uint64 {
	var v uint64
	for _, x := range b[:8] {
		v = v<<8 | uint64(x)
	}
	return v
}
