package qcow2

import (
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/disk/hostfile"
	_ "github.com/imgloop/imgloop/disk/raw" // backing files in raw format
	"github.com/imgloop/imgloop/internal/qemutest"
)

// parseOpts splits "k=v,k=v" into a map.
func parseOpts(t testing.TB, s string) map[string]string {
	t.Helper()
	m := map[string]string{}
	if s == "" {
		return m
	}
	for _, kv := range strings.Split(s, ",") {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			t.Fatalf("bad option %q", kv)
		}
		m[k] = v
	}
	return m
}

// createCase is one image shape created by both imgloop and qemu-img.
type createCase struct {
	name string
	opts string // -o options; DATA stands for the data file name
	size string // "" takes the size from the backing file
	// backing is the backing file's format ("" for none); the backing
	// file holds a pattern that the new image must show.
	backing string
	// identical: the files must be byte for byte what qemu-img writes
	// (data file names aside). Otherwise only the header fields that
	// place the tables are compared.
	identical bool
}

var createCases = []createCase{
	{name: "default", size: "1G", identical: true},
	{name: "compat-0.10", opts: "compat=0.10", size: "100M", identical: true},
	{name: "compat-v3", opts: "compat=v3,lazy_refcounts=on", size: "10M", identical: true},
	{name: "cluster-512", opts: "cluster_size=512", size: "1G", identical: true},
	{name: "cluster-4k-refcount-1", opts: "cluster_size=4k,refcount_bits=1", size: "33M", identical: true},
	{name: "cluster-2M-refcount-64", opts: "cluster_size=2M,refcount_bits=64", size: "10G", identical: true},
	{name: "refcount-8-odd-size", opts: "refcount_bits=8", size: "1000", identical: true},
	{name: "empty", size: "0", identical: true},
	{name: "extended-l2-zstd", opts: "extended_l2=on,compression_type=zstd,cluster_size=16k", size: "64M", identical: true},
	{name: "prealloc-metadata", opts: "preallocation=metadata", size: "64M", identical: true},
	{name: "prealloc-falloc", opts: "preallocation=falloc,lazy_refcounts=on", size: "64M", identical: true},
	{name: "prealloc-full-v2", opts: "preallocation=full,compat=0.10", size: "64M", identical: true},
	{name: "prealloc-metadata-4k", opts: "preallocation=metadata,cluster_size=4k", size: "64M", identical: true},
	{name: "prealloc-metadata-512-refcount-1", opts: "preallocation=metadata,cluster_size=512,refcount_bits=1", size: "8M", identical: true},
	{name: "prealloc-falloc-4k", opts: "preallocation=falloc,cluster_size=4k", size: "64M", identical: true},
	{name: "prealloc-full-512-refcount-64", opts: "preallocation=full,cluster_size=512,refcount_bits=64", size: "3M", identical: true},
	// QEMU moves the refcount table here; imgloop falls back to its
	// plain layout.
	{name: "prealloc-metadata-512-refcount-64", opts: "preallocation=metadata,cluster_size=512,refcount_bits=64", size: "3M"},
	{name: "prealloc-metadata-1k-big-l1", opts: "preallocation=metadata,cluster_size=1k", size: "40M", identical: true},
	{name: "prealloc-full-odd-size", opts: "preallocation=full,cluster_size=4k", size: "5000", identical: true},
	{name: "prealloc-extended-l2", opts: "preallocation=metadata,extended_l2=on", size: "3M", identical: true},
	{name: "data-file", opts: "data_file=DATA", size: "10M", identical: true},
	{name: "data-file-raw", opts: "data_file=DATA,data_file_raw=on", size: "10M", identical: true},
	{name: "data-file-falloc", opts: "data_file=DATA,preallocation=falloc", size: "4M", identical: true},
	{name: "backing-raw", size: "8M", backing: "raw", identical: true},
	{name: "backing-qcow2-size-from-backing", opts: "cluster_size=4k", backing: "qcow2", identical: true},
	{name: "backing-v2", opts: "compat=0.10", backing: "qcow2", identical: true},
	{name: "backing-data-file", opts: "data_file=DATA", size: "2M", backing: "raw", identical: true},
}

