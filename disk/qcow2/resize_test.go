package qcow2

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/disk/hostfile"
	"github.com/imgloop/imgloop/disk/hostfile/hostfiletest"
	"github.com/imgloop/imgloop/internal/qemutest"
)

// resizeOpen opens path read-write with this package's Open.
func resizeOpen(t *testing.T, path string) *Image {
	t.Helper()
	f, err := hostfile.Open(path, false)
	if err != nil {
		t.Fatal(err)
	}
	img, err := Open(f, disk.OpenOptions{})
	if err != nil {
		f.Close()
		t.Fatalf("Open(%s): %v", path, err)
	}
	return img
}

// resizeCopy copies the file src to dst.
func resizeCopy(t *testing.T, src, dst string) {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// resizeVerify checks path against QEMU: `qemu-img check` finds no
// error and no leak, the virtual size is want, and the content equals
// that of ref (`qemu-img compare`).
func resizeVerify(t *testing.T, path, ref string, want int64) {
	t.Helper()
	dir := filepath.Dir(path)
	if out, err := qemutest.TryIn(dir, "qemu-img", "check", "-f", "qcow2", path); err != nil {
		t.Fatalf("qemu-img check after resize: %v\n%s", err, out)
	}
	out, err := qemutest.TryIn(dir, "qemu-img", "info", "--output=json", "-f", "qcow2", path)
	if err != nil {
		t.Fatal(err)
	}
	var info struct {
		VirtualSize int64 `json:"virtual-size"`
	}
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatal(err)
	}
	if info.VirtualSize != want {
		t.Errorf("qemu-img info: virtual-size %d, want %d", info.VirtualSize, want)
	}
	if out, err := qemutest.TryIn(dir, "qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", path, ref); err != nil {
		t.Errorf("qemu-img compare with the image qemu-img resized: %v\n%s", err, out)
	}
}

// l1Place returns the l1_size and l1_table_offset fields of the header.
func l1Place(t *testing.T, path string) (uint32, uint64) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var b [12]byte
	if _, err := f.ReadAt(b[:], offL1Size); err != nil {
		t.Fatal(err)
	}
	return binary.BigEndian.Uint32(b[:]), binary.BigEndian.Uint64(b[4:])
}

