package qcow2

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/imgloop/imgloop/internal/qemutest"
)

// FuzzHeader feeds arbitrary bytes to readHeader and readSnapshots, once
// as a file of that size and once as a file that claims to be 1 TiB but
// whose reads stop early: neither may panic, and every allocation must be
// bounded by the limits, not by fields of the input.
func FuzzHeader(f *testing.F) {
	f.Add([]byte("QFI\xfb\x00\x00\x00\x03"))
	f.Fuzz(func(t *testing.T, data []byte) {
		for _, size := range []int64{int64(len(data)), int64(len(data)) + 1<<40} {
			r := bytes.NewReader(data)
			h, err := readHeader(r, size)
			if err != nil {
				continue
			}
			_ = h.Fields()
			_ = h.FormatSpecific()
			_ = h.ClusterSize() + h.L2Entries()
			list, err := readSnapshots(r, h, size)
			if err != nil {
				continue
			}
			if len(list) != int(h.NbSnapshots) {
				t.Fatalf("%d snapshots, header says %d", len(list), h.NbSnapshots)
			}
			for _, s := range list {
				_ = s.Info()
			}
			if len(list) > 0 {
				if _, err := findSnapshot(list, list[0].Name); err != nil {
					t.Fatal(err)
				}
			}
		}
	})
}

// maxSeedSize bounds each seed of testdata/fuzz/FuzzHeader, keeping the
// committed corpus tiny.
const maxSeedSize = 4096

// TestGenerateFuzzCorpus rewrites testdata/fuzz/FuzzHeader from images made
// by qemu-img. It runs only with IMGLOOP_GEN_FUZZ_CORPUS=1:
//
//	IMGLOOP_GEN_FUZZ_CORPUS=1 go test -run TestGenerateFuzzCorpus ./disk/qcow2/
func TestGenerateFuzzCorpus(t *testing.T) {
	if os.Getenv("IMGLOOP_GEN_FUZZ_CORPUS") != "1" {
		t.Skip("set IMGLOOP_GEN_FUZZ_CORPUS=1 to regenerate testdata/fuzz/FuzzHeader")
	}
	qemutest.Require(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	createImage(t, dir, "base.qcow2", "cluster_size=512", "64k") // the backing seed's
	seeds := []struct {
		name, opts, size string
		extra            []string
		snapshots        int
		bitmaps          int
	}{
		{"v2", "compat=0.10,cluster_size=512", "64k", nil, 0, 0},
		{"v3", "cluster_size=512", "64k", nil, 0, 0},
		{"v3-64k", "", "1G", nil, 0, 0},
		{"backing", "cluster_size=512", "64k", []string{"-b", "base.qcow2", "-F", "qcow2"}, 0, 0},
		{"zstd-extl2", "cluster_size=16k,extended_l2=on,compression_type=zstd", "1M", nil, 0, 0},
		{"datafile", "cluster_size=512,data_file=d.raw,data_file_raw=on", "64k", nil, 0, 0},
		{"snapshots", "cluster_size=512", "4k", nil, 2, 0},
		{"snapshots-v2", "compat=0.10,cluster_size=512", "4k", nil, 1, 0},
		{"bitmaps", "cluster_size=512", "4k", nil, 0, 2},
	}
	out := filepath.Join("testdata", "fuzz", "FuzzHeader")
	if err := os.MkdirAll(out, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, s := range seeds {
		path := createImage(t, dir, s.name+".qcow2", s.opts, s.size, s.extra...)
		for i := 0; i < s.snapshots; i++ {
			qemutest.Img(t, "snapshot", "-c", fmt.Sprintf("snap%d", i), path)
		}
		for i := 0; i < s.bitmaps; i++ {
			qemutest.Img(t, "bitmap", "--add", path, fmt.Sprintf("bitmap%d", i))
		}
		b := readFile(t, path)
		if len(b) > maxSeedSize {
			// A cut image: its tail past the extensions is zeros, which
			// add nothing but size.
			b = bytes.TrimRight(b[:maxSeedSize], "\x00")
		} else if _, err := parseSnapshots(b); err != nil {
			t.Fatalf("%s: whole image does not parse: %v", s.name, err)
		}
		body := "go test fuzz v1\n[]byte(" + strconv.Quote(string(b)) + ")\n"
		if err := os.WriteFile(filepath.Join(out, s.name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("%s: %d bytes", s.name, len(b))
	}
}
