package hostfile

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"golang.org/x/sys/unix"
)

// Accesses as imgloop's opens take them on a qcow2 image file (and as
// qemu-io takes them): a writer, a reader, a reader that shares
// everything (force-share).
var (
	writer = [2]Perm{PermConsistentRead | PermWrite | PermResize, PermConsistentRead | PermWriteUnchanged}
	reader = [2]Perm{PermConsistentRead, PermConsistentRead | PermWriteUnchanged}
	shared = [2]Perm{PermConsistentRead, PermAll}
	none   = [2]Perm{0, PermAll}
)

// lockedBytes returns the lock bytes other opens of path see locked,
// tested from a new open file description.
func lockedBytes(t *testing.T, path string) []int64 {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var held []int64
	for _, base := range []int64{LockPermBase, LockSharedBase} {
		for i := int64(0); i < 5; i++ {
			lk := unix.Flock_t{Type: unix.F_WRLCK, Start: base + i, Len: 1}
			if err := unix.FcntlFlock(f.Fd(), unix.F_OFD_GETLK, &lk); err != nil {
				t.Fatal(err)
			}
			if lk.Type != unix.F_UNLCK {
				held = append(held, base+i)
			}
		}
	}
	return held
}

func newImage(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "img")
	if err := os.WriteFile(p, []byte("data"), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func open(t *testing.T, path string) *OSFile {
	t.Helper()
	f, err := Open(path, true)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// TestLockBytes checks which bytes each access locks: QEMU's layout
// (100 + bit held, 200 + bit not shared), as qemu-io shows for qcow2.
func TestLockBytes(t *testing.T) {
	for _, tc := range []struct {
		name   string
		access [2]Perm
		want   []int64
	}{
		{"writer", writer, []int64{100, 101, 103, 201, 203}},
		{"reader", reader, []int64{100, 201, 203}},
		{"force-share", shared, []int64{100}},
		{"nothing", none, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := newImage(t)
			f := open(t, p)
			if err := f.Lock(tc.access[0], tc.access[1]); err != nil {
				t.Fatal(err)
			}
			if got := lockedBytes(t, p); !slices.Equal(got, tc.want) {
				t.Errorf("locked bytes %v, want %v", got, tc.want)
			}
			if err := f.Lock(0, PermAll); err != nil {
				t.Fatal(err)
			}
			if got := lockedBytes(t, p); got != nil {
				t.Errorf("after unlocking: locked bytes %v", got)
			}
		})
	}
}

// TestLockConflicts opens one file twice (OFD locks conflict between open
// file descriptions of one process as between processes) and checks which
// second access the first one lets through, and QEMU's message otherwise.
func TestLockConflicts(t *testing.T) {
	for _, tc := range []struct {
		name          string
		first, second [2]Perm
		wantErr       string // "" for no conflict
	}{
		{"writer then writer", writer, writer, `Failed to get "write" lock`},
		{"writer then reader", writer, reader, `Failed to get shared "write" lock`},
		{"reader then writer", reader, writer, `Failed to get "write" lock`},
		{"reader then reader", reader, reader, ""},
		{"writer then force-share", writer, shared, ""},
		{"force-share then writer", shared, writer, ""},
		{"shares only writes then reader", [2]Perm{0, PermWrite}, reader, `Failed to get "consistent read" lock`},
		{"writer then resizer", writer, [2]Perm{PermResize, PermAll}, `Failed to get "resize" lock`},
		{"nothing then writer", none, writer, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := newImage(t)
			a, b := open(t, p), open(t, p)
			if err := a.Lock(tc.first[0], tc.first[1]); err != nil {
				t.Fatal(err)
			}
			before := lockedBytes(t, p)
			err := b.Lock(tc.second[0], tc.second[1])
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("second lock: %v", err)
				}
				return
			}
			var le *LockError
			if !errors.As(err, &le) || !errors.Is(err, ErrLocked) {
				t.Fatalf("second lock: %v, want a *LockError matching ErrLocked", err)
			}
			want := p + ": " + tc.wantErr + ": is another process using the image?"
			if err.Error() != want {
				t.Errorf("error %q, want %q", err, want)
			}
			// The failed open holds nothing more than before.
			if got := lockedBytes(t, p); !slices.Equal(got, before) {
				t.Errorf("after the conflict: locked bytes %v, want %v (the first open's)", got, before)
			}
			// Closing the first open ends the conflict.
			a.Close()
			if err := b.Lock(tc.second[0], tc.second[1]); err != nil {
				t.Errorf("after the first open closed: %v", err)
			}
		})
	}
}

// TestLockChangeKeepsOldOnConflict: a reader that fails to become a writer
// still holds a reader's locks.
func TestLockChangeKeepsOldOnConflict(t *testing.T) {
	p := newImage(t)
	a, b := open(t, p), open(t, p)
	if err := a.Lock(reader[0], reader[1]); err != nil {
		t.Fatal(err)
	}
	if err := b.Lock(reader[0], reader[1]); err != nil {
		t.Fatal(err)
	}
	if err := b.Lock(writer[0], writer[1]); !errors.Is(err, ErrLocked) {
		t.Fatalf("upgrade: %v, want ErrLocked", err)
	}
	a.Close()
	if got, want := lockedBytes(t, p), []int64{100, 201, 203}; !slices.Equal(got, want) {
		t.Errorf("locked bytes %v, want the reader's %v", got, want)
	}
	if err := b.Lock(writer[0], writer[1]); err != nil {
		t.Errorf("upgrade alone: %v", err)
	}
	// Giving up permissions never fails and unlocks their bytes.
	if err := b.Lock(reader[0], reader[1]); err != nil {
		t.Fatal(err)
	}
	if got, want := lockedBytes(t, p), []int64{100, 201, 203}; !slices.Equal(got, want) {
		t.Errorf("after downgrading: locked bytes %v, want %v", got, want)
	}
}

// TestCreateLocked: Create leaves a file another open writes to as it is.
func TestCreateLocked(t *testing.T) {
	p := newImage(t)
	a := open(t, p)
	if err := a.Lock(writer[0], writer[1]); err != nil {
		t.Fatal(err)
	}
	if _, err := Create(p); !errors.Is(err, ErrLocked) {
		t.Fatalf("Create: %v, want ErrLocked", err)
	}
	if b, err := os.ReadFile(p); err != nil || string(b) != "data" {
		t.Fatalf("file now %q, %v; want it untouched", b, err)
	}
	a.Close()
	f, err := Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if n, _ := f.Size(); n != 0 {
		t.Errorf("created file has %d bytes", n)
	}
	// A creator holds write and resize and refuses to share resize
	// (raw_co_create).
	if got, want := lockedBytes(t, p), []int64{101, 103, 203}; !slices.Equal(got, want) {
		t.Errorf("locked bytes %v, want %v", got, want)
	}
}

func TestPermString(t *testing.T) {
	for p, want := range map[Perm]string{
		0:                                  "",
		PermWrite:                          "write",
		PermConsistentRead | PermResize:    "consistent read, resize",
		PermAll:                            "consistent read, write, write unchanged, resize",
		PermWriteUnchanged | PermResize<<4: "write unchanged",
	} {
		if got := p.String(); got != want {
			t.Errorf("Perm(%#x) = %q, want %q", uint8(p), got, want)
		}
	}
}
