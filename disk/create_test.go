package disk_test

import (
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/disk/hostfile"
)

func TestParseSize(t *testing.T) {
	tests := []struct {
		in   string
		want int64
		err  bool
	}{
		{"0", 0, false},
		{"512", 512, false},
		{"1000", 1000, false},
		{"64k", 64 << 10, false},
		{"64K", 64 << 10, false},
		{"1M", 1 << 20, false},
		{"1G", 1 << 30, false},
		{"1.5G", 3 << 29, false},
		{"1.5k", 1536, false},
		{"2T", 2 << 40, false},
		{"1P", 1 << 50, false},
		{"7E", 7 << 60, false},
		{"8E", 0, true},
		{"100b", 100, false},
		{"1.5", 0, true},
		{"", 0, true},
		{"k", 0, true},
		{"-1", 0, true},
		{"1X", 0, true},
		{"1..5M", 0, true},
		{"99999999999999999999", 0, true},
	}
	for _, tc := range tests {
		got, err := disk.ParseSize(tc.in)
		if (err != nil) != tc.err || got != tc.want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d, error %v", tc.in, got, err, tc.want, tc.err)
		}
	}
}

func TestParseBool(t *testing.T) {
	for in, want := range map[string]bool{"on": true, "true": true, "yes": true, "y": true, "off": false, "false": false, "no": false, "n": false} {
		got, err := disk.ParseBool(in)
		if err != nil || got != want {
			t.Errorf("ParseBool(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, in := range []string{"", "ON", "1", "maybe"} {
		if _, err := disk.ParseBool(in); err == nil {
			t.Errorf("ParseBool(%q) succeeded", in)
		}
	}
}

// creatorDriver is a fake driver that records Create calls.
type creatorDriver struct {
	fakeDriver
	size int64
	opts disk.CreateOptions
}

func (d *creatorDriver) Create(path string, size int64, opts disk.CreateOptions) error {
	d.size, d.opts = size, opts
	return nil
}

func TestCreate(t *testing.T) {
	c := &creatorDriver{fakeDriver: fakeDriver{name: "test-creator"}}
	plain := &fakeDriver{name: "test-nocreate"}
	for _, d := range []disk.Driver{c, plain} {
		if err := disk.Register(d); err != nil {
			t.Fatal(err)
		}
		defer disk.Unregister(d.Name())
	}
	tests := []struct {
		name     string
		format   string
		size     int64
		opts     map[string]string
		wantSize int64
		wantErr  error
	}{
		{"plain", "test-creator", 1 << 20, map[string]string{"a": "b"}, 1 << 20, nil},
		{"size option", "test-creator", disk.SizeFromBacking, map[string]string{"size": "2M"}, 2 << 20, nil},
		{"from backing", "test-creator", disk.SizeFromBacking, nil, disk.SizeFromBacking, nil},
		{"size twice", "test-creator", 1 << 20, map[string]string{"size": "2M"}, 0, disk.ErrInvalidOption},
		{"bad size option", "test-creator", disk.SizeFromBacking, map[string]string{"size": "2Q"}, 0, disk.ErrInvalidOption},
		{"negative", "test-creator", -5, nil, 0, disk.ErrInvalidOption},
		{"unknown format", "nope", 1, nil, 0, disk.ErrUnknownFormat},
		{"no creator", "test-nocreate", 1, nil, 0, disk.ErrNotSupported},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c.size = -99
			err := disk.Create(tc.format, "x", tc.size, disk.CreateOptions{Options: tc.opts})
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("Create: %v, want %v", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if c.size != tc.wantSize {
				t.Errorf("driver got size %d, want %d", c.size, tc.wantSize)
			}
			if _, ok := c.opts.Options["size"]; ok {
				t.Error("size option passed on to the driver")
			}
		})
	}
}

func TestAllocate(t *testing.T) {
	path := filepath.Join(t.TempDir(), "f")
	f, err := hostfile.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt([]byte{1}, 0); err != nil {
		t.Fatal(err)
	}
	for _, full := range []bool{false, true} {
		if err := disk.Allocate(f, 4096, 3<<20, full); err != nil {
			t.Fatalf("Allocate(full=%v): %v", full, err)
		}
	}
	if n, _ := f.Size(); n != 4096+3<<20 {
		t.Errorf("size %d after Allocate, want %d", n, 4096+3<<20)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && st.Blocks*512 < 3<<20 {
		t.Errorf("%d bytes allocated after Allocate, want at least %d", st.Blocks*512, 3<<20)
	}
}

func TestResolveName(t *testing.T) {
	tests := []struct{ image, name, want string }{
		{"/a/b/img.qcow2", "base.raw", "/a/b/base.raw"},
		{"/a/b/img.qcow2", "/abs/base.raw", "/abs/base.raw"},
		{"img.qcow2", "base.raw", "base.raw"},
		{"sub/img.qcow2", "../base.raw", "base.raw"},
	}
	for _, tc := range tests {
		if got := disk.ResolveName(tc.image, tc.name); got != tc.want {
			t.Errorf("ResolveName(%q, %q) = %q, want %q", tc.image, tc.name, got, tc.want)
		}
	}
}
