package convert

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sort"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/imgloop/imgloop/disk"
)

// memImage is a read-only in-memory disk.Image with a given allocation map.
type memImage struct {
	data    []byte
	extents []disk.Extent // sorted, covering the disk
	failAt  int64         // ReadAt covering this offset fails; -1 for never
	reads   atomic.Int64  // bytes read
}

var errInjected = errors.New("injected failure")

func (m *memImage) ReadAt(p []byte, off int64) (int, error) {
	if err := disk.CheckRange(off, int64(len(p)), m.Size()); err != nil {
		return 0, err
	}
	if m.failAt >= off && m.failAt < off+int64(len(p)) {
		return 0, errInjected
	}
	m.reads.Add(int64(len(p)))
	return copy(p, m.data[off:]), nil
}
func (m *memImage) WriteAt(p []byte, off int64) (int, error) { return 0, disk.ErrReadOnly }
func (m *memImage) Size() int64                              { return int64(len(m.data)) }
func (m *memImage) SectorSize() int                          { return 512 }
func (m *memImage) Flush() error                             { return nil }
func (m *memImage) Close() error                             { return nil }

func (m *memImage) Map(off, n int64) (disk.Extent, error) {
	if err := disk.CheckRange(off, n, m.Size()); err != nil {
		return disk.Extent{}, err
	}
	for _, e := range m.extents {
		if off >= e.Offset && off < e.Offset+e.Length {
			e.Length = min(e.Offset+e.Length, off+n) - off
			e.Offset = off
			return e, nil
		}
	}
	return disk.Extent{}, fmt.Errorf("no extent at %d", off)
}

// memDst is an io.WriterAt that records which ranges were written.
type memDst struct {
	mu     sync.Mutex
	data   []byte
	ranges [][2]int64
	failAt int64
}

func (d *memDst) WriteAt(p []byte, off int64) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.failAt >= off && d.failAt < off+int64(len(p)) {
		return 0, errInjected
	}
	copy(d.data[off:], p)
	d.ranges = append(d.ranges, [2]int64{off, int64(len(p))})
	return len(p), nil
}

// sortedRanges returns the written ranges, sorted and merged.
func (d *memDst) sortedRanges() [][2]int64 {
	r := append([][2]int64(nil), d.ranges...)
	sort.Slice(r, func(i, j int) bool { return r[i][0] < r[j][0] })
	var out [][2]int64
	for _, x := range r {
		if len(out) > 0 && out[len(out)-1][0]+out[len(out)-1][1] == x[0] {
			out[len(out)-1][1] += x[1]
			continue
		}
		out = append(out, x)
	}
	return out
}

const kib = 1024

// newImage builds a 4 MiB image: data at [0,64k) and [1M+512, 3M),
// with the page [2M, 2M+4k) zero inside the data extent, and an extent
// reported as zero at [3M, 3M+64k) although it holds garbage (the map
// wins: it reads as zeros through the driver).
func newImage() *memImage {
	size := int64(4 << 20)
	m := &memImage{data: make([]byte, size), failAt: -1}
	r := rand.New(rand.NewPCG(1, 2))
	fill := func(off, n int64) {
		for i := off; i < off+n; i++ {
			m.data[i] = byte(r.IntN(255) + 1)
		}
	}
	fill(0, 64*kib)
	fill(1<<20+512, 2<<20-512)
	clear(m.data[2<<20 : 2<<20+4*kib])
	const (
		data = disk.StatusData | disk.StatusAllocated
		zero = disk.StatusZero
	)
	m.extents = []disk.Extent{
		{Offset: 0, Length: 64 * kib, Status: data},
		{Offset: 64 * kib, Length: 1<<20 + 512 - 64*kib, Status: zero},
		{Offset: 1<<20 + 512, Length: 2<<20 - 512, Status: data},
		{Offset: 3 << 20, Length: 1 << 20, Status: zero},
	}
	return m
}

func TestRaw(t *testing.T) {
	tests := []struct {
		name string
		opts Options
		want [][2]int64 // written ranges, merged
	}{
		{"defaults", Options{}, [][2]int64{{0, 64 * kib}, {1<<20 + 512, 1<<20 - 512}, {2<<20 + 4*kib, 1<<20 - 4*kib}}},
		{"one worker small chunks", Options{Workers: 1, ChunkSize: 8 * kib}, [][2]int64{{0, 64 * kib}, {1<<20 + 512, 1<<20 - 512}, {2<<20 + 4*kib, 1<<20 - 4*kib}}},
		{"many workers", Options{Workers: 16, ChunkSize: 64 * kib}, [][2]int64{{0, 64 * kib}, {1<<20 + 512, 1<<20 - 512}, {2<<20 + 4*kib, 1<<20 - 4*kib}}},
		{"sparse 64k", Options{SparseSize: 64 * kib}, [][2]int64{{0, 64 * kib}, {1<<20 + 512, 2<<20 - 512}}},
		{"no zero detection", Options{SparseSize: -1}, [][2]int64{{0, 64 * kib}, {1<<20 + 512, 2<<20 - 512}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			src := newImage()
			dst := &memDst{data: make([]byte, src.Size()), failAt: -1}
			var progress atomic.Int64
			tt.opts.Progress = func(n int64) { progress.Add(n) }
			st, err := Raw(context.Background(), src, dst, tt.opts)
			if err != nil {
				t.Fatal(err)
			}
			want := bytes.Clone(src.data)
			clear(want[3<<20:]) // mapped as zero
			if !bytes.Equal(dst.data, want) {
				t.Errorf("output differs from the source")
			}
			if got := dst.sortedRanges(); fmt.Sprint(got) != fmt.Sprint(tt.want) {
				t.Errorf("written ranges %v, want %v", got, tt.want)
			}
			if progress.Load() != src.Size() {
				t.Errorf("progress sums to %d, want %d", progress.Load(), src.Size())
			}
			if want := 64*kib + 2<<20 - 512; st.Read != int64(want) || src.reads.Load() != int64(want) {
				t.Errorf("read %d (stats %d), want %d", src.reads.Load(), st.Read, want)
			}
		})
	}
}

