package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"

	"github.com/imgloop/imgloop/internal/qemutest"
)

// infoKeys are the qemu-img info JSON keys compared one by one.
var infoKeys = []string{
	"format", "virtual-size", "cluster-size", "backing-filename", "full-backing-filename",
	"backing-filename-format", "dirty-flag", "snapshots", "format-specific", "filename", "actual-size",
}

// TestInfoOracle compares `imgloop info` with `qemu-img info` on the same
// images: JSON key by key, and the human output as text.
func TestInfoOracle(t *testing.T) {
	dir, imgs := sharedImages(t)
	for _, img := range imgs {
		t.Run(img.name, func(t *testing.T) {
			args := append(append([]string{"info", "--output=json"}, img.openArgs()...), img.name)
			var got, want map[string]any
			if err := json.Unmarshal([]byte(mustRun(t, dir, args...)), &got); err != nil {
				t.Fatalf("imgloop info: %v", err)
			}
			if err := json.Unmarshal([]byte(qemuImg(t, dir, args...)), &want); err != nil {
				t.Fatalf("qemu-img info: %v", err)
			}
			// imgloop counts an external data file in actual-size (as
			// later QEMU versions do); QEMU 7.2 counts the image only.
			dataFile := img.name == "ext.qcow2"
			if dataFile {
				want["actual-size"] = want["actual-size"].(float64) + float64(allocated(t, filepath.Join(dir, "ext.data")))
			}
			mask := func(s string) string {
				if dataFile {
					return maskSizes(s)
				}
				return s
			}
			for _, k := range infoKeys {
				if !reflect.DeepEqual(got[k], want[k]) {
					g, _ := json.Marshal(got[k])
					w, _ := json.Marshal(want[k])
					t.Errorf("%q = %s, qemu-img says %s", k, g, w)
				}
			}
			// The texts themselves, key order included.
			if g, w := mask(mustRun(t, dir, args...)), mask(qemuImg(t, dir, args...)); g != w {
				t.Errorf("JSON text differs:\n--- imgloop\n%s--- qemu-img\n%s", g, w)
			}
			args = append([]string{"info"}, args[2:]...)
			if g, w := mask(mustRun(t, dir, args...)), mask(qemuImg(t, dir, args...)); g != w {
				t.Errorf("human output differs:\n--- imgloop\n%s--- qemu-img\n%s", g, w)
			}
		})
	}
}

var (
	actualSizeRE = regexp.MustCompile(`"actual-size": [0-9]+`)
	diskSizeRE   = regexp.MustCompile(`(?m)^disk size: .*$`)
)

// maskSizes hides the host allocation, which depends on the file system.
func maskSizes(s string) string {
	s = actualSizeRE.ReplaceAllString(s, `"actual-size": MASKED`)
	return diskSizeRE.ReplaceAllString(s, "disk size: MASKED")
}

// TestGolden checks info and map output against testdata/*.golden
// (go test -run TestGolden -update rewrites them).
func TestGolden(t *testing.T) {
	dir, _ := sharedImages(t)
	tests := []struct {
		golden string
		args   []string
	}{
		{"info-raw", []string{"info", "-f", "raw", "disk.raw"}},
		{"info-raw-json", []string{"info", "-f", "raw", "--output=json", "disk.raw"}},
		{"info-top", []string{"info", "top.qcow2"}},
		{"info-top-json", []string{"info", "--output", "json", "top.qcow2"}},
		{"info-ext", []string{"info", "ext.qcow2"}},
		{"map-raw", []string{"map", "-f", "raw", "disk.raw"}},
		{"map-raw-json", []string{"map", "-f", "raw", "--output=json", "disk.raw"}},
		{"map-top", []string{"map", "top.qcow2"}},
		{"map-top-json", []string{"map", "--output=json", "top.qcow2"}},
		{"map-plain-json", []string{"map", "--output=json", "plain.qcow2"}},
		{"map-offset-raw", []string{"map", "-f", "raw", "--offset", "1048577", "disk.raw"}},
		{"map-offset-top", []string{"map", "--offset", "0", "top.qcow2"}},
		{"map-offset-zlib-json", []string{"map", "--output=json", "--offset", "1050000", "zlib.qcow2"}},
	}
	for _, tt := range tests {
		t.Run(tt.golden, func(t *testing.T) {
			golden(t, tt.golden, maskSizes(mustRun(t, dir, tt.args...)))
		})
	}
}

// TestInfoHeader checks --header: "name: value" lines for qcow2, an error
// for other formats.
func TestInfoHeader(t *testing.T) {
	dir, _ := sharedImages(t)
	out := mustRun(t, dir, "info", "--header", "plain.qcow2")
	lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
	if len(lines) < 10 {
		t.Fatalf("--header printed %d lines:\n%s", len(lines), out)
	}
	for _, l := range lines {
		if name, _, ok := strings.Cut(l, ": "); !ok || name == "" || strings.Contains(name, " ") {
			t.Errorf("--header line %q is not \"name: value\"", l)
		}
	}
	for _, want := range []string{"version: 3", "cluster_bits: 16", "size: 8388608"} {
		if !strings.Contains(out, want+"\n") {
			t.Errorf("--header output lacks %q:\n%s", want, out)
		}
	}
	args := []string{"info", "--header", "-f", "raw", "disk.raw"}
	checkFailure(t, imgloop(t, dir, args...), args)
}

// TestInfoSnapshot checks --snapshot against the snapshot's size and the
// error for an unknown one.
func TestInfoSnapshot(t *testing.T) {
	dir, _ := sharedImages(t)
	for _, id := range []string{"1", "first"} {
		out := mustRun(t, dir, "info", "--snapshot", id, "snap.qcow2")
		if !strings.Contains(out, "virtual size: 4 MiB (4194304 bytes)") {
			t.Errorf("--snapshot %s:\n%s", id, out)
		}
	}
	args := []string{"info", "--snapshot", "nope", "snap.qcow2"}
	checkFailure(t, imgloop(t, dir, args...), args)
}

// TestInfoMissingBacking: like qemu-img info, imgloop info describes an
// overlay whose backing file is gone (it does not open the backing file).
func TestInfoMissingBacking(t *testing.T) {
	dir := t.TempDir()
	qemutest.Create(t, filepath.Join(dir, "base.qcow2"), "qcow2", "", "4M")
	qemutest.Create(t, filepath.Join(dir, "top.qcow2"), "qcow2", "", "", "-b", "base.qcow2", "-F", "qcow2")
	if err := os.Remove(filepath.Join(dir, "base.qcow2")); err != nil {
		t.Fatal(err)
	}
	args := []string{"info", "--output=json", "top.qcow2"}
	var got, want map[string]any
	if err := json.Unmarshal([]byte(mustRun(t, dir, args...)), &got); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal([]byte(qemuImg(t, dir, args...)), &want); err != nil {
		t.Fatal(err)
	}
	for _, k := range infoKeys {
		if !reflect.DeepEqual(got[k], want[k]) {
			t.Errorf("%q = %v, qemu-img says %v", k, got[k], want[k])
		}
	}
	// Reading needs the backing file: map must fail cleanly.
	checkFailure(t, imgloop(t, dir, "map", "top.qcow2"), []string{"map", "top.qcow2"})
}
