package raw

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/internal/qemutest"
)

// allocated returns the bytes the file at path occupies on disk.
func allocated(t *testing.T, path string) int64 {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		t.Skip("no st_blocks on this system")
	}
	return st.Blocks * 512
}

// TestCreate creates raw images as qemu-img does and compares size,
// allocation and content.
func TestCreate(t *testing.T) {
	tests := []struct {
		name, prealloc string
		size           int64
		wantSize       int64
		full           bool // every byte allocated
	}{
		{"sparse", "", 4 << 20, 4 << 20, false},
		{"off", "off", 1 << 20, 1 << 20, false},
		{"odd size rounds up", "", 1000, 1024, false},
		{"empty", "", 0, 0, false},
		{"falloc", "falloc", 3 << 20, 3 << 20, true},
		{"full", "full", 3<<20 + 512, 3<<20 + 512, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "x.raw")
			opts := map[string]string{}
			if tc.prealloc != "" {
				opts["preallocation"] = tc.prealloc
			}
			var line string
			err := disk.Create(Name, path, tc.size, disk.CreateOptions{Options: opts, Announce: func(s string) { line = s }})
			if err != nil {
				t.Fatal(err)
			}
			want := "Formatting '" + path + "', fmt=raw size=" + strconv.FormatInt(tc.size, 10)
			if tc.prealloc != "" {
				want += " preallocation=" + tc.prealloc
			}
			if line != want {
				t.Errorf("announced %q, want %q", line, want)
			}
			b, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if int64(len(b)) != tc.wantSize {
				t.Errorf("size %d, want %d", len(b), tc.wantSize)
			}
			for i, c := range b {
				if c != 0 {
					t.Fatalf("byte %#x is %#x, want 0", i, c)
				}
			}
			got := allocated(t, path)
			if tc.full && got < tc.wantSize {
				t.Errorf("%d bytes allocated, want at least %d", got, tc.wantSize)
			}
			if !tc.full && got > 64<<10 {
				t.Errorf("%d bytes allocated for a sparse image", got)
			}
			// qemu-img agrees on the virtual size.
			if _, err := qemutest.Try("qemu-img", "--version"); err == nil {
				info := qemutest.Info(t, path, "-f", "raw")
				if vs, _ := info["virtual-size"].(float64); int64(vs) != tc.wantSize {
					t.Errorf("qemu-img info virtual-size %v, want %d", info["virtual-size"], tc.wantSize)
				}
			}
		})
	}
}

// TestCreateErrors checks that bad options are refused clearly, leaving
// no file behind.
func TestCreateErrors(t *testing.T) {
	tests := []struct {
		name string
		opts map[string]string
		size int64
		want string
	}{
		{"metadata", map[string]string{"preallocation": "metadata"}, 1 << 20, "unsupported preallocation mode"},
		{"bad mode", map[string]string{"preallocation": "xx"}, 1 << 20, "unsupported preallocation mode"},
		{"backing", map[string]string{"backing_file": "b"}, 1 << 20, "backing file not supported"},
		{"unknown", map[string]string{"cluster_size": "64k"}, 1 << 20, `unknown parameter "cluster_size"`},
		{"no size", nil, disk.SizeFromBacking, "needs a size"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "x.raw")
			err := disk.Create(Name, path, tc.size, disk.CreateOptions{Options: tc.opts})
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want one containing %q", err, tc.want)
			}
			if !errors.Is(err, disk.ErrInvalidOption) {
				t.Errorf("error %v does not match disk.ErrInvalidOption", err)
			}
			if _, err := os.Stat(path); !os.IsNotExist(err) {
				t.Errorf("file left behind")
			}
		})
	}
}