// TestResizeOracle resizes images of several cluster sizes and both
// versions with Resize and with `qemu-img resize`, then compares them,
// writes past the old end with both tools, and compares again.
func TestResizeOracle(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	type tc struct {
		name    string
		size    int64    // at creation
		writes  []string // qemu-io commands before the resize
		newSize int64
		moves   bool // the L1 table must move
	}
	const M, G = int64(1) << 20, int64(1) << 30
	cases := map[int][]tc{
		512: {
			{name: "grow small", size: M, writes: []string{"write -P 1 0 64k", "write -P 2 1000k 24k"}, newSize: M + 512},
			{name: "grow in place", size: 3 * M / 2, writes: []string{"write -P 1 1M 4k"}, newSize: 2 * M},
			{name: "grow L1 move", size: M, writes: []string{"write -P 3 512k 64k"}, newSize: 10 * M, moves: true},
			{name: "shrink free tail", size: 4 * M, writes: []string{"write -P 4 0 100k"}, newSize: M},
			{name: "shrink partial cluster", size: 4 * M, writes: []string{"write -P 4 1M 512"}, newSize: M + 512},
		},
		4096: {
			{name: "grow small", size: M, writes: []string{"write -P 1 0 64k"}, newSize: 3 * M},
			{name: "grow L1 move", size: M, writes: []string{"write -P 3 900k 100k"}, newSize: 2 * G, moves: true},
			{name: "grow from empty", size: 0, newSize: 5 * M, moves: true},
			{name: "shrink free tail", size: 8 * M, writes: []string{"write -P 4 0 1M"}, newSize: 2*M + 4096 + 512},
		},
		65536: {
			{name: "grow small", size: M, writes: []string{"write -P 1 0 64k", "write -P 2 960k 64k"}, newSize: M + 7*512},
			{name: "grow in place", size: M, writes: []string{"write -P 1 0 64k"}, newSize: 3 * G},
			{name: "grow L1 move", size: M, writes: []string{"write -P 5 100k 100k"}, newSize: 5 << 40, moves: true},
			{name: "shrink free tail", size: 2 * G, writes: []string{"write -P 4 0 64k", "write -P 5 600M 64k"}, newSize: 700 * M},
		},
	}
	for _, cs := range []int{512, 4096, 65536} {
		for _, compat := range []string{"0.10", "1.1"} {
			for _, c := range cases[cs] {
				t.Run(fmt.Sprintf("cs%d/%s/%s", cs, compat, c.name), func(t *testing.T) {
					dir := t.TempDir()
					path := filepath.Join(dir, "a.qcow2")
					ref := filepath.Join(dir, "ref.qcow2")
					qemutest.Create(t, path, "qcow2", fmt.Sprintf("cluster_size=%d,compat=%s", cs, compat), strconv.FormatInt(c.size, 10))
					if len(c.writes) > 0 {
						qemutest.IO(t, path, "qcow2", c.writes...)
					}
					resizeCopy(t, path, ref)
					args := []string{"resize", "-q", "-f", "qcow2"}
					if c.newSize < c.size {
						args = append(args, "--shrink")
					}
					qemutest.Img(t, append(args, ref, strconv.FormatInt(c.newSize, 10))...)
					_, oldOff := l1Place(t, path)

					img := resizeOpen(t, path)
					if err := img.Resize(c.newSize); err != nil {
						img.Close()
						t.Fatalf("Resize(%d): %v", c.newSize, err)
					}
					if img.Size() != c.newSize {
						t.Errorf("Size() = %d after Resize(%d)", img.Size(), c.newSize)
					}
					if err := img.Close(); err != nil {
						t.Fatal(err)
					}
					if _, off := l1Place(t, path); (off != oldOff) != c.moves {
						t.Errorf("L1 table at %#x, was at %#x: moved %v, want %v", off, oldOff, off != oldOff, c.moves)
					}
					resizeVerify(t, path, ref, c.newSize)

					// The resized image takes writes everywhere, in
					// particular in the new area.
					cmds := []string{fmt.Sprintf("write -P 0x5a %d 512", c.newSize-512)}
					if c.newSize >= 4096+512 {
						cmds = append(cmds, fmt.Sprintf("write -P 0x6b %d 4096", c.newSize/2&^511))
					}
					qemutest.IO(t, ref, "qcow2", cmds...)
					img = resizeOpen(t, path)
					if _, err := img.WriteAt(filled(0x5a, 512), c.newSize-512); err != nil {
						t.Fatalf("write at the new end: %v", err)
					}
					if len(cmds) > 1 {
						if _, err := img.WriteAt(filled(0x6b, 4096), c.newSize/2&^511); err != nil {
							t.Fatalf("write in the middle: %v", err)
						}
					}
					if err := img.Close(); err != nil {
						t.Fatal(err)
					}
					resizeVerify(t, path, ref, c.newSize)
				})
			}
		}
	}
}

// filled returns n bytes of b.
func filled(b byte, n int) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = b
	}
	return p
}

// TestResizeShrinkThenGrow shrinks past L1 entries that stay in the
// table and grows back over them in the same session and after a
// reopen, comparing with qemu-img doing the same.
func TestResizeShrinkThenGrow(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	for _, compat := range []string{"0.10", "1.1"} {
		t.Run(compat, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "a.qcow2")
			ref := filepath.Join(dir, "ref.qcow2")
			// 4 KiB clusters: one L2 table maps 2 MiB.
			qemutest.Create(t, path, "qcow2", "cluster_size=4096,compat="+compat, "16M")
			qemutest.IO(t, path, "qcow2", "write -P 1 0 8k", "write -P 2 3M 8k")
			resizeCopy(t, path, ref)
			const M = 1 << 20
			steps := []int64{4 * M, 6 * M, 5 * M, 64 * M}
			img := resizeOpen(t, path)
			for i, s := range steps {
				args := []string{"resize", "-q", "-f", "qcow2", "--shrink", ref, strconv.FormatInt(s, 10)}
				qemutest.Img(t, args...)
				if err := img.Resize(s); err != nil {
					t.Fatalf("step %d: Resize(%d): %v", i, s, err)
				}
				if i == 1 {
					// Reopen in the middle.
					if err := img.Close(); err != nil {
						t.Fatal(err)
					}
					resizeVerify(t, path, ref, s)
					img = resizeOpen(t, path)
				}
			}
			if _, err := img.WriteAt(filled(9, 8192), 40*M); err != nil {
				t.Fatal(err)
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			qemutest.IO(t, ref, "qcow2", fmt.Sprintf("write -P 9 %d 8k", 40*M))
			resizeVerify(t, path, ref, steps[len(steps)-1])
		})
	}
}