// TestCreateMatchesQemu creates each shape with imgloop and with
// qemu-img and checks imgloop's image: qemu-img check finds nothing,
// qemu-img info agrees with qemu-img's own image, imgloop and qemu read
// the same disk, and qemu-io can write to it.
func TestCreateMatchesQemu(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	for _, tc := range createCases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			// QEMU opens external data files relative to its working
			// directory, imgloop relative to the image: run in dir.
			t.Chdir(dir)
			var extra []string
			var pattern []byte
			if tc.backing != "" {
				base := filepath.Join(dir, "base."+tc.backing)
				qemutest.Create(t, base, tc.backing, "", "3M")
				qemutest.IO(t, base, tc.backing, "write -P 0x5a 64k 128k", "write -P 0xa5 2M 4k")
				pattern = qemutest.RawBytes(t, base, "-f", tc.backing)
				extra = []string{"-b", "base." + tc.backing, "-F", tc.backing}
			}
			ours := filepath.Join(dir, "ours.qcow2")
			ref := filepath.Join(dir, "refs.qcow2")

			// qemu-img's image, created in dir so that relative names
			// resolve there.
			args := []string{"create", "-q", "-f", "qcow2"}
			if tc.opts != "" {
				args = append(args, "-o", strings.ReplaceAll(tc.opts, "DATA", "refs.data"))
			}
			args = append(args, extra...)
			args = append(args, "refs.qcow2")
			if tc.size != "" {
				args = append(args, tc.size)
			}
			if _, err := qemutest.TryIn(dir, "qemu-img", args...); err != nil {
				t.Fatal(err)
			}

			// Ours.
			m := parseOpts(t, strings.ReplaceAll(tc.opts, "DATA", "ours.data"))
			if tc.backing != "" {
				m["backing_file"] = "base." + tc.backing
				m["backing_fmt"] = tc.backing
			}
			size := int64(disk.SizeFromBacking)
			if tc.size != "" {
				n, err := disk.ParseSize(tc.size)
				if err != nil {
					t.Fatal(err)
				}
				size = n
			}
			if err := disk.Create("qcow2", ours, size, disk.CreateOptions{Options: m}); err != nil {
				t.Fatalf("Create: %v", err)
			}

			qemutest.Img(t, "check", ours)
			compareInfo(t, ours, ref)
			if tc.identical {
				compareFiles(t, ours, ref)
			} else {
				compareTables(t, ours, ref)
			}

			// imgloop reads what qemu reads: zeros or the backing file.
			// Large disks are sampled: the first 4 MiB and the last 1 MiB.
			img, err := disk.Open(ours, disk.OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatalf("Open: %v", err)
			}
			vsize := img.Size()
			got := readSample(t, img, 0, vsize)
			img.Close()
			if vsize <= 64<<20 && !tc.identical {
				// (An identical file reads as qemu-img's image does.)
				want := qemutest.RawBytes(t, ours)
				if d := firstDiff(got, want); d >= 0 {
					t.Fatalf("imgloop and qemu read differently at %#x", d)
				}
			}
			if pattern != nil {
				n := min(len(got), len(pattern))
				if d := firstDiff(got[:n], pattern[:n]); d >= 0 {
					t.Fatalf("backing data differs at %#x", d)
				}
				got = got[n:]
			}
			if !allZero(got) {
				t.Fatal("new image does not read as zeros")
			}

			// QEMU can write to it and stays consistent.
			last := int(vsize) - 512
			cmds := []string{"write -P 0x33 0 512", "read -P 0x33 0 512"}
			if last > 4096 {
				cmds = append(cmds, "write -P 0x44 "+strconv.Itoa(last)+" 512", "read -P 0x44 "+strconv.Itoa(last)+" 512")
			}
			if vsize > 0 {
				qemutest.IO(t, ours, "qcow2", cmds...)
			}
			qemutest.Img(t, "check", ours)
		})
	}
}

// readSample reads the whole disk of size bytes if it is at most 64 MiB,
// else its first 4 MiB followed by its last 1 MiB.
func readSample(t *testing.T, img disk.Image, off, size int64) []byte {
	t.Helper()
	read := func(off, n int64) []byte {
		p := make([]byte, n)
		if _, err := img.ReadAt(p, off); err != nil && !errors.Is(err, io.EOF) {
			t.Fatalf("ReadAt(%#x, %d): %v", off, n, err)
		}
		return p
	}
	if size <= 64<<20 {
		return read(off, size)
	}
	return append(read(0, 4<<20), read(size-1<<20, 1<<20)...)
}

