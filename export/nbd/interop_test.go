package nbd

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/imgloop/imgloop/internal/qemutest"
)

// makeQcow2 makes a qcow2 image with data, zeros, a discarded range and
// compressed clusters, written by qemu-io.
func makeQcow2(t testing.TB, dir, size string) string {
	t.Helper()
	p := filepath.Join(dir, "img.qcow2")
	qemutest.Create(t, p, "qcow2", "cluster_size=65536", size)
	qemutest.IO(t, p, "qcow2",
		"write -P 0xaa 0 1M", "write -P 0x55 3M 64k", "write -z 1M 128k",
		"write -c -P 0x11 8M 256k", "discard 0 64k", "write -P 0x77 4097k 3k")
	return p
}

func TestQemuImgConvert(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	src := makeQcow2(t, dir, "16M")
	want := qemutest.RawBytes(t, src)
	img := openImage(t, src, "qcow2", true)
	s := startServer(t, []Export{{Name: "", Image: img}, {Name: "second", Image: img}}, Options{})
	for _, name := range []string{"", "second"} {
		out := filepath.Join(dir, "out"+name+".raw")
		qemutest.Img(t, "convert", "-f", "raw", s.uri(name), "-O", "raw", out)
		got, err := os.ReadFile(out)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("export %q: differs from qemu-img convert at %d", name, qemutest.FirstDiff(got, want))
		}
	}
}
