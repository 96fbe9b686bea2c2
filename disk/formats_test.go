package disk_test

import (
	"encoding/binary"
	"errors"
	"testing"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/disk/hostfile/hostfiletest"
	"github.com/imgloop/imgloop/internal/imagetest"
)

// head returns a ProbeSize buffer with parts written at their offsets.
func head(parts ...any) []byte {
	b := make([]byte, disk.ProbeSize)
	for i := 0; i < len(parts); i += 2 {
		off := parts[i].(int)
		switch v := parts[i+1].(type) {
		case string:
			copy(b[off:], v)
		case []byte:
			copy(b[off:], v)
		}
	}
	return b
}

func le32(v uint32) []byte { return binary.LittleEndian.AppendUint32(nil, v) }
func be32(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }

// TestProbeKnownFormats probes the first bytes of an image of every
// format QEMU detects, and near misses of each, as QEMU's probe
// functions (block/*.c) decide them.
func TestProbeKnownFormats(t *testing.T) {
	register(t, &fakeDriver{name: "raw", magic: "", score: 1})
	bochs := imagetest.Bochs(1 << 20)
	cases := []struct {
		name    string
		file    string // file name; "" for "img"
		content []byte
		want    string // format name: "raw" or a format without a driver
	}{
		{"vmdk4 sparse", "", head(0, "KDMV\x01\x00\x00\x00"), "vmdk"},
		{"vmdk3 sparse", "", head(0, "COWD\x01\x00\x00\x00"), "vmdk"},
		{"vmdk descriptor", "", head(0, "# Disk DescriptorFile\nversion=1\nCID=1\n"), "vmdk"},
		{"vmdk descriptor, CRLF, version 3", "", head(0, "# c\r\n  \r\nversion=3\r\n"), "vmdk"},
		{"vmdk descriptor with blank lines", "", head(0, "#\n   \n \nversion=2\n"), "vmdk"},
		{"vmdk descriptor: an empty line ends the search", "", head(0, "#\n\nversion=1\n"), "raw"},
		{"vmdk descriptor: version 4", "", head(0, "version=4\n"), "raw"},
		{"vmdk descriptor: other line first", "", head(0, "CID=1\nversion=1\n"), "raw"},
		{"vmdk descriptor: comment running to the end", "", head(0, "# no newline"), "raw"},
		{"vhd dynamic", "", head(0, "conectix\x00\x00\x00\x02"), "vpc"},
		{"vhd magic not at the start", "", head(1, "conectix"), "raw"},
		{"vhdx", "", head(0, "vhdxfile"), "vhdx"},
		{"vdi", "", head(0, "<<< QEMU VM Virtual Disk Image >>>\n", 0x40, le32(0xbeda107f)), "vdi"},
		{"vdi signature only", "", head(0x40, le32(0xbeda107f)), "vdi"},
		{"vdi text without signature", "", head(0, "<<< Sun xVM VirtualBox Disk Image >>>\n"), "raw"},
		{"qed", "", head(0, "QED\x00"), "qed"},
		{"qed magic without NUL", "", head(0, "QEDX"), "raw"},
		{"parallels", "", head(0, "WithoutFreeSpace", 16, le32(2)), "parallels"},
		{"parallels ext", "", head(0, "WithouFreSpacExt", 16, le32(2)), "parallels"},
		{"parallels version 3", "", head(0, "WithoutFreeSpace", 16, le32(3)), "raw"},
		{"bochs", "", bochs, "bochs"},
		{"bochs version 1", "", head(0, bochs[:64], 64, le32(0x00010000)), "bochs"},
		{"bochs version 3", "", head(0, bochs[:64], 64, le32(0x00030000)), "raw"},
		{"bochs undoable", "", head(0, bochs[:48], 48, "Undoable", 64, bochs[64:68]), "raw"},
		{"bochs magic without NUL", "", head(0, bochs[:68], 22, "!"), "raw"},
		{"cloop", "", []byte(imagetest.CloopMagic + "more"), "cloop"},
		{"cloop preamble cut short", "", []byte(imagetest.CloopMagic[:20]), "raw"},
		{"dmg by name", "disk.dmg", head(), "dmg"},
		{"dmg name is case-sensitive", "disk.DMG", head(), "raw"},
		{"dmg needs a name before the suffix", ".dmg", head(), "raw"},
		{"empty dmg is raw", "disk.dmg", nil, "raw"},
		{"luks", "", imagetest.LUKS(0)[:disk.ProbeSize], "luks"},
		{"luks2 (QEMU reads LUKS1 only)", "", head(0, "LUKS\xba\xbe\x00\x02"), "raw"},
		{"qcow v1", "", head(0, "QFI\xfb", 4, be32(1)), "qcow"},
		{"qcow2 v3 without the qcow2 driver", "", head(0, "QFI\xfb", 4, be32(3)), "raw"},
		{"plain data", "", head(0, "hello"), "raw"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			name := c.file
			if name == "" {
				name = "img"
			}
			d, err := disk.Probe(hostfiletest.NewMemFile(name, c.content))
			got := ""
			var ufe *disk.UnsupportedFormatError
			switch {
			case errors.As(err, &ufe):
				got = ufe.Format
				if !errors.Is(err, disk.ErrNotSupported) || ufe.Path != name {
					t.Errorf("error %v: path %q, ErrNotSupported %v", err, ufe.Path, errors.Is(err, disk.ErrNotSupported))
				}
			case err != nil:
				t.Fatalf("Probe: %v", err)
			default:
				got = d.Name()
			}
			if got != c.want {
				t.Fatalf("Probe = %q (%v), want %q", got, err, c.want)
			}
			// Detect sees the same bytes without the name: only dmg,
			// which QEMU probes by name alone, differs.
			want := c.want
			if c.name == "dmg by name" {
				want = "raw"
			}
			d, err = disk.Detect(c.content)
			if errors.As(err, &ufe) {
				got = ufe.Format
			} else if err == nil {
				got = d.Name()
			}
			if got != want {
				t.Errorf("Detect = %q (%v), want %q", got, err, want)
			}
		})
	}
}