// TestResizeShrinkRefused: a shrink over allocated clusters fails with
// ErrShrinkAllocated, naming the first one, and leaves the image as it
// was.
func TestResizeShrinkRefused(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	cases := []struct {
		name    string
		opts    string
		writes  []string
		size    int64
		newSize int64
		first   int64 // guest offset named in the error
	}{
		{"data v3", "cluster_size=65536", []string{"write -P 1 0 64k", "write -P 2 3M 64k"}, 4 << 20, 2 << 20, 3 << 20},
		{"data v2", "cluster_size=4096,compat=0.10", []string{"write -P 2 1M 512"}, 4 << 20, 512 << 10, 1 << 20},
		{"zero cluster", "cluster_size=4096", []string{"write -z 2M 4k"}, 4 << 20, 1 << 20, 2 << 20},
		{"compressed", "cluster_size=4096", []string{"write -c -P 3 1M 4k"}, 4 << 20, 1 << 20, 1 << 20},
		{"next cluster of partial", "cluster_size=65536", []string{"write -P 2 1M 64k"}, 4 << 20, 1<<20 - 512, 1 << 20},
		{"extended L2", "cluster_size=65536,extended_l2=on", []string{"write -P 2 3M 4k"}, 4 << 20, 1 << 20, 3 << 20},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "a.qcow2")
			ref := filepath.Join(dir, "ref.qcow2")
			qemutest.Create(t, path, "qcow2", c.opts, strconv.FormatInt(c.size, 10))
			qemutest.IO(t, path, "qcow2", c.writes...)
			resizeCopy(t, path, ref)
			img := resizeOpen(t, path)
			err := img.Resize(c.newSize)
			if !errors.Is(err, ErrShrinkAllocated) {
				t.Errorf("Resize(%d) = %v, want ErrShrinkAllocated", c.newSize, err)
			} else if want := fmt.Sprintf("guest offset %#x", c.first); !strings.Contains(err.Error(), want) {
				t.Errorf("error %q does not name %s", err, want)
			}
			if img.Size() != c.size {
				t.Errorf("Size() = %d after a refused shrink, want %d", img.Size(), c.size)
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			resizeVerify(t, path, ref, c.size)
		})
	}
}

// TestResizeBacking grows overlays whose backing file is longer than
// they are: the new area must read as zeros (version 3), or the resize
// is refused (version 2, as QEMU refuses it).
func TestResizeBacking(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	cases := []struct {
		name          string
		compat        string
		cs            int
		size, newSize string
		refused       bool
	}{
		{"v3 aligned", "1.1", 65536, "1M", "3M", false},
		{"v3 unaligned old end", "1.1", 65536, "1000k", "3M", false},
		{"v3 past the backing end", "1.1", 4096, "1M", "6M", false},
		{"v3 L1 move", "1.1", 512, "1M", "3M", false},
		{"v2", "0.10", 65536, "1M", "3M", true},
		{"v3 extended L2", "1.1,extended_l2=on", 65536, "1000k", "3M", false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			base := filepath.Join(dir, "base.qcow2")
			path := filepath.Join(dir, "a.qcow2")
			ref := filepath.Join(dir, "ref.qcow2")
			qemutest.Create(t, base, "qcow2", "", "4M")
			qemutest.IO(t, base, "qcow2", "write -P 7 0 4M")
			opts := fmt.Sprintf("cluster_size=%d,compat=%s", c.cs, c.compat)
			qemutest.Create(t, path, "qcow2", opts, c.size, "-b", "base.qcow2", "-F", "qcow2")
			qemutest.IO(t, path, "qcow2", "write -P 1 0 4k")
			resizeCopy(t, path, ref)
			newSize, err := disk.ParseSize(c.newSize)
			if err != nil {
				t.Fatal(err)
			}
			img := resizeOpen(t, path)
			err = img.Resize(newSize)
			if cerr := img.Close(); cerr != nil {
				t.Fatal(cerr)
			}
			if c.refused {
				if !errors.Is(err, disk.ErrNotSupported) {
					t.Fatalf("Resize = %v, want disk.ErrNotSupported", err)
				}
				oldSize, _ := disk.ParseSize(c.size)
				resizeVerify(t, path, ref, oldSize)
				return
			}
			if err != nil {
				t.Fatalf("Resize(%d): %v", newSize, err)
			}
			if _, err := qemutest.TryIn(dir, "qemu-img", "resize", "-q", "-f", "qcow2", ref, c.newSize); err != nil {
				t.Fatal(err)
			}
			resizeVerify(t, path, ref, newSize)
			old, _ := disk.ParseSize(c.size)
			got := qemutest.RawBytes(t, path, "-f", "qcow2")
			for i, b := range got[old:] {
				if b != 0 {
					t.Fatalf("byte at %#x of the new area reads %#x, want 0", old+int64(i), b)
				}
			}
		})
	}
}

