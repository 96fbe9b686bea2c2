package client

import (
	"path/filepath"
	"testing"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/disk/disktest"
	"github.com/imgloop/imgloop/export/nbd"
	"github.com/imgloop/imgloop/internal/qemutest"
)

// TestConformance runs the disktest suite over client connections to our
// server, serving fresh raw and qcow2 images read-write, and a qcow2
// image with data read-only, in the structured and extended modes.
func TestConformance(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	roSrc := makeQcow2(t, t.TempDir(), "12M")
	roModel := qemutest.RawBytes(t, roSrc)
	cases := []struct {
		name, format, size, opts string
		readOnly                 bool
		mode                     mode
	}{
		{"raw", "raw", "8M", "", false, modes[1]},
		{"qcow2", "qcow2", "16M", "cluster_size=65536", false, modes[2]},
		{"qcow2-simple", "qcow2", "8M", "cluster_size=4096", false, modes[0]},
		{"qcow2-ro", "qcow2", "", "", true, modes[2]},
		{"raw-ro", "raw", "", "", true, modes[1]},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var model []byte
			if tc.readOnly {
				model = roModel
			}
			open := func(t *testing.T) disk.Image {
				dir := t.TempDir()
				p := filepath.Join(dir, "img."+tc.format)
				switch {
				case tc.readOnly && tc.format == "qcow2":
					p = roSrc
				case tc.readOnly:
					qemutest.Img(t, "convert", "-O", "raw", roSrc, p)
				default:
					qemutest.Create(t, p, tc.format, tc.opts, tc.size)
				}
				img := openImage(t, p, tc.format, tc.readOnly)
				s := startServer(t, "unix", []nbd.Export{{Image: img}}, nbd.Options{})
				return s.dial(t, tc.mode.opts)
			}
			if !tc.readOnly {
				size := int64(8 << 20)
				if tc.size == "16M" {
					size = 16 << 20
				}
				model = make([]byte, size)
			}
			disktest.Run(t, open, disktest.Options{ReadOnly: tc.readOnly, Model: model, ParallelSize: 4 << 20})
		})
	}
}
