package hostfiletest

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/imgloop/imgloop/disk/hostfile"
)

func TestMemFileReadWrite(t *testing.T) {
	m := NewMemFile("m", []byte("hello world"))
	cases := []struct {
		name    string
		off     int64
		n       int
		want    string
		wantErr error
	}{
		{"start", 0, 5, "hello", nil},
		{"middle", 6, 5, "world", nil},
		{"short at end", 6, 10, "world", io.EOF},
		{"at end", 11, 1, "", io.EOF},
		{"past end", 100, 1, "", io.EOF},
		{"empty at end", 11, 0, "", nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			buf := make([]byte, c.n)
			n, err := m.ReadAt(buf, c.off)
			if string(buf[:n]) != c.want || !errors.Is(err, c.wantErr) || (c.wantErr == nil && err != nil) {
				t.Fatalf("ReadAt(%d, %d) = %q, %v; want %q, %v", c.n, c.off, buf[:n], err, c.want, c.wantErr)
			}
		})
	}
	if _, err := m.ReadAt(make([]byte, 1), -1); err == nil {
		t.Error("ReadAt at a negative offset succeeded")
	}
	if _, err := m.WriteAt([]byte{1}, MemMaxSize); !errors.Is(err, ErrMemTooLarge) {
		t.Errorf("WriteAt past MemMaxSize = %v, want ErrMemTooLarge", err)
	}
	if err := m.Truncate(MemMaxSize + 1); !errors.Is(err, ErrMemTooLarge) {
		t.Errorf("Truncate past MemMaxSize = %v, want ErrMemTooLarge", err)
	}
	// A write past the end extends the file with a hole.
	if _, err := m.WriteAt([]byte("!"), 20000); err != nil {
		t.Fatal(err)
	}
	if size, _ := m.Size(); size != 20001 {
		t.Fatalf("Size = %d, want 20001", size)
	}
	want := make([]byte, 20001)
	copy(want, "hello world")
	want[20000] = '!'
	if !bytes.Equal(m.Bytes(), want) {
		t.Fatal("content after an extending write is wrong")
	}
	if h, _ := m.SeekHole(0); h != MemBlockSize {
		t.Errorf("SeekHole(0) = %d, want %d", h, MemBlockSize)
	}
	if d, _ := m.SeekData(100); d != 100 {
		t.Errorf("SeekData(100) = %d, want 100", d)
	}
	if d, _ := m.SeekData(MemBlockSize); d != 4*MemBlockSize {
		t.Errorf("SeekData(%d) = %d, want %d", MemBlockSize, d, 4*MemBlockSize)
	}
}

func TestMemFileSeek(t *testing.T) {
	m := NewMemFile("m", nil)
	m.Truncate(10*MemBlockSize + 100)
	m.WriteAt([]byte{1}, 2*MemBlockSize+5)
	m.WriteAt(make([]byte, 2*MemBlockSize), 5*MemBlockSize)
	m.WriteAt([]byte{1}, 10*MemBlockSize+50) // the partial last block
	type seek struct {
		off  int64
		data int64 // -1 for io.EOF
		hole int64 // -1 for io.EOF
	}
	for _, c := range []seek{
		{0, 2 * MemBlockSize, 0},
		{2 * MemBlockSize, 2 * MemBlockSize, 3 * MemBlockSize},
		{2*MemBlockSize + 100, 2*MemBlockSize + 100, 3 * MemBlockSize},
		{3 * MemBlockSize, 5 * MemBlockSize, 3 * MemBlockSize},
		{6*MemBlockSize + 1, 6*MemBlockSize + 1, 7 * MemBlockSize},
		{7 * MemBlockSize, 10 * MemBlockSize, 7 * MemBlockSize},
		{10*MemBlockSize + 99, 10*MemBlockSize + 99, 10*MemBlockSize + 100},
		{10*MemBlockSize + 100, -1, -1},
	} {
		d, err := m.SeekData(c.off)
		if c.data < 0 && !errors.Is(err, io.EOF) || c.data >= 0 && (err != nil || d != c.data) {
			t.Errorf("SeekData(%d) = %d, %v; want %d", c.off, d, err, c.data)
		}
		h, err := m.SeekHole(c.off)
		if c.hole < 0 && !errors.Is(err, io.EOF) || c.hole >= 0 && (err != nil || h != c.hole) {
			t.Errorf("SeekHole(%d) = %d, %v; want %d", c.off, h, err, c.hole)
		}
	}
	// Punching whole blocks frees them; partial blocks are zeroed only.
	m.PunchHole(5*MemBlockSize+1, 2*MemBlockSize-1)
	if d, _ := m.SeekData(5 * MemBlockSize); d != 5*MemBlockSize {
		t.Errorf("after a partial punch SeekData = %d, want the partial block to stay", d)
	}
	if h, _ := m.SeekHole(5 * MemBlockSize); h != 6*MemBlockSize {
		t.Errorf("after the punch SeekHole = %d, want %d", h, 6*MemBlockSize)
	}
	// ZeroRange allocates.
	m.ZeroRange(0, MemBlockSize)
	if d, _ := m.SeekData(0); d != 0 {
		t.Errorf("after ZeroRange SeekData(0) = %d, want 0", d)
	}
}