// TestProbeKnownFormatMessage checks the refusal users see.
func TestProbeKnownFormatMessage(t *testing.T) {
	register(t, &fakeDriver{name: "raw", magic: "", score: 1})
	_, err := disk.Probe(hostfiletest.NewMemFile("disk.vhd", head(0, "conectix")))
	if want := "disk.vhd: VHD (vpc) image: not supported yet; use -f raw to read its bytes"; err == nil || err.Error() != want {
		t.Fatalf("Probe = %v, want %q", err, want)
	}
	_, err = disk.Probe(hostfiletest.NewMemFile("old.img", head(0, "QFI\xfb", 4, be32(1))))
	if want := "old.img: qcow version 1 (qcow) image: not supported yet; use -f raw to read its bytes"; err == nil || err.Error() != want {
		t.Fatalf("Probe = %v, want %q", err, want)
	}
	v := &disk.UnsupportedFormatError{Path: "q.img", Format: "qcow2", Version: "4"}
	if got, want := v.Error(), "q.img: unsupported qcow2 version 4"; got != want || !errors.Is(v, disk.ErrNotSupported) {
		t.Fatalf("version error %q, want %q matching ErrNotSupported", got, want)
	}
}

// TestProbeDriverTakesOverKnownFormat checks that a registered driver of
// a known format's name replaces the built-in refusal, and that drivers
// win ties against formats without one.
func TestProbeDriverTakesOverKnownFormat(t *testing.T) {
	register(t, &fakeDriver{name: "raw", magic: "", score: 1})
	vhd := head(0, "conectix")
	if _, err := disk.Probe(hostfiletest.NewMemFile("a.vhd", vhd)); !errors.Is(err, disk.ErrNotSupported) {
		t.Fatalf("without a vpc driver: %v", err)
	}
	register(t, &fakeDriver{name: "vpc", magic: "conectix", score: 100})
	if d, err := disk.Probe(hostfiletest.NewMemFile("a.vhd", vhd)); err != nil || d.Name() != "vpc" {
		t.Fatalf("with a vpc driver: %v, %v", d, err)
	}
	register(t, &fakeDriver{name: "fake-vhdx", magic: "vhdxfile", score: 100})
	if d, err := disk.Probe(hostfiletest.NewMemFile("a.vhdx", head(0, "vhdxfile"))); err != nil || d.Name() != "fake-vhdx" {
		t.Fatalf("a driver scoring as high as a format without one: %v, %v", d, err)
	}
}

// sampleDriver scores what ProbeSample sees.
type sampleDriver struct {
	fakeDriver
	got *disk.Sample
}

func (d *sampleDriver) ProbeSample(s *disk.Sample) int {
	d.got = s
	return 0
}

// TestProbeSample checks what a SampleProber is handed: the name, size,
// padded head and the file's last bytes.
func TestProbeSample(t *testing.T) {
	register(t, &fakeDriver{name: "raw", magic: "", score: 1})
	d := &sampleDriver{fakeDriver: fakeDriver{name: "fake-sample"}}
	register(t, d)
	content := make([]byte, 3000)
	for i := range content {
		content[i] = byte(i)
	}
	if _, err := disk.Probe(hostfiletest.NewMemFile("s.img", content)); err != nil {
		t.Fatal(err)
	}
	s := d.got
	if s == nil || s.Name != "s.img" || s.Size != 3000 || len(s.Head) != disk.ProbeSize || len(s.Tail) != disk.ProbeSize ||
		s.Head[511] != byte(511%256) || s.Tail[0] != byte((3000-512)%256) || s.Tail[511] != byte(2999%256) {
		t.Fatalf("sample %+v", s)
	}
	if _, err := disk.Probe(hostfiletest.NewMemFile("short", []byte("abc"))); err != nil {
		t.Fatal(err)
	}
	if s := d.got; string(s.Tail) != "abc" || len(s.Head) != disk.ProbeSize || string(s.Head[:4]) != "abc\x00" {
		t.Fatalf("short file: sample %+v", s)
	}
}
