package nbd

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"testing"
	"time"

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
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go s.Serve(ln)
	for _, uri := range []string{s.uri(""), s.uri("second"), "nbd://" + ln.Addr().String() + "/second"} {
		var info struct {
			Size   int64  `json:"virtual-size"`
			Format string `json:"format"`
		}
		if err := json.Unmarshal([]byte(qemutest.Img(t, "info", "--output=json", uri)), &info); err != nil {
			t.Fatal(err)
		}
		if info.Size != int64(len(want)) || info.Format != "raw" {
			t.Errorf("qemu-img info %s: %+v", uri, info)
		}
		out := filepath.Join(dir, "out.raw")
		qemutest.Img(t, "convert", "-f", "raw", uri, "-O", "raw", out)
		got, err := os.ReadFile(out)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("%s: differs from qemu-img convert at %d", uri, qemutest.FirstDiff(got, want))
		}
	}
}

// startQemuNBD serves image read-only with qemu-nbd (-A: the
// allocation depth context too) on a unix socket, for comparisons.
func startQemuNBD(t testing.TB, image, format string, args ...string) string {
	t.Helper()
	qemutest.Require(t, "qemu-nbd")
	sock := filepath.Join(shortDir(t), "q")
	args = append([]string{"-t", "-k", sock, "-f", format}, args...)
	cmd := exec.Command("qemu-nbd", append(args, image)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for deadline := time.Now().Add(10 * time.Second); ; {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			return "nbd+unix:///?socket=" + sock
		}
		if time.Now().After(deadline) {
			t.Fatalf("qemu-nbd did not start: %s", stderr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// nbdMap returns nbdinfo's map of a context of the export at uri.
func nbdMap(t testing.TB, uri, context string) []mapEntry {
	t.Helper()
	var m []mapEntry
	out := qemutest.Run(t, "nbdinfo", "--map="+context, "--json", uri)
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatalf("nbdinfo --map: %v\n%s", err, out)
	}
	return mergeMap(m)
}

// mapEntry is one extent of nbdinfo --map --json.
type mapEntry struct {
	Offset int64  `json:"offset"`
	Length int64  `json:"length"`
	Type   uint64 `json:"type"`
}

// mergeMap joins adjacent entries of the same type (servers may split
// extents where they like).
func mergeMap(m []mapEntry) []mapEntry {
	var out []mapEntry
	for _, e := range m {
		if k := len(out); k > 0 && out[k-1].Type == e.Type && out[k-1].Offset+out[k-1].Length == e.Offset {
			out[k-1].Length += e.Length
			continue
		}
		out = append(out, e)
	}
	return out
}

// mapFromQemuImg returns the map of base:allocation (or, depth, of
// qemu:allocation-depth) that qemu-img map's view of path implies.
func mapFromQemuImg(t testing.TB, path string, depth bool) []mapEntry {
	var m []mapEntry
	for _, e := range qemutest.Map(t, path) {
		var typ uint64
		switch {
		case depth && e.Present:
			typ = uint64(e.Depth) + 1
		case !depth && !e.Data:
			typ = 1
		}
		if !depth && e.Zero {
			typ |= 2
		}
		m = append(m, mapEntry{e.Start, e.Length, typ})
	}
	return mergeMap(m)
}

// TestMapMatchesQemuNBD compares nbdinfo's maps (base:allocation and
// qemu:allocation-depth) of images served by imgloop and by qemu-nbd.
func TestMapMatchesQemuNBD(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io", "nbdinfo", "qemu-nbd")
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	qemutest.Create(t, base, "qcow2", "", "16M")
	qemutest.IO(t, base, "qcow2", "write -P 1 0 2M", "write -z 6M 64k")
	top := filepath.Join(dir, "top.qcow2")
	qemutest.Create(t, top, "qcow2", "backing_file=base.qcow2,backing_fmt=qcow2", "16M")
	qemutest.IO(t, top, "qcow2", "write -P 2 1M 64k", "write -z 4M 1M", "write -c -P 3 10M 128k", "discard 1536k 64k")
	prealloc := filepath.Join(dir, "prealloc.qcow2")
	qemutest.Create(t, prealloc, "qcow2", "preallocation=metadata,cluster_size=4096", "4M")
	qemutest.IO(t, prealloc, "qcow2", "write -P 1 0 100k", "write -P 2 1M 3k", "write -z 2M 64k")
	sparse := filepath.Join(dir, "sparse.raw")
	qemutest.Create(t, sparse, "raw", "", "8M")
	qemutest.IO(t, sparse, "raw", "write -P 4 1M 1M", "write -P 5 7M 4k")
	tests := []struct {
		name, path, format string
	}{
		{"qcow2 with backing", top, "qcow2"},
		{"qcow2 base", base, "qcow2"},
		{"compressed", makeQcow2(t, t.TempDir(), "16M"), "qcow2"},
		{"raw sparse", sparse, "raw"},
		{"preallocated metadata", prealloc, "qcow2"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			img := openImage(t, tt.path, tt.format, true)
			s := startServer(t, []Export{{Image: img}}, Options{})
			q := startQemuNBD(t, tt.path, tt.format, "-r", "-A")
			// base:allocation is what qemu-img map (and so imgloop map)
			// and qemu-nbd report.
			got := nbdMap(t, s.uri(""), "base:allocation")
			if want := mapFromQemuImg(t, tt.path, false); !reflect.DeepEqual(got, want) {
				t.Errorf("base:allocation:\nimgloop      %v\nqemu-img map %v", got, want)
			}
			if want := nbdMap(t, q, "base:allocation"); !reflect.DeepEqual(got, want) {
				t.Errorf("base:allocation:\nimgloop  %v\nqemu-nbd %v", got, want)
			}
			got = nbdMap(t, s.uri(""), "qemu:allocation-depth")
			if want := nbdMap(t, q, "qemu:allocation-depth"); !reflect.DeepEqual(got, want) {
				t.Errorf("qemu:allocation-depth:\nimgloop  %v\nqemu-nbd %v", got, want)
			}
			if want := mapFromQemuImg(t, tt.path, true); !reflect.DeepEqual(got, want) {
				t.Errorf("qemu:allocation-depth:\nimgloop      %v\nqemu-img map %v", got, want)
			}
		})
	}
}

func TestNbdinfo(t *testing.T) {
	qemutest.Require(t, "qemu-img", "nbdinfo")
	dir := t.TempDir()
	a := filepath.Join(dir, "a.qcow2")
	qemutest.Create(t, a, "qcow2", "", "16M")
	b := filepath.Join(dir, "b.raw")
	qemutest.Create(t, b, "raw", "", "3M")
	s := startServer(t, []Export{
		{Name: "a", Description: "first", Image: openImage(t, a, "qcow2", false)},
		{Name: "b", Description: "second", Image: openImage(t, b, "raw", true)},
	}, Options{})
	var list struct {
		Exports []struct {
			Name        string   `json:"export-name"`
			Description string   `json:"description"`
			Size        int64    `json:"export-size"`
			ReadOnly    bool     `json:"is_read_only"`
			MultiConn   bool     `json:"can_multi_conn"`
			Trim        bool     `json:"can_trim"`
			Zero        bool     `json:"can_zero"`
			FastZero    bool     `json:"can_fast_zero"`
			Contexts    []string `json:"contexts"`
			Preferred   int64    `json:"block_size_preferred"`
			Maximum     int64    `json:"block_size_maximum"`
		} `json:"exports"`
	}
	out := qemutest.Run(t, "nbdinfo", "--list", "--json", s.uri(""))
	if err := json.Unmarshal([]byte(out), &list); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if len(list.Exports) != 2 {
		t.Fatalf("nbdinfo --list: %d exports, want 2\n%s", len(list.Exports), out)
	}
	e := list.Exports[0]
	if e.Name != "a" || e.Description != "first" || e.Size != 16<<20 || e.ReadOnly || !e.MultiConn || !e.Trim ||
		!e.Zero || !e.FastZero || e.Preferred != 65536 || e.Maximum != 32<<20 || len(e.Contexts) != 2 {
		t.Errorf("export a: %+v", e)
	}
	e = list.Exports[1]
	if e.Name != "b" || e.Description != "second" || e.Size != 3<<20 || !e.ReadOnly || e.Trim || e.Zero {
		t.Errorf("export b: %+v", e)
	}
	if _, err := qemutest.Try("nbdinfo", s.uri("missing")); err == nil {
		t.Error("nbdinfo of a missing export succeeded")
	}
}

func TestNbdcopy(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io", "nbdcopy")
	dir := t.TempDir()
	src := makeQcow2(t, dir, "32M")
	want := qemutest.RawBytes(t, src)
	s := startServer(t, []Export{{Image: openImage(t, src, "qcow2", true)}}, Options{})
	for _, conns := range []string{"1", "4"} {
		out := filepath.Join(dir, "out"+conns+".raw")
		qemutest.Run(t, "nbdcopy", "--connections="+conns, s.uri(""), out)
		got, err := os.ReadFile(out)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("nbdcopy -C %s: differs at %d", conns, qemutest.FirstDiff(got, want))
		}
	}
	// And in: into a fresh qcow2 export, which then reads as the source.
	dst := filepath.Join(dir, "dst.qcow2")
	qemutest.Create(t, dst, "qcow2", "", "32M")
	d := startServer(t, []Export{{Image: openImage(t, dst, "qcow2", false)}}, Options{})
	qemutest.Run(t, "nbdcopy", "--connections=4", "--requests=16", s.uri(""), d.uri(""))
	qemutest.Run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", s.uri(""), d.uri(""))
}

// TestQemuIOWrites writes into a qcow2 export with qemu-io over both
// transports, then checks the image with qemu-img against a model made
// by the same commands on a raw file.
func TestQemuIOWrites(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	p := filepath.Join(dir, "w.qcow2")
	qemutest.Create(t, p, "qcow2", "cluster_size=4096", "8M")
	model := filepath.Join(dir, "model.raw")
	qemutest.Create(t, model, "raw", "", "8M")
	img := openImage(t, p, "qcow2", false)
	s := startServer(t, []Export{{Image: img}}, Options{})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go s.Serve(ln)
	cmds := [][]string{
		{"write -P 0x11 0 1M", "write -P 0x22 100k 3k", "flush"},
		{"write -z 512k 64k", "discard 64k 8k", "write -P 0x33 -f 7M 1M"},
		{"aio_write -P 0x44 2M 512k", "aio_write -P 0x55 3M 512k", "aio_flush", "write -z -u 2M 4k"},
	}
	for i, c := range cmds {
		uri := s.uri("")
		if i%2 == 1 {
			uri = "nbd://" + ln.Addr().String() + "/"
		}
		args := []string{"-f", "raw"}
		for _, x := range c {
			args = append(args, "-c", x)
		}
		qemutest.Run(t, "qemu-io", append(args, uri)...)
		qemutest.IO(t, model, "raw", c...)
	}
	qemutest.Run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", s.uri(""), model)
	s.Shutdown(context.Background())
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	qemutest.Img(t, "check", "-f", "qcow2", p)
	qemutest.Img(t, "compare", "-f", "qcow2", "-F", "raw", p, model)
}