// TestMemFileMatchesOSFile applies the same random operations to a
// MemFile and to a real file and compares content and size.
func TestMemFileMatchesOSFile(t *testing.T) {
	for seed := uint64(1); seed <= 2; seed++ {
		r := rand.New(rand.NewPCG(seed, 3))
		src := rand.NewChaCha8([32]byte{byte(seed)})
		osf, err := hostfile.Create(filepath.Join(t.TempDir(), "f"))
		if err != nil {
			t.Fatal(err)
		}
		mem := NewMemFile("m", nil)
		files := []File{osf, mem}
		for i := 0; i < 300; i++ {
			off := r.Int64N(1 << 20)
			n := r.Int64N(64 << 10)
			var op string
			switch r.IntN(6) {
			case 0, 1:
				op = "write"
				data := make([]byte, n)
				src.Read(data)
				for _, f := range files {
					if _, err := f.WriteAt(data, off); err != nil {
						t.Fatal(err)
					}
				}
			case 2:
				op = "truncate"
				for _, f := range files {
					if err := f.Truncate(off); err != nil {
						t.Fatal(err)
					}
				}
			case 3:
				op = "punch"
				if err := osf.PunchHole(off, n); err != nil {
					t.Skipf("no hole punching here: %v", err)
				}
				mem.PunchHole(off, n)
			case 4:
				op = "zero range"
				if err := osf.ZeroRange(off, n); err != nil {
					t.Skipf("no zero range here: %v", err)
				}
				mem.ZeroRange(off, n)
			case 5:
				op = "sync"
				for _, f := range files {
					if err := f.Sync(); err != nil {
						t.Fatal(err)
					}
				}
			}
			s1, _ := osf.Size()
			s2, _ := mem.Size()
			if s1 != s2 {
				t.Fatalf("seed %d op %d (%s %d %d): size %d (os) vs %d (mem)", seed, i, op, off, n, s1, s2)
			}
			a, b := make([]byte, s1), make([]byte, s2)
			osf.ReadAt(a, 0)
			mem.ReadAt(b, 0)
			if !bytes.Equal(a, b) {
				t.Fatalf("seed %d op %d (%s %d %d): content differs", seed, i, op, off, n)
			}
		}
		osf.Close()
	}
}

