package qcow2

import (
	"errors"
	"path/filepath"
	"strings"
	"testing"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/disk/hostfile"
	"github.com/imgloop/imgloop/disk/hostfile/hostfiletest"
	_ "github.com/imgloop/imgloop/disk/raw"
)

// Locking through disk.Open: the image file, the backing chain and the
// data file of qcow2 images, and raw images beside them (the access
// algebra itself is tested in package disk, the lock bytes in hostfile).

// newLockImage creates an image of format at dir/name with creation options.
func newLockImage(t *testing.T, dir, name, format string, opts map[string]string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := disk.Create(format, p, 1<<20, disk.CreateOptions{Options: opts}); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestLockOpen opens images twice (two opens of a file conflict as two
// processes do) and checks which second open the first one lets through.
func TestLockOpen(t *testing.T) {
	ro := disk.OpenOptions{ReadOnly: true}
	rw := disk.OpenOptions{}
	shareWrite := disk.OpenOptions{ReadOnly: true, ShareWrite: true}
	force := disk.OpenOptions{ReadOnly: true, ForceShare: true}
	for _, tc := range []struct {
		name          string
		format        string
		first, second disk.OpenOptions
		wantErr       string // "" for no conflict
	}{
		{"qcow2 rw then rw", "qcow2", rw, rw, `Failed to get "write" lock`},
		{"qcow2 rw then ro", "qcow2", rw, ro, `Failed to get shared "write" lock`},
		{"qcow2 ro then rw", "qcow2", ro, rw, `Failed to get "write" lock`},
		{"qcow2 ro then ro", "qcow2", ro, ro, ""},
		{"qcow2 rw then share-write", "qcow2", rw, shareWrite, `Failed to get shared "write" lock`},
		{"qcow2 rw then force-share", "qcow2", rw, force, ""},
		{"qcow2 force-share then rw", "qcow2", force, rw, ""},
		{"raw rw then rw", "raw", rw, rw, `Failed to get "write" lock`},
		{"raw rw then ro", "raw", rw, ro, `Failed to get shared "write" lock`},
		{"raw rw then share-write", "raw", rw, shareWrite, ""},
		{"raw share-write then rw", "raw", shareWrite, rw, ""},
		{"raw ro then ro", "raw", ro, ro, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := newLockImage(t, t.TempDir(), "img", tc.format, nil)
			tc.first.Format, tc.second.Format = tc.format, tc.format
			a, err := disk.Open(p, tc.first)
			if err != nil {
				t.Fatal(err)
			}
			defer a.Close()
			b, err := disk.Open(p, tc.second)
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("second open: %v", err)
				}
				b.Close()
				return
			}
			var le *disk.LockError
			if !errors.Is(err, disk.ErrLocked) || !errors.As(err, &le) {
				t.Fatalf("second open: %v, want a *disk.LockError matching ErrLocked", err)
			}
			if le.Path != p || !strings.Contains(err.Error(), tc.wantErr+": is another process using the image?") {
				t.Errorf("error %q (path %q), want %q about %s", err, le.Path, tc.wantErr, p)
			}
			// Closing the first open releases its locks.
			a.Close()
			b, err = disk.Open(p, tc.second)
			if err != nil {
				t.Fatalf("after the first open closed: %v", err)
			}
			b.Close()
		})
	}
}

// TestLockOpenChain: backing files are opened shared (two overlays of one
// backing file open read-write together) but not for writing, and an
// external data file is locked as the image is.
func TestLockOpenChain(t *testing.T) {
	dir := t.TempDir()
	base := newLockImage(t, dir, "base.qcow2", "qcow2", nil)
	backed := map[string]string{"backing_file": "base.qcow2", "backing_fmt": "qcow2"}
	top1 := newLockImage(t, dir, "top1.qcow2", "qcow2", backed)
	top2 := newLockImage(t, dir, "top2.qcow2", "qcow2", backed)
	a, err := disk.Open(top1, disk.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := disk.Open(top2, disk.OpenOptions{})
	if err != nil {
		t.Fatalf("second overlay of one backing file: %v", err)
	}
	defer b.Close()
	if _, err := disk.Open(base, disk.OpenOptions{}); !errors.Is(err, disk.ErrLocked) {
		t.Errorf("writing a backing file in use: %v, want ErrLocked", err)
	}
	if img, err := disk.Open(base, disk.OpenOptions{ReadOnly: true}); err != nil {
		t.Errorf("reading a backing file in use: %v", err)
	} else {
		img.Close()
	}

	withData := newLockImage(t, dir, "data.qcow2", "qcow2", map[string]string{"data_file": "data.raw"})
	img, err := disk.Open(withData, disk.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	_, err = disk.Open(filepath.Join(dir, "data.raw"), disk.OpenOptions{Format: "raw", ReadOnly: true})
	var le *disk.LockError
	if !errors.As(err, &le) || le.Path != filepath.Join(dir, "data.raw") {
		t.Errorf("reading the data file of an image open read-write: %v, want a *LockError about data.raw", err)
	}
	// The image file itself is held too: a second open fails on it
	// before it reaches the data file.
	if _, err := disk.Open(withData, disk.OpenOptions{ReadOnly: true}); !errors.As(err, &le) || le.Path != withData {
		t.Errorf("second open of the image: %v, want a *LockError about %s", err, withData)
	}
}

// TestLockOpenFile: OpenFile locks an OS file, and releases the locks
// when the driver fails; it leaves other files alone.
func TestLockOpenFile(t *testing.T) {
	dir := t.TempDir()
	p := newLockImage(t, dir, "img.qcow2", "qcow2", nil)
	f, err := hostfile.Open(p, false)
	if err != nil {
		t.Fatal(err)
	}
	img, err := disk.OpenFile(f, disk.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := disk.Open(p, disk.OpenOptions{ReadOnly: true}); !errors.Is(err, disk.ErrLocked) {
		t.Errorf("open beside OpenFile's: %v, want ErrLocked", err)
	}
	img.Close()

	// A driver that fails: the locks go, the file stays the caller's.
	g, err := hostfile.Open(p, false)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	if _, err := disk.OpenFile(g, disk.OpenOptions{Format: "qcow2", Snapshot: "no such snapshot"}); err == nil {
		t.Fatal("opening a missing snapshot: no error")
	}
	other, err := disk.Open(p, disk.OpenOptions{})
	if err != nil {
		t.Fatalf("after a failed OpenFile: %v", err)
	}
	other.Close()

	// In-memory files are not locked.
	mem := hostfiletest.NewMemFile("mem.raw", make([]byte, 4096))
	m1, err := disk.OpenFile(mem, disk.OpenOptions{Format: "raw"})
	if err != nil {
		t.Fatal(err)
	}
	defer m1.Close()
	mem2 := hostfiletest.NewMemFile("mem.raw", make([]byte, 4096))
	m2, err := disk.OpenFile(mem2, disk.OpenOptions{Format: "raw"})
	if err != nil {
		t.Fatal(err)
	}
	m2.Close()
}

// TestLockForceShareReadWrite: force-share is for readers only; nothing
// is opened.
func TestLockForceShareReadWrite(t *testing.T) {
	p := newLockImage(t, t.TempDir(), "img.qcow2", "qcow2", nil)
	if _, err := disk.Open(p, disk.OpenOptions{ForceShare: true}); err == nil || errors.Is(err, disk.ErrLocked) {
		t.Errorf("ForceShare read-write: %v, want an error other than ErrLocked", err)
	}
}