// TestResizeFeatures covers images whose features decide what Resize
// may do, against what QEMU 7.2 does with them.
func TestResizeFeatures(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	img := func(args ...string) []string { return append([]string{"qemu-img"}, args...) }
	io := func(cmd string) []string { return []string{"qemu-io", "-f", "qcow2", "-c", cmd} }
	cases := []struct {
		name    string
		opts    string     // %[1]s is the image's base name
		prep    [][]string // commands run on the image (its path appended)
		newSize int64
		wantErr error // nil: the resize works
	}{
		{"v3 snapshot grow", "cluster_size=65536", [][]string{io("write -P 1 0 64k"), img("snapshot", "-c", "s1")}, 8 << 20, nil},
		{"v3 snapshot shrink", "cluster_size=65536", [][]string{io("write -P 1 0 64k"), img("snapshot", "-c", "s1")}, 1 << 20, nil},
		{"v3 snapshot L1 move", "cluster_size=512", [][]string{io("write -P 1 0 64k"), img("snapshot", "-c", "s1"), io("write -P 2 32k 64k")}, 64 << 20, nil},
		{"v2 snapshot", "compat=0.10", [][]string{img("snapshot", "-c", "s1")}, 8 << 20, disk.ErrNotSupported},
		{"bitmap", "", [][]string{img("bitmap", "--add", "-f", "qcow2"), nil}, 8 << 20, disk.ErrNotSupported},
		{"data file grow", "data_file=%[1]s.data", [][]string{io("write -P 1 0 64k")}, 8 << 20, nil},
		{"data file shrink", "data_file=%[1]s.data", [][]string{io("write -P 1 0 64k")}, 1 << 20, nil},
		{"raw data file grow", "data_file=%[1]s.data,data_file_raw=on", nil, 8 << 20, disk.ErrNotSupported},
		{"extended L2 grow", "cluster_size=65536,extended_l2=on", [][]string{io("write -P 1 0 4k")}, 2 << 30, nil},
		{"extended L2 shrink", "cluster_size=65536,extended_l2=on", [][]string{io("write -P 1 0 4k")}, 1 << 20, nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			// Build the image and the reference the same way (each with
			// its own data file).
			var paths []string
			for _, base := range []string{"a", "ref"} {
				p := filepath.Join(dir, base+".qcow2")
				opts := c.opts
				if strings.Contains(opts, "%") {
					opts = fmt.Sprintf(opts, base)
				}
				qemutest.Create(t, p, "qcow2", opts, "4M")
				for _, cmd := range c.prep {
					if cmd == nil {
						continue
					}
					args := append(append([]string{}, cmd[1:]...), p)
					if cmd[0] == "qemu-img" && cmd[1] == "bitmap" {
						args = append(args, "b0")
					}
					if _, err := qemutest.TryIn(dir, cmd[0], args...); err != nil {
						t.Fatal(err)
					}
				}
				paths = append(paths, p)
			}
			path, ref := paths[0], paths[1]
			img := resizeOpen(t, path)
			err := img.Resize(c.newSize)
			if cerr := img.Close(); cerr != nil {
				t.Fatal(cerr)
			}
			if c.wantErr != nil {
				if !errors.Is(err, c.wantErr) {
					t.Fatalf("Resize = %v, want %v", err, c.wantErr)
				}
				resizeVerify(t, path, ref, 4<<20)
				return
			}
			if err != nil {
				t.Fatalf("Resize(%d): %v", c.newSize, err)
			}
			if _, err := qemutest.TryIn(dir, "qemu-img", "resize", "-q", "-f", "qcow2", "--shrink", ref, strconv.FormatInt(c.newSize, 10)); err != nil {
				t.Fatal(err)
			}
			resizeVerify(t, path, ref, c.newSize)
			if strings.Contains(c.opts, "data_file") {
				for _, base := range []string{"a", "ref"} {
					st, err := os.Stat(filepath.Join(dir, base+".data"))
					if err != nil {
						t.Fatal(err)
					}
					if st.Size() != c.newSize {
						t.Errorf("data file %s.data is %d bytes, want %d (as qemu-img leaves it)", base, st.Size(), c.newSize)
					}
				}
			}
			if strings.HasPrefix(c.name, "v3 snapshot") {
				// The snapshot still reads as qemu-img's does.
				a := qemutest.RawBytes(t, path, "-l", "snapshot.name=s1")
				b := qemutest.RawBytes(t, ref, "-l", "snapshot.name=s1")
				if d := qemutest.FirstDiff(a, b); d >= 0 {
					t.Errorf("snapshot s1 differs from qemu-img's at %#x", d)
				}
			}
		})
	}
}

