package disk_test

import (
	"bytes"
	"errors"
	"io"
	"testing"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/disk/hostfile/hostfiletest"
)

// padDriver claims a head that is exactly magic followed by zeros up to
// ProbeSize: it sees whether Probe pads a short file.
type padDriver struct{ fakeDriver }

func (d *padDriver) Probe(h []byte) int {
	want := make([]byte, disk.ProbeSize)
	copy(want, d.magic)
	if bytes.Equal(h, want) {
		return d.score
	}
	return 0
}

func TestProbe(t *testing.T) {
	register(t,
		&fakeDriver{name: "raw", magic: "", score: 1},
		&fakeDriver{name: "fake-probe", magic: "PROBE", score: 100},
		&padDriver{fakeDriver{name: "fake-padded", magic: "PAD", score: 100}},
	)
	long := append([]byte("PROBE"), make([]byte, 4096)...)
	cases := []struct {
		name    string
		content []byte
		want    string
	}{
		{"magic", long, "fake-probe"},
		{"magic in a short file", []byte("PROBE"), "fake-probe"},
		{"short file is zero-padded", []byte("PAD"), "fake-padded"},
		{"padding is not invented past ProbeSize", append([]byte("PAD"), bytes.Repeat([]byte{1}, 600)...), "raw"},
		{"no magic", []byte("plain data"), "raw"},
		{"empty file", nil, "raw"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			d, err := disk.Probe(hostfiletest.NewMemFile("img", c.content))
			if err != nil || d.Name() != c.want {
				t.Fatalf("Probe = %v, %v; want %s", d, err, c.want)
			}
		})
	}
	t.Run("read error", func(t *testing.T) {
		f := hostfiletest.NewFaulty(hostfiletest.NewMemFile("img", long))
		f.FailAfter(hostfiletest.OpRead, 0, io.ErrClosedPipe)
		if _, err := disk.Probe(f); !errors.Is(err, io.ErrClosedPipe) {
			t.Fatalf("Probe on an unreadable file = %v, want its read error", err)
		}
	})
}