// allZero reports whether p is all zeros (bytes.Equal, not a byte loop:
// fast under the race detector).
func allZero(p []byte) bool {
	zeros := make([]byte, 1<<20)
	for len(p) > 0 {
		n := min(len(p), len(zeros))
		if !bytes.Equal(p[:n], zeros[:n]) {
			return false
		}
		p = p[n:]
	}
	return true
}

// firstDiff is qemutest.FirstDiff, fast when a and b are equal.
func firstDiff(a, b []byte) int64 {
	if bytes.Equal(a, b) {
		return -1
	}
	return qemutest.FirstDiff(a, b)
}

// compareInfo checks that qemu-img info says the same of both images,
// data file names aside.
func compareInfo(t *testing.T, ours, ref string) {
	t.Helper()
	a, b := qemutest.Info(t, ours), qemutest.Info(t, ref)
	for _, k := range []string{"virtual-size", "cluster-size", "backing-filename", "backing-filename-format", "format", "dirty-flag"} {
		if !reflect.DeepEqual(a[k], b[k]) {
			t.Errorf("info %s: ours %v, qemu-img %v", k, a[k], b[k])
		}
	}
	fa, _ := a["format-specific"].(map[string]any)
	fb, _ := b["format-specific"].(map[string]any)
	if da, ok := fa["data"].(map[string]any); ok {
		if s, ok := da["data-file"].(string); ok {
			da["data-file"] = strings.Replace(s, "ours.data", "refs.data", 1)
		}
	}
	if !reflect.DeepEqual(fa, fb) {
		t.Errorf("info format-specific:\n ours    %v\n qemu-img %v", fa, fb)
	}
}

// compareFiles checks that both image files hold the same bytes.
func compareFiles(t *testing.T, ours, ref string) {
	t.Helper()
	a, err := os.ReadFile(ours)
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(ref)
	if err != nil {
		t.Fatal(err)
	}
	a = bytes.Replace(a, []byte("ours.data"), []byte("refs.data"), 1)
	if d := firstDiff(a, b); d >= 0 {
		t.Errorf("image files differ at %#x (ours %d bytes, qemu-img %d)", d, len(a), len(b))
	}
}

// compareTables checks the header fields that place the tables against
// qemu-img's image; where the rest of the layout differs, check covers it.
func compareTables(t *testing.T, ours, ref string) {
	t.Helper()
	ha, hb := readTestHeader(t, ours), readTestHeader(t, ref)
	type pos struct {
		L1Size, RefcountTableClusters uint32
		Incompat, Compat, Autoclear   uint64
		Version, RefcountOrder        uint32
		HeaderLength                  uint32
	}
	pa := pos{ha.L1Size, ha.RefcountTableClusters, ha.IncompatibleFeatures, ha.CompatibleFeatures, ha.AutoclearFeatures, ha.Version, ha.RefcountOrder, ha.HeaderLength}
	pb := pos{hb.L1Size, hb.RefcountTableClusters, hb.IncompatibleFeatures, hb.CompatibleFeatures, hb.AutoclearFeatures, hb.Version, hb.RefcountOrder, hb.HeaderLength}
	if pa != pb {
		t.Errorf("header:\n ours     %+v\n qemu-img %+v", pa, pb)
	}
	if ha.BackingFile != hb.BackingFile || ha.BackingFormat != hb.BackingFormat || !reflect.DeepEqual(ha.FeatureNames, hb.FeatureNames) {
		t.Errorf("header extensions differ: ours %q %q %v, qemu-img %q %q %v", ha.BackingFile, ha.BackingFormat, ha.FeatureNames, hb.BackingFile, hb.BackingFormat, hb.FeatureNames)
	}
}

func readTestHeader(t *testing.T, path string) *Header {
	t.Helper()
	f, err := hostfile.Open(path, true)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	size, err := f.Size()
	if err != nil {
		t.Fatal(err)
	}
	h, err := readHeader(f, size)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return h
}

