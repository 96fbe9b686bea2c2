package raw

import (
	"bytes"
	"errors"
	"path/filepath"
	"sync"
	"testing"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/disk/hostfile/hostfiletest"
)

// fakeDriver claims headers that start with its magic. The raw tests do
// not import the real qcow2 driver; this one recognises the qcow2 magic
// and version as qcow2's Probe does.
type fakeDriver struct {
	name  string
	magic []byte
}

func (d fakeDriver) Name() string { return d.name }
func (d fakeDriver) Probe(h []byte) int {
	if bytes.HasPrefix(h, d.magic) {
		return 100
	}
	return 0
}
func (d fakeDriver) Open(disk.File, disk.OpenOptions) (disk.Image, error) {
	return nil, errors.New("fake driver cannot open")
}

var registerFakes = sync.OnceFunc(func() {
	disk.MustRegister(fakeDriver{"fake-qcow2", []byte("QFI\xfb\x00\x00\x00\x03")})
	disk.MustRegister(fakeDriver{"fake-zero", []byte("\x00\x00\x00\x00ZERO")})
})

var qcow2Magic = []byte("QFI\xfb\x00\x00\x00\x03")

func TestProbeGuard(t *testing.T) {
	registerFakes()
	type op func(img *Image) error
	write := func(p []byte, off int64) op {
		return func(img *Image) error { _, err := img.WriteAt(p, off); return err }
	}
	cases := []struct {
		name    string
		initial []byte // first bytes of the image
		probed  bool
		ops     []op
		refused bool // the last op is refused
	}{
		{"qcow2 magic, probed", nil, true, []op{write(qcow2Magic, 0)}, true},
		{"qcow2 magic, named raw", nil, false, []op{write(qcow2Magic, 0)}, false},
		{"qcow2 magic in a longer write", nil, true, []op{write(append(append([]byte{}, qcow2Magic...), make([]byte, 4096)...), 0)}, true},
		{"magic completed by a second write", nil, true, []op{write([]byte("QFI"), 0), write([]byte("\xfb\x00\x00\x00\x03"), 3)}, true},
		{"magic completed by a write into the middle", []byte("QFI\xfb\x00\x00\x00\x07"), true, []op{write([]byte{3}, 7)}, true},
		{"harmless first-sector write", nil, true, []op{write(bytes.Repeat([]byte{0x55}, 512), 0)}, false},
		{"MBR signature", nil, true, []op{write([]byte{0x55, 0xaa}, 510)}, false},
		{"magic at sector 1", nil, true, []op{write(qcow2Magic, 512)}, false},
		{"wrong version", nil, true, []op{write([]byte("QFI\xfb\x00\x00\x00\x09"), 0)}, false},
		// Formats without a driver count too, as in QEMU's guard.
		{"vmdk magic, probed", nil, true, []op{write([]byte("KDMV"), 0)}, true},
		{"vhd footer copy, probed", nil, true, []op{write([]byte("conectix"), 0)}, true},
		{"luks header, probed", nil, true, []op{write([]byte("LUKS\xba\xbe\x00\x01"), 0)}, true},
		{"qcow v1 header, probed", nil, true, []op{write([]byte("QFI\xfb\x00\x00\x00\x01"), 0)}, true},
		{"vmdk magic, named raw", nil, false, []op{write([]byte("KDMV"), 0)}, false},
		{"vhd footer in the last sector", nil, true, []op{write([]byte("conectix"), 8192-512)}, false},
		{"zeroes make it probe as another format", []byte("XXXXZERO"), true,
			[]op{func(img *Image) error { return img.WriteZeroes(0, 4, 0) }}, true},
		// A discard punches whole blocks only, so the first sector ends
		// up all zeros, which no driver claims: the guard never refuses
		// it, and a discard of less than a block does nothing.
		{"discard of part of the first block", []byte("XXXXZERO"), true,
			[]op{func(img *Image) error { return img.Discard(0, 4) }}, false},
		{"discard of the first block", []byte("XXXXZERO"), true,
			[]op{func(img *Image) error { return img.Discard(0, 4096) }}, false},
		{"zeroes, named raw", []byte("XXXXZERO"), false,
			[]op{func(img *Image) error { return img.WriteZeroes(0, 4, disk.ZeroNoUnmap) }}, false},
		{"zeroing a qcow2 header away is allowed", qcow2Magic, true,
			[]op{func(img *Image) error { return img.WriteZeroes(0, 512, 0) }}, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			content := make([]byte, 8192)
			copy(content, c.initial)
			mem := hostfiletest.NewMemFile("g.raw", content)
			img, err := Open(mem, disk.OpenOptions{Probed: c.probed})
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			for i, o := range c.ops {
				err := o(img)
				last := i == len(c.ops)-1
				switch {
				case last && c.refused:
					if !errors.Is(err, ErrProbedFormatChange) || !errors.Is(err, disk.ErrNotSupported) {
						t.Fatalf("op %d = %v, want ErrProbedFormatChange and ErrNotSupported", i, err)
					}
				case err != nil:
					t.Fatalf("op %d: %v", i, err)
				}
			}
			if c.refused {
				// The refused operation left the first sector alone.
				before := mem.Bytes()
				if err := c.ops[len(c.ops)-1](img); err == nil {
					t.Fatal("second attempt succeeded")
				}
				if !bytes.Equal(mem.Bytes(), before) {
					t.Fatal("a refused operation changed the file")
				}
			}
		})
	}
}

func TestProbeGuardThroughOpen(t *testing.T) {
	registerFakes()
	path := filepath.Join(t.TempDir(), "disk.img")
	makeDense(t, path, 4096)
	probed, err := disk.Open(path, disk.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := probed.WriteAt(qcow2Magic, 0); !errors.Is(err, ErrProbedFormatChange) {
		t.Fatalf("probed open: WriteAt(qcow2 magic) = %v, want ErrProbedFormatChange", err)
	}
	// A second writer would be refused its locks while the first is open.
	probed.Close()
	named, err := disk.Open(path, disk.OpenOptions{Format: "raw"})
	if err != nil {
		t.Fatal(err)
	}
	defer named.Close()
	if _, err := named.WriteAt(qcow2Magic, 0); err != nil {
		t.Fatalf("open with Format raw: WriteAt(qcow2 magic) = %v", err)
	}
}

func TestProbeGuardConcurrent(t *testing.T) {
	// Two writers race to complete the magic from either half; whatever
	// the interleaving, the file must never hold the full magic.
	registerFakes()
	for round := 0; round < 50; round++ {
		mem := hostfiletest.NewMemFile("c.raw", make([]byte, 1024))
		img, err := Open(mem, disk.OpenOptions{Probed: true})
		if err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		wg.Go(func() { img.WriteAt(qcow2Magic[:4], 0) })
		wg.Go(func() { img.WriteAt(qcow2Magic[4:], 4) })
		wg.Wait()
		if bytes.HasPrefix(mem.Bytes(), qcow2Magic) {
			t.Fatal("concurrent writes planted the qcow2 magic")
		}
		img.Close()
	}
}