// TestResizeErrors covers argument and state errors.
func TestResizeErrors(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	dir := t.TempDir()
	path := filepath.Join(dir, "a.qcow2")
	qemutest.Create(t, path, "qcow2", "cluster_size=65536", "1M")

	img := resizeOpen(t, path)
	for _, s := range []int64{-512, 1<<20 + 1, 1<<20 + 256} {
		if err := img.Resize(s); err == nil {
			t.Errorf("Resize(%d) succeeded", s)
		}
	}
	// 64 KiB clusters: at most 4 Mi L1 entries of 512 MiB each.
	if err := img.Resize(4<<50 + 512); !errors.Is(err, disk.ErrOutOfRange) {
		t.Errorf("Resize past the L1 limit = %v, want disk.ErrOutOfRange", err)
	}
	if err := img.Resize(1 << 20); err != nil {
		t.Errorf("Resize to the same size: %v", err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if err := img.Resize(2 << 20); !errors.Is(err, disk.ErrClosed) {
		t.Errorf("Resize after Close = %v, want disk.ErrClosed", err)
	}

	ro, err := disk.Open(path, disk.OpenOptions{Format: "qcow2", ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	if err := disk.Resize(ro, 2<<20); !errors.Is(err, disk.ErrReadOnly) {
		t.Errorf("Resize of a read-only image = %v, want disk.ErrReadOnly", err)
	}
	resizeVerify(t, path, path, 1<<20)
}

// TestResizeCrash crashes the host file at every sync Resize makes,
// keeping none, all, or every other one of the writes made since the
// last sync, and checks that each crashed image checks clean of
// corruption (leaks allowed) with the old or the new size and content.
func TestResizeCrash(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	for _, c := range []struct {
		name, opts, backing string
		size, newSize       int64
	}{
		{"L1 move", "cluster_size=512", "", 1 << 20, 10 << 20},
		{"L1 in place", "cluster_size=512", "", 1 << 20, 3 << 19},
		{"shrink", "cluster_size=4096", "", 8 << 20, 1 << 20},
		{"zeroing over backing", "cluster_size=4096", "base.qcow2", 1 << 20, 3 << 20},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "a.qcow2")
			extra := []string{}
			if c.backing != "" {
				base := filepath.Join(dir, c.backing)
				qemutest.Create(t, base, "qcow2", "", "4M")
				qemutest.IO(t, base, "qcow2", "write -P 7 0 4M")
				extra = []string{"-b", c.backing, "-F", "qcow2"}
			}
			qemutest.Create(t, path, "qcow2", c.opts, strconv.FormatInt(c.size, 10), extra...)
			qemutest.IO(t, path, "qcow2", "write -P 1 0 64k")
			content, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			mf := hostfiletest.NewMemFile(path, content)
			cf := &resizeCrashFile{MemFile: mf}
			img, err := Open(cf, disk.OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if err := img.Resize(c.newSize); err != nil {
				t.Fatal(err)
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			cf.states = append(cf.states, mf.DurableBytes())
			if len(cf.states) < 2 {
				t.Fatal("Resize never synced")
			}
			wantOld := qemutest.RawBytes(t, path, "-f", "qcow2")
			for i, st := range cf.states {
				p := filepath.Join(dir, fmt.Sprintf("crash%d.qcow2", i))
				if err := os.WriteFile(p, st, 0o644); err != nil {
					t.Fatal(err)
				}
				out, err := qemutest.Try("qemu-img", "check", "-f", "qcow2", p)
				if err != nil && !strings.Contains(out, "No errors were found") && !strings.Contains(out, "leaked clusters were found") {
					t.Fatalf("crash state %d: %v\n%s", i, err, out)
				}
				if i == len(cf.states)-1 && err != nil {
					t.Errorf("final state: %v\n%s", err, out)
				}
				got := qemutest.RawBytes(t, p, "-f", "qcow2")
				switch int64(len(got)) {
				case c.size:
					if d := qemutest.FirstDiff(got, wantOld); d >= 0 {
						t.Errorf("crash state %d (old size): content differs at %#x", i, d)
					}
				case c.newSize:
					n := min(c.size, c.newSize)
					if d := qemutest.FirstDiff(got[:n], wantOld[:n]); d >= 0 {
						t.Errorf("crash state %d (new size): content differs at %#x", i, d)
					}
					for j, b := range got[n:] {
						if b != 0 {
							t.Fatalf("crash state %d: new area reads %#x at %#x", i, b, n+int64(j))
						}
					}
				default:
					t.Fatalf("crash state %d: virtual size %d", i, len(got))
				}
			}
		})
	}
}

// resizeCrashFile records, at each Sync, the states a crash could leave
// (none, all, or every other write since the last sync kept) before
// syncing.
type resizeCrashFile struct {
	*hostfiletest.MemFile
	states [][]byte
}

func (f *resizeCrashFile) Sync() error {
	for _, keep := range []func(int) bool{
		func(int) bool { return false },
		func(int) bool { return true },
		func(i int) bool { return i%2 == 0 },
		func(i int) bool { return i%2 == 1 },
	} {
		f.states = append(f.states, f.MemFile.CrashKeeping(keep).DurableBytes())
	}
	return f.MemFile.Sync()
}

// TestResizeHostileL1 crafts an image whose L1 table shares its cluster
// with the refcount table: growing the L1 table in place would write over
// the refcounts, so Resize must refuse with a corruption error.
func TestResizeHostileL1(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	path := filepath.Join(t.TempDir(), "a.qcow2")
	qemutest.Create(t, path, "qcow2", "cluster_size=512", "1M")
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	// l1_size 32 (256 bytes): the table's cluster has room for 64.
	rt := binary.BigEndian.Uint64(b[offRefcountTableOffset:])
	binary.BigEndian.PutUint64(b[offL1TableOffset:], rt)
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	img := resizeOpen(t, path)
	defer img.Close()
	err = img.Resize(3 << 19)
	if !errors.Is(err, disk.ErrCorrupt) || !strings.Contains(err.Error(), "refcount table") {
		t.Fatalf("Resize = %v, want a corruption naming the refcount table", err)
	}
	after, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if string(after) != string(b) {
		t.Error("the refused Resize changed the file")
	}
}

// TestResizeRandom is a differential test: seeded random sequences of
// writes and resizes (grows, shrinks, refused shrinks) applied to an
// image and to a byte model, comparing every read, then checking the
// image with qemu-img and reading it back through qemu-img.
func TestResizeRandom(t *testing.T) {
	qemutest.Require(t, "qemu-img")
	for _, cs := range []int64{512, 4096, 65536} {
		for _, opts := range []string{"compat=0.10", "compat=1.1", "lazy_refcounts=on", "extended_l2=on"} {
			if strings.Contains(opts, "extended") && cs < 16384 {
				continue
			}
			seed := uint64(cs) ^ uint64(len(opts))
			t.Run(fmt.Sprintf("cs%d/%s/seed%d", cs, opts, seed), func(t *testing.T) {
				resizeRandom(t, cs, opts, seed, 30)
			})
		}
	}
}

func resizeRandom(t *testing.T, cs int64, opts string, seed uint64, steps int) {
	const maxSize = 4 << 20
	r := rand.New(rand.NewPCG(seed, 11))
	path := filepath.Join(t.TempDir(), "a.qcow2")
	size := int64(1 << 20)
	qemutest.Create(t, path, "qcow2", fmt.Sprintf("cluster_size=%d,%s", cs, opts), strconv.FormatInt(size, 10))
	model := make([]byte, maxSize+cs) // bytes past size keep what a regrow shows
	written := map[int64]bool{}       // guest clusters allocated
	img := resizeOpen(t, path)
	defer func() { img.Close() }()
	var grows, shrinks, refused, moves int
	for step := 0; step < steps; step++ {
		switch op := r.IntN(4); op {
		case 0, 1: // write
			n := 1 + r.Int64N(min(3*cs, size))
			off := r.Int64N(size - n + 1)
			p := make([]byte, n+8)
			for i := 0; i < len(p)-8; i += 8 {
				binary.LittleEndian.PutUint64(p[i:], r.Uint64())
			}
			p = p[:n]
			if _, err := img.WriteAt(p, off); err != nil {
				t.Fatalf("seed %d step %d: WriteAt(%d, %d): %v", seed, step, off, n, err)
			}
			copy(model[off:], p)
			for c := off / cs; c <= (off+n-1)/cs; c++ {
				written[c] = true
			}
		case 2: // grow
			ns := min(maxSize, size+512*(1+r.Int64N(4096)))
			l1 := img.header().L1TableOffset
			if err := img.Resize(ns); err != nil {
				t.Fatalf("seed %d step %d: grow to %d: %v", seed, step, ns, err)
			}
			size = ns
			grows++
			if img.header().L1TableOffset != l1 {
				moves++
			}
		case 3: // shrink
			ns := 512 * (1 + r.Int64N(size/512))
			first := (ns + cs - 1) / cs
			refuse := false
			for c := first; c*cs < size; c++ {
				refuse = refuse || written[c]
			}
			err := img.Resize(ns)
			switch {
			case refuse && !errors.Is(err, ErrShrinkAllocated):
				t.Fatalf("seed %d step %d: shrink %d to %d over allocated clusters: %v", seed, step, size, ns, err)
			case !refuse && err != nil:
				t.Fatalf("seed %d step %d: shrink %d to %d: %v", seed, step, size, ns, err)
			case !refuse:
				size = ns
				shrinks++
			default:
				refused++
			}
		}
		if img.Size() != size {
			t.Fatalf("seed %d step %d: Size() = %d, want %d", seed, step, img.Size(), size)
		}
		if r.IntN(8) == 0 { // reopen now and then
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			img = resizeOpen(t, path)
		}
		if step%4 != 3 && step != steps-1 {
			continue // read everything back every 4th step
		}
		got := make([]byte, size)
		if _, err := img.ReadAt(got, 0); err != nil {
			t.Fatalf("seed %d step %d: ReadAt: %v", seed, step, err)
		}
		if d := qemutest.FirstDiff(got, model[:size]); d >= 0 {
			t.Fatalf("seed %d step %d: read differs from the model at %#x", seed, step, d)
		}
	}
	t.Logf("%d grows (%d moving the L1 table), %d shrinks, %d refused", grows, moves, shrinks, refused)
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if out, err := qemutest.Try("qemu-img", "check", "-f", "qcow2", path); err != nil {
		t.Fatalf("seed %d: qemu-img check: %v\n%s", seed, err, out)
	}
	if d := qemutest.FirstDiff(qemutest.RawBytes(t, path, "-f", "qcow2"), model[:size]); d >= 0 {
		t.Fatalf("seed %d: qemu-img reads the image differently from the model at %#x", seed, d)
	}
	img = resizeOpen(t, path)
}

// TestResizeFaults fails the i-th write (or sync) of the host file and
// every one after it, for each i a resize makes: Resize returns the
// error, later writes are refused after a failed write, and the file
// left behind checks clean
// of corruption with the old or the new size.
func TestResizeFaults(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	for _, op := range []hostfiletest.Op{hostfiletest.OpWrite, hostfiletest.OpSync} {
		for _, c := range []struct {
			name, opts    string
			size, newSize int64
		}{
			{"L1 move", "cluster_size=512", 1 << 20, 10 << 20},
			{"L1 in place", "cluster_size=512", 1 << 20, 3 << 19},
			{"shrink", "cluster_size=4096", 8 << 20, 1 << 20},
		} {
			t.Run(fmt.Sprintf("%s/%s", op, c.name), func(t *testing.T) {
				dir := t.TempDir()
				orig := filepath.Join(dir, "orig.qcow2")
				qemutest.Create(t, orig, "qcow2", c.opts, strconv.FormatInt(c.size, 10))
				qemutest.IO(t, orig, "qcow2", "write -P 1 0 64k")
				for i := int64(0); ; i++ {
					path := filepath.Join(dir, fmt.Sprintf("a%d.qcow2", i))
					resizeCopy(t, orig, path)
					of, err := hostfile.Open(path, false)
					if err != nil {
						t.Fatal(err)
					}
					ff := hostfiletest.NewFaulty(of)
					img, err := Open(ff, disk.OpenOptions{})
					if err != nil {
						t.Fatal(err)
					}
					ff.FailAfter(op, i, nil)
					rerr := img.Resize(c.newSize)
					if rerr == nil {
						img.Close()
						resizeVerify(t, path, path, c.newSize)
						if i == 0 {
							t.Fatalf("Resize made no %s", op)
						}
						return
					}
					if !errors.Is(rerr, hostfiletest.ErrInjected) {
						t.Fatalf("fault at %s #%d: Resize = %v, want the injected error", op, i, rerr)
					}
					// A failed write leaves the file in doubt: the write side
					// stops. (A failed sync of a flush with nothing to write
					// does not stop it.)
					if _, err := img.WriteAt(make([]byte, 512), 0); err == nil && op == hostfiletest.OpWrite {
						t.Errorf("fault at %s #%d: a write after the failed Resize succeeded (Resize: %v)", op, i, rerr)
					}
					img.Close()
					out, err := qemutest.Try("qemu-img", "check", "-f", "qcow2", path)
					if err != nil && !strings.Contains(out, "leaked clusters were found") {
						t.Fatalf("fault at %s #%d: qemu-img check: %v\n%s", op, i, err, out)
					}
					var info struct {
						VirtualSize int64 `json:"virtual-size"`
					}
					if err := json.Unmarshal([]byte(qemutest.Img(t, "info", "--output=json", path)), &info); err != nil {
						t.Fatal(err)
					}
					if info.VirtualSize != c.size && info.VirtualSize != c.newSize {
						t.Fatalf("fault at %s #%d: virtual size %d", op, i, info.VirtualSize)
					}
				}
			})
		}
	}
}

// TestResizeL1MovesPastRefcountBlock grows an image so that the L1
// table moves to the end of the file, where its clusters need a new
// refcount block: the block goes right after them and must not be
// counted as one of the table's clusters too (it was, and leaked).
func TestResizeL1MovesPastRefcountBlock(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	p := filepath.Join(t.TempDir(), "r.qcow2")
	qemutest.Create(t, p, "qcow2", "cluster_size=512", "24M")
	qemutest.IO(t, p, "qcow2", "write -P 0x11 0 3M", "write -z 5M 1M", "write -P 0x22 9M 2M")
	img := openRW(t, p)
	if err := img.Resize(25 << 20); err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if r := qemuCheck(t, p); r.Leaks != 0 {
		t.Errorf("qemu-img check: %d leaked clusters", r.Leaks)
	}
}