// TestCreateErrors checks that bad options are refused with a clear
// error and leave no file behind.
func TestCreateErrors(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "base.raw")
	if err := os.WriteFile(base, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, opts string
		size       int64
		want       string
		option     bool // error matches disk.ErrInvalidOption
	}{
		{"unsafe without format", "backing_file=nope.qcow2", 1 << 20, "without backing format", true},
		{"unsafe without size", "backing_file=nope.qcow2,backing_fmt=qcow2", disk.SizeFromBacking, "needs a size", true},
		{"unknown option", "foo=bar", 1 << 20, `unknown parameter "foo"`, true},
		{"bad cluster size syntax", "cluster_size=64q", 1 << 20, "cluster_size: invalid size", true},
		{"cluster size not power of two", "cluster_size=3000", 1 << 20, "power of two between 512 and 2048k", true},
		{"cluster size too small", "cluster_size=256", 1 << 20, "power of two between 512 and 2048k", true},
		{"cluster size too large", "cluster_size=4M", 1 << 20, "power of two between 512 and 2048k", true},
		{"extended l2 small clusters", "cluster_size=4k,extended_l2=on", 1 << 20, "at least 16384 bytes", true},
		{"extended l2 v2", "compat=0.10,extended_l2=on", 1 << 20, "compatibility level 1.1", true},
		{"lazy refcounts v2", "compat=0.10,lazy_refcounts=on", 1 << 20, "compatibility level 1.1", true},
		{"zstd v2", "compat=0.10,compression_type=zstd", 1 << 20, "compatibility level 1.1", true},
		{"data file v2", "compat=0.10,data_file=d", 1 << 20, "compatibility level 1.1", true},
		{"refcount bits v2", "compat=0.10,refcount_bits=8", 1 << 20, "compatibility level 1.1", true},
		{"refcount bits 3", "refcount_bits=3", 1 << 20, "power of two and may not exceed 64", true},
		{"refcount bits 128", "refcount_bits=128", 1 << 20, "power of two and may not exceed 64", true},
		{"refcount bits text", "refcount_bits=x", 1 << 20, "refcount_bits: invalid number", true},
		{"bad bool", "lazy_refcounts=maybe", 1 << 20, "want on or off", true},
		{"bad compat", "compat=2", 1 << 20, `compat: invalid value "2"`, true},
		{"bad compression", "compression_type=lz4", 1 << 20, `compression_type: invalid value "lz4"`, true},
		{"bad preallocation", "preallocation=xx", 1 << 20, `preallocation: invalid value "xx"`, true},
		{"data file raw alone", "data_file_raw=on", 1 << 20, "data_file_raw requires data_file", true},
		{"data file raw with backing", "data_file=d,data_file_raw=on,backing_file=base.raw,backing_fmt=raw", 1 << 20, "cannot be used at the same time", true},
		{"no size", "", disk.SizeFromBacking, "needs a size", true},
		{"backing without format", "backing_file=base.raw", 1 << 20, "without backing format (detected format of raw", true},
		{"missing backing", "backing_file=nope.qcow2,backing_fmt=qcow2", 1 << 20, "could not open backing image", false},
		{"backing format alone", "backing_fmt=raw", 1 << 20, "without a backing file", true},
		{"too large", "cluster_size=512", 1 << 50, "too large", true},
		{"encryption", "encrypt.format=luks", 1 << 20, "encrypted", false},
		{"size twice", "size=1M", 1 << 20, "only once", true},
		{"data file in a missing folder", "data_file=nodir/d.raw", 1 << 20, "data file", false},
		{"data file is the image", "data_file=x.qcow2", 1 << 20, "is the image itself", true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(dir, "x.qcow2")
			err := disk.Create("qcow2", path, tc.size, disk.CreateOptions{
				Options: parseOpts(t, tc.opts),
				Unsafe:  strings.HasPrefix(tc.name, "unsafe"), // qemu-img create -u
			})
			if err == nil {
				t.Fatalf("Create succeeded, want error containing %q", tc.want)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q, want it to contain %q", err, tc.want)
			}
			if tc.option && !errors.Is(err, disk.ErrInvalidOption) {
				t.Errorf("error %v does not match disk.ErrInvalidOption", err)
			}
			if _, serr := os.Stat(path); !os.IsNotExist(serr) {
				t.Errorf("%s left behind after error", path)
			}
		})
	}
}

// TestCreateUnsafe checks that -u creates an image whose backing file
// does not exist, as qemu-img does.
func TestCreateUnsafe(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "x.qcow2")
	opts := map[string]string{"backing_file": "later.qcow2", "backing_fmt": "qcow2"}
	if err := disk.Create("qcow2", path, 1<<20, disk.CreateOptions{Options: opts, Unsafe: true}); err != nil {
		t.Fatal(err)
	}
	h := readTestHeader(t, path)
	if h.BackingFile != "later.qcow2" || h.BackingFormat != "qcow2" || h.Size != 1<<20 {
		t.Errorf("header: backing %q format %q size %d", h.BackingFile, h.BackingFormat, h.Size)
	}
}