func TestMemFileCrash(t *testing.T) {
	m := NewMemFile("m", []byte("AAAA"))
	m.WriteAt([]byte("BB"), 0)
	if err := m.Sync(); err != nil {
		t.Fatal(err)
	}
	m.WriteAt([]byte("C"), 1)  // op 0
	m.Truncate(3)              // op 1
	m.WriteAt([]byte("DD"), 4) // op 2
	m.PunchHole(0, 1)          // op 3
	if got := string(m.Bytes()); got != "\x00CA\x00DD" {
		t.Fatalf("current content %q", got)
	}
	if m.Pending() != 4 {
		t.Fatalf("Pending = %d, want 4", m.Pending())
	}
	cases := []struct {
		name string
		keep func(int) bool
		want string
	}{
		{"nothing", func(int) bool { return false }, "BBAA"},
		{"everything", func(int) bool { return true }, "\x00CA\x00DD"},
		{"first only", func(i int) bool { return i == 0 }, "BCAA"},
		{"truncate only", func(i int) bool { return i == 1 }, "BBA"},
		{"last write only", func(i int) bool { return i == 2 }, "BBAADD"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			crashed := m.CrashKeeping(c.keep)
			if got := string(crashed.Bytes()); got != c.want {
				t.Fatalf("content %q, want %q", got, c.want)
			}
			if crashed.Pending() != 0 || string(crashed.DurableBytes()) != c.want {
				t.Fatal("a crashed file must start fully durable")
			}
		})
	}
	if got := string(m.Crash().Bytes()); got != "BBAA" {
		t.Fatalf("Crash() content %q", got)
	}
	// Close does not sync, and Crash still works on a closed file.
	m.Close()
	if _, err := m.ReadAt(make([]byte, 1), 0); !errors.Is(err, os.ErrClosed) {
		t.Fatalf("ReadAt after Close = %v, want os.ErrClosed", err)
	}
	if err := m.Close(); !errors.Is(err, os.ErrClosed) {
		t.Fatalf("second Close = %v, want os.ErrClosed", err)
	}
	if got := string(m.Crash().Bytes()); got != "BBAA" {
		t.Fatalf("Crash() after Close: content %q", got)
	}
}

func TestMemFileConcurrent(t *testing.T) {
	m := NewMemFile("m", make([]byte, 1<<20))
	var wg sync.WaitGroup
	for w := 0; w < 8; w++ {
		wg.Go(func() {
			buf := make([]byte, 4096)
			for i := 0; i < 200; i++ {
				off := int64(w)*(128<<10) + int64(i%32)*4096
				for j := range buf {
					buf[j] = byte(w)
				}
				m.WriteAt(buf, off)
				m.ReadAt(buf, off)
				if buf[0] != byte(w) {
					t.Errorf("worker %d read %d", w, buf[0])
					return
				}
				switch i % 50 {
				case 0:
					m.Sync()
				case 1:
					m.Crash()
				case 2:
					m.SeekData(off)
					m.PunchHole(off, 4096)
				}
			}
		})
	}
	wg.Wait()
}

// TestSeekAgreesWithOSFile checks that MemFile and OSFile answer SEEK_DATA
// and SEEK_HOLE alike on the same layout (block-aligned, so that the file
// system's granularity does not matter), including at and past the end.
func TestSeekAgreesWithOSFile(t *testing.T) {
	osf, err := hostfile.Create(filepath.Join(t.TempDir(), "f"))
	if err != nil {
		t.Fatal(err)
	}
	defer osf.Close()
	mem := NewMemFile("m", nil)
	const bs = 64 << 10 // coarser than any file system block here
	for _, f := range []File{osf, mem} {
		f.Truncate(10 * bs)
		f.WriteAt(make([]byte, bs), 2*bs)
		f.WriteAt([]byte{1}, 9*bs)
		f.Sync()
	}
	for _, off := range []int64{0, bs, 2 * bs, 2*bs + 7, 3 * bs, 9 * bs, 10*bs - 1, 10 * bs, 11 * bs} {
		d1, e1 := osf.SeekData(off)
		d2, e2 := mem.SeekData(off)
		if d1 != d2 || errors.Is(e1, io.EOF) != errors.Is(e2, io.EOF) || (e1 == nil) != (e2 == nil) {
			t.Errorf("SeekData(%d): os %d, %v; mem %d, %v", off, d1, e1, d2, e2)
		}
		h1, e1 := osf.SeekHole(off)
		h2, e2 := mem.SeekHole(off)
		if h1 != h2 || errors.Is(e1, io.EOF) != errors.Is(e2, io.EOF) || (e1 == nil) != (e2 == nil) {
			t.Errorf("SeekHole(%d): os %d, %v; mem %d, %v", off, h1, e1, h2, e2)
		}
	}
}
