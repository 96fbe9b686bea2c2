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
// image with data read-only (and its raw copy), in all three modes.
func TestConformance(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	roSrc := filepath.Join(t.TempDir(), "ro.qcow2")
	qemutest.Create(t, roSrc, "qcow2", "cluster_size=65536", "4M")
	qemutest.IO(t, roSrc, "qcow2", "write -P 0xaa 0 1M", "write -z 1M 128k", "write -c -P 0x11 2M 256k",
		"discard 0 64k", "write -P 0x77 3073k 3k")
	roModel := qemutest.RawBytes(t, roSrc)
	cases := []struct {
		name, format, size, opts string
		readOnly                 bool
		mode                     mode
	}{
		{"raw-simple", "raw", "4M", "", false, modes[0]},
		{"qcow2-extended", "qcow2", "4M", "cluster_size=65536", false, modes[2]},
		{"qcow2-ro-structured", "qcow2", "", "", true, modes[1]},
		{"raw-ro-extended", "raw", "", "", true, modes[2]},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
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
				model = make([]byte, 4<<20)
			}
			disktest.Run(t, open, disktest.Options{ReadOnly: tc.readOnly, Model: model, ParallelSize: 2 << 20})
		})
	}
}