func TestRawErrors(t *testing.T) {
	tests := []struct {
		name    string
		srcFail int64
		dstFail int64
		opts    Options
		wantIs  error
	}{
		{"read error", 2<<20 + 100, -1, Options{}, errInjected},
		{"write error", -1, 40 * kib, Options{}, errInjected},
		{"bad workers", -1, -1, Options{Workers: -1}, nil},
		{"bad sparse", -1, -1, Options{SparseSize: 1000}, nil},
		{"bad chunk", -1, -1, Options{ChunkSize: 5000}, nil},
		{"huge chunk", -1, -1, Options{ChunkSize: 1 << 30}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			src := newImage()
			src.failAt = tt.srcFail
			dst := &memDst{data: make([]byte, src.Size()), failAt: tt.dstFail}
			_, err := Raw(context.Background(), src, dst, tt.opts)
			if err == nil {
				t.Fatal("no error")
			}
			if tt.wantIs != nil && !errors.Is(err, tt.wantIs) {
				t.Errorf("error %v, want %v", err, tt.wantIs)
			}
		})
	}
}

func TestRawCancelled(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	src := newImage()
	dst := &memDst{data: make([]byte, src.Size()), failAt: -1}
	if _, err := Raw(ctx, src, dst, Options{ChunkSize: 4 * kib}); !errors.Is(err, context.Canceled) {
		t.Fatalf("error %v, want context.Canceled", err)
	}
}

// TestRawMapError checks that a driver mapping error stops the copy.
func TestRawMapError(t *testing.T) {
	src := newImage()
	src.extents = src.extents[:2] // nothing maps past 1M+512
	dst := &memDst{data: make([]byte, src.Size()), failAt: -1}
	if _, err := Raw(context.Background(), src, dst, Options{}); err == nil {
		t.Fatal("no error for a broken map")
	}
}

func TestWriteSparse(t *testing.T) {
	tests := []struct {
		name   string
		buf    string // 'x' non-zero 512-byte sector, '.' zero sector
		off    int64
		sparse int
		want   [][2]int64
	}{
		{"all zero", "........", 0, 4096, nil},
		{"all data", "xxxxxxxx", 0, 4096, [][2]int64{{0, 4096}}},
		{"one sector in block", ".x......", 0, 4096, [][2]int64{{0, 4096}}},
		{"unaligned start", "x.......x", 512, 4096, [][2]int64{{512, 4608}}},
		{"unaligned with hole", "x..............x", 512, 4096, [][2]int64{{512, 3584}, {8192, 512}}},
		{"sector granularity", "x.x.", 0, 512, [][2]int64{{0, 512}, {1024, 512}}},
		{"disabled", "....", 0, -1, [][2]int64{{0, 2048}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			buf := make([]byte, 512*len(tt.buf))
			for i, c := range tt.buf {
				if c == 'x' {
					buf[512*i+7] = 1
				}
			}
			dst := &memDst{data: make([]byte, int(tt.off)+len(buf)), failAt: -1}
			if _, err := writeSparse(dst, buf, tt.off, tt.sparse); err != nil {
				t.Fatal(err)
			}
			if got := dst.sortedRanges(); fmt.Sprint(got) != fmt.Sprint(tt.want) {
				t.Errorf("written %v, want %v", got, tt.want)
			}
			if !bytes.Equal(dst.data[tt.off:], buf) {
				t.Error("data differs")
			}
		})
	}
}

func BenchmarkIsZero(b *testing.B) {
	buf := make([]byte, 1<<20)
	b.SetBytes(int64(len(buf)))
	for b.Loop() {
		if !isZero(buf) {
			b.Fatal("not zero")
		}
	}
}

func TestOptionsValidate(t *testing.T) {
	tests := []struct {
		opts Options
		ok   bool
	}{
		{Options{}, true},
		{Options{Workers: 8, ChunkSize: 2 << 20, SparseSize: 512}, true},
		{Options{SparseSize: -1, ChunkSize: 512}, true},
		{Options{Workers: MaxWorkers + 1}, false},
		{Options{ChunkSize: MaxChunkSize * 2}, false},
		{Options{SparseSize: 3000}, false},
		{Options{SparseSize: 256}, false},
		{Options{ChunkSize: 4096 + 512}, false},
	}
	for _, tt := range tests {
		if err := tt.opts.Validate(); (err == nil) != tt.ok {
			t.Errorf("%+v: Validate() = %v, want ok %v", tt.opts, err, tt.ok)
		}
	}
}
