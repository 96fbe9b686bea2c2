package disk_test

import (
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/disk/hostfile/hostfiletest"
)

// fileImage is a minimal disk.Image over its host file, for fake drivers.
type fileImage struct {
	f    disk.File
	opts disk.OpenOptions
}

func (i *fileImage) ReadAt(p []byte, off int64) (int, error)  { return i.f.ReadAt(p, off) }
func (i *fileImage) WriteAt(p []byte, off int64) (int, error) { return i.f.WriteAt(p, off) }
func (i *fileImage) Size() int64                              { s, _ := i.f.Size(); return s }
func (i *fileImage) SectorSize() int                          { return 512 }
func (i *fileImage) Flush() error                             { return i.f.Sync() }
func (i *fileImage) Close() error                             { return i.f.Close() }

func openFileImage(f disk.File, opts disk.OpenOptions) (disk.Image, error) {
	return &fileImage{f: f, opts: opts}, nil
}

// openFDs counts this process's open file descriptors.
func openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skipf("cannot count file descriptors: %v", err)
	}
	return len(ents)
}

func writeFile(t *testing.T, content string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "img")
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestOpenFailureClosesFile(t *testing.T) {
	register(t,
		&fakeDriver{name: "fake-refuses", magic: "REFUSE", score: 100},
		&fakeDriver{name: "fake-opens", magic: "OPEN", score: 100, open: openFileImage},
	)
	cases := []struct {
		name    string
		content string
		opts    disk.OpenOptions
		wantErr error
	}{
		{"unknown format name", "OPEN", disk.OpenOptions{Format: "no-such-format"}, disk.ErrUnknownFormat},
		{"no driver recognises it", "garbage", disk.OpenOptions{}, disk.ErrUnknownFormat},
		{"empty file", "", disk.OpenOptions{}, disk.ErrUnknownFormat},
		{"driver refuses (probed)", "REFUSE", disk.OpenOptions{}, disk.ErrFormat},
		{"driver refuses (named)", "OPEN", disk.OpenOptions{Format: "fake-refuses"}, disk.ErrFormat},
		{"read-only, driver refuses", "REFUSE", disk.OpenOptions{ReadOnly: true}, disk.ErrFormat},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			path := writeFile(t, c.content)
			before := openFDs(t)
			for range 3 {
				img, err := disk.Open(path, c.opts)
				if !errors.Is(err, c.wantErr) || img != nil {
					t.Fatalf("Open = %v, %v; want nil, %v", img, err, c.wantErr)
				}
			}
			if after := openFDs(t); after != before {
				t.Fatalf("%d file descriptors before Open, %d after failed Opens", before, after)
			}
		})
	}
	t.Run("missing file", func(t *testing.T) {
		_, err := disk.Open(filepath.Join(t.TempDir(), "nope"), disk.OpenOptions{})
		if !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("Open(missing) = %v, want fs.ErrNotExist", err)
		}
	})
	t.Run("success owns the file", func(t *testing.T) {
		path := writeFile(t, "OPEN sesame")
		before := openFDs(t)
		img, err := disk.Open(path, disk.OpenOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if openFDs(t) != before+1 {
			t.Fatal("a successful Open does not hold one file")
		}
		img.Close()
		if openFDs(t) != before {
			t.Fatal("Close did not release the file")
		}
	})
}

func TestOpenOptionsReachDriver(t *testing.T) {
	register(t, &fakeDriver{name: "fake-opts", magic: "OPTS", score: 100, open: openFileImage})
	path := writeFile(t, "OPTS header")
	cases := []struct {
		name       string
		opts       disk.OpenOptions
		wantProbed bool
		writable   bool
	}{
		{"probed", disk.OpenOptions{}, true, true},
		{"named", disk.OpenOptions{Format: "fake-opts"}, false, true},
		{"read-only", disk.OpenOptions{ReadOnly: true}, true, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			img, err := disk.Open(path, c.opts)
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			fi := img.(*fileImage)
			if fi.opts.Probed != c.wantProbed {
				t.Errorf("Probed = %v, want %v", fi.opts.Probed, c.wantProbed)
			}
			if _, err := img.WriteAt([]byte("x"), 100); (err == nil) != c.writable {
				t.Errorf("write to the host file: %v, writable %v", err, c.writable)
			}
		})
	}
}

func TestOpenChainChecks(t *testing.T) {
	register(t, &fakeDriver{name: "fake-chain", magic: "CHAIN", score: 100, open: openFileImage})
	path := writeFile(t, "CHAIN")
	abs, _ := filepath.Abs(path)
	abs, _ = filepath.EvalSymlinks(abs)
	link := filepath.Join(t.TempDir(), "link")
	if err := os.Symlink(path, link); err != nil {
		t.Fatal(err)
	}
	deep := make([]string, disk.MaxChainDepth+1)
	for i := range deep {
		deep[i] = "/nonexistent/layer" + strings.Repeat("x", i%3)
	}
	cases := []struct {
		name    string
		path    string
		parents []string
		wantErr string // "" for success
	}{
		{"no parents", path, nil, ""},
		{"unrelated parents", path, []string{"/a", "/b"}, ""},
		{"loop", path, []string{"/a", abs}, "loops"},
		{"loop through a symlink", link, []string{abs}, "loops"},
		{"at the depth limit", path, deep[:disk.MaxChainDepth], ""},
		{"too deep", path, deep, "deeper"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			img, err := disk.Open(c.path, disk.OpenOptions{Parents: c.parents})
			if c.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				img.Close()
				return
			}
			if !errors.Is(err, disk.ErrFormat) || !strings.Contains(err.Error(), c.wantErr) {
				t.Fatalf("Open = %v, want a format error about %q", err, c.wantErr)
			}
		})
	}
}

func TestOpenFileLeavesFileToCaller(t *testing.T) {
	register(t, &fakeDriver{name: "fake-of", magic: "OF", score: 100})
	mem := hostfiletest.NewMemFile("m", []byte("OF"))
	if _, err := disk.OpenFile(mem, disk.OpenOptions{}); !errors.Is(err, disk.ErrFormat) {
		t.Fatalf("OpenFile = %v, want the driver's format error", err)
	}
	if _, err := mem.Size(); err != nil {
		t.Fatalf("OpenFile closed the caller's file on error: %v", err)
	}
	// A host file that cannot be read: the error says so.
	f := hostfiletest.NewFaulty(mem)
	f.FailAfter(hostfiletest.OpRead, 0, io.ErrClosedPipe)
	if _, err := disk.OpenFile(f, disk.OpenOptions{}); !errors.Is(err, io.ErrClosedPipe) {
		t.Fatalf("OpenFile on an unreadable file = %v", err)
	}
}
