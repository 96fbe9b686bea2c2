package convert

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"testing"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/internal/qemutest"
)

// memClusters is a ClusterWriter in memory. Its "compression" stores a
// cluster of one repeated byte as that byte.
type memClusters struct {
	cs       int
	busy     atomic.Bool
	next     int64
	clusters map[int64][]byte
	zero     map[int64]bool // clusters written by WriteZero
	noZero   bool           // WriteZero is not supported (qcow2 v2)
	comp     int
	failAt   int64 // WriteCluster of this index fails; -1 for never
}

func (m *memClusters) ClusterSize() int { return m.cs }

func (m *memClusters) enter(index int64) error {
	if m.busy.Swap(true) {
		return errors.New("concurrent write")
	}
	if index < m.next {
		return errors.New("out of order")
	}
	m.next = index + 1
	return nil
}

func (m *memClusters) WriteCluster(index int64, data []byte) error {
	if err := m.enter(index); err != nil {
		return err
	}
	defer m.busy.Store(false)
	if index == m.failAt {
		return errInjected
	}
	m.clusters[index] = bytes.Clone(data)
	return nil
}

func (m *memClusters) WriteCompressed(index int64, c []byte) error {
	if err := m.enter(index); err != nil {
		return err
	}
	defer m.busy.Store(false)
	if len(c) != 1 {
		return errors.New("bad compressed cluster")
	}
	m.clusters[index] = bytes.Repeat(c, m.cs)
	m.comp++
	return nil
}

func (m *memClusters) WriteZero(index int64) error {
	if m.noZero {
		return fmt.Errorf("no zero clusters: %w", disk.ErrNotSupported)
	}
	if err := m.enter(index); err != nil {
		return err
	}
	defer m.busy.Store(false)
	if m.zero == nil {
		m.zero = map[int64]bool{}
	}
	m.zero[index] = true
	return nil
}

func (m *memClusters) Compress(dst, data []byte) ([]byte, bool) {
	if bytes.Count(data, data[:1]) != len(data) {
		return dst, false
	}
	return append(dst, data[0]), true
}

// disk returns the disk of n bytes m holds.
func (m *memClusters) disk(n int64) []byte {
	b := make([]byte, (n+int64(m.cs)-1)/int64(m.cs)*int64(m.cs))
	for i, c := range m.clusters {
		copy(b[i*int64(m.cs):], c)
	}
	return b[:n]
}

func TestClusters(t *testing.T) {
	for _, tc := range []struct {
		name     string
		cs       int
		opts     Options
		compress bool
	}{
		{"64k", 64 << 10, Options{}, false},
		{"64k-compress", 64 << 10, Options{}, true},
		{"4k-one-worker", 4096, Options{Workers: 1}, true},
		{"small-chunks", 64 << 10, Options{Workers: 3, ChunkSize: 4096}, false},
		{"2M", 2 << 20, Options{Workers: 5}, true},
		{"no-sparse", 64 << 10, Options{SparseSize: -1}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src := newImage()
			src.data = append(src.data, 1, 2, 3) // not a whole cluster
			src.extents = append(src.extents, disk.Extent{Offset: 4 << 20, Length: 3, Status: disk.StatusData})
			clear(src.data[3<<20 : 4<<20]) // reported zero: reads as zeros
			// One cluster of a repeated byte, for the "compression".
			for i := 2<<20 + 64*kib; i < 2<<20+128*kib; i++ {
				src.data[i] = 7
			}
			m := &memClusters{cs: tc.cs, clusters: map[int64][]byte{}, failAt: -1}
			var progress atomic.Int64
			tc.opts.Progress = func(n int64) { progress.Add(n) }
			if _, err := Clusters(context.Background(), src, m, tc.compress, tc.opts); err != nil {
				t.Fatal(err)
			}
			if got := m.disk(src.Size()); !bytes.Equal(got, src.data) {
				t.Fatalf("disk differs at %#x", qemutest.FirstDiff(got, src.data))
			}
			if progress.Load() != src.Size() {
				t.Errorf("progress adds up to %d, want %d", progress.Load(), src.Size())
			}
			for i, c := range m.clusters {
				if tc.opts.SparseSize >= 0 && isZero(c) {
					t.Errorf("zero cluster %d written", i)
				}
			}
			if tc.compress && tc.cs <= 64<<10 && m.comp == 0 {
				t.Error("no cluster compressed")
			}
			if tc.opts.SparseSize < 0 && m.clusters[1<<20/int64(tc.cs)+1] == nil {
				t.Error("with zero detection off, zero clusters of data extents are not written")
			}
			if tc.opts.SparseSize < 0 && m.clusters[3<<20/int64(tc.cs)] == nil {
				t.Error("with zero detection off, zero extents are not written (qemu-img -S 0 allocates them)")
			}
		})
	}
}

func TestClustersErrors(t *testing.T) {
	src := newImage()
	src.failAt = 2 << 20
	m := &memClusters{cs: 64 << 10, clusters: map[int64][]byte{}, failAt: -1}
	if _, err := Clusters(context.Background(), src, m, false, Options{}); !errors.Is(err, errInjected) {
		t.Errorf("read failure: %v", err)
	}
	src = newImage()
	m = &memClusters{cs: 64 << 10, clusters: map[int64][]byte{}, failAt: 20}
	if _, err := Clusters(context.Background(), src, m, false, Options{}); !errors.Is(err, errInjected) {
		t.Errorf("write failure: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := Clusters(ctx, src, m, false, Options{}); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled: %v", err)
	}
	if _, err := Clusters(context.Background(), src, &memClusters{cs: 1000}, false, Options{}); err == nil {
		t.Error("cluster size 1000: no error")
	}
}

// readAll returns the disk of the image at path as imgloop reads it.
func readAll(t *testing.T, path string) []byte {
	t.Helper()
	img, err := disk.Open(path, disk.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	b := make([]byte, img.Size())
	if _, err := img.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	return b
}