// TestCreateDescribe checks the announcement line against qemu-img's.
func TestCreateDescribe(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "base.raw")
	if err := os.WriteFile(base, make([]byte, 3<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		opts string
		size int64
		want string
	}{
		{"", 1 << 30, "fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib size=1073741824 lazy_refcounts=off refcount_bits=16"},
		{"compat=1.1,preallocation=off,data_file_raw=off", 1 << 20, "fmt=qcow2 cluster_size=65536 extended_l2=off preallocation=off compression_type=zlib size=1048576 compat=1.1 data_file_raw=off lazy_refcounts=off refcount_bits=16"},
		{"lazy_refcounts=true,extended_l2=false,cluster_size=2M", 1 << 20, "fmt=qcow2 cluster_size=2097152 extended_l2=false compression_type=zlib size=1048576 lazy_refcounts=true refcount_bits=16"},
		{"backing_file=base.raw,backing_fmt=raw", disk.SizeFromBacking, "fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib size=3145728 backing_file=base.raw backing_fmt=raw lazy_refcounts=off refcount_bits=16"},
		{"data_file=d.raw,compression_type=zstd,refcount_bits=8", 1000, "fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zstd size=1000 data_file=d.raw lazy_refcounts=off refcount_bits=8"},
	}
	for _, tc := range tests {
		path := filepath.Join(dir, "x.qcow2")
		var line string
		err := disk.Create("qcow2", path, tc.size, disk.CreateOptions{
			Options:  parseOpts(t, tc.opts),
			Announce: func(s string) { line = s },
		})
		if err != nil {
			t.Fatalf("%q: %v", tc.opts, err)
		}
		if want := "Formatting '" + path + "', " + tc.want; line != want {
			t.Errorf("%q:\n got  %s\n want %s", tc.opts, line, want)
		}
	}
}

// TestCreateLayout checks the layout invariants (createLayout.verify)
// for shapes too large to create in a test.
func TestCreateLayout(t *testing.T) {
	for _, cb := range []uint32{9, 12, 16, 21} {
		for _, order := range []uint32{0, 3, 4, 6} {
			for _, size := range []int64{0, 1000, 1 << 20, 1 << 30, 1 << 40} {
				for _, prealloc := range []string{disk.PreallocOff, disk.PreallocMetadata, disk.PreallocFull} {
					for _, dataFile := range []string{"", "d"} {
						if prealloc != disk.PreallocOff && size>>cb > 1<<24 {
							continue // too slow for a unit test
						}
						p := &createParams{clusterBits: cb, refcountOrder: order, size: size, prealloc: prealloc, dataFile: dataFile}
						if p.l1Size() > maxL1Entries {
							continue
						}
						if _, err := p.layout(); err != nil && !strings.Contains(err.Error(), "too large") {
							t.Errorf("cluster_bits %d refcount_order %d size %d %s data file %q: %v", cb, order, size, prealloc, dataFile, err)
						}
					}
				}
			}
		}
	}
}

// TestPutRefcountEntry checks the packing of refcount entries, and that
// refcountEntry reads back what putRefcountEntry stored.
func TestPutRefcountEntry(t *testing.T) {
	tests := []struct {
		order uint
		i     uint64
		want  []byte
	}{
		{0, 0, []byte{0x01, 0, 0, 0, 0, 0, 0, 0}},
		{0, 9, []byte{0, 0x02, 0, 0, 0, 0, 0, 0}},
		{1, 5, []byte{0, 0x04, 0, 0, 0, 0, 0, 0}},
		{2, 3, []byte{0, 0x10, 0, 0, 0, 0, 0, 0}},
		{3, 2, []byte{0, 0, 1, 0, 0, 0, 0, 0}},
		{4, 1, []byte{0, 0, 0, 1, 0, 0, 0, 0}},
		{5, 1, []byte{0, 0, 0, 0, 0, 0, 0, 1}},
		{6, 0, []byte{0, 0, 0, 0, 0, 0, 0, 1}},
	}
	for _, tc := range tests {
		b := make([]byte, 8)
		putRefcountEntry(b, tc.order, tc.i, 1)
		if !bytes.Equal(b, tc.want) {
			t.Errorf("order %d entry %d: % x, want % x", tc.order, tc.i, b, tc.want)
		}
		if got := refcountEntry(b, tc.order, tc.i); got != 1 {
			t.Errorf("order %d entry %d: reads back %d, want 1", tc.order, tc.i, got)
		}
	}
}
