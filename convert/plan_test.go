package convert

import (
	"bytes"
	"context"
	"math/rand/v2"
	"testing"

	"github.com/imgloop/imgloop/disk"
)

// randomLayered returns an in-memory image of size bytes whose map mixes,
// in runs of 512-byte sectors: data of the top layer, zeros of the top
// layer, and ranges of a backing layer (depth 1) holding data or zeros.
// Data ranges hold non-zero bytes, except a few that hold zeros.
func randomLayered(seed uint64, size int64) *memImage {
	r := rand.New(rand.NewPCG(seed, 99))
	m := &memImage{data: make([]byte, size), failAt: -1}
	for off := int64(0); off < size; {
		n := min(size-off, 512*(1+r.Int64N(300)))
		e := disk.Extent{Offset: off, Length: n, HostOffset: -1}
		switch r.IntN(5) {
		case 0:
			e.Status = disk.StatusData | disk.StatusAllocated
		case 1:
			e.Status = disk.StatusZero | disk.StatusAllocated
		case 2:
			e.Status, e.Depth = disk.StatusData|disk.StatusAllocated, 1
		case 3:
			e.Status, e.Depth = disk.StatusZero, 1
		case 4:
			e.Status = disk.StatusData | disk.StatusAllocated // zero bytes
		}
		if e.Status&disk.StatusData != 0 && r.IntN(5) != 4 {
			for i := off; i < off+n; i++ {
				m.data[i] = byte(1 + r.IntN(255))
			}
		}
		m.extents = append(m.extents, e)
		off += n
	}
	return m
}

// wantClass is the class of cluster i by the definition: over every
// sector of the cluster, whether it may be skipped and whether it reads
// as zeros. With sub subclusters, it also returns those left unallocated
// in a cluster read.
func wantClass(m *memImage, cs, i int64, sub int, opts Options) (class, uint32) {
	skip, zero := true, true
	var mask uint32
	us := cs / int64(sub)
	for off := i * cs; off < min((i+1)*cs, m.Size()); off += 512 {
		e, err := m.Map(off, 512)
		if err != nil {
			panic(err)
		}
		z := e.Status&disk.StatusZero != 0
		s := z && opts.SparseSize >= 0
		if opts.Backed {
			s = e.Depth > 0 || (z && off >= opts.BackingSize)
		}
		if (off-i*cs)%us == 0 {
			mask |= 1 << ((off - i*cs) / us)
		}
		if !s {
			mask &^= 1 << ((off - i*cs) / us)
		}
		skip, zero = skip && s, zero && z
	}
	switch {
	case skip:
		return classSkip, 0
	case sub > 1 && mask != 0:
		return classRead, mask
	case zero && opts.Backed && opts.SparseSize >= 0:
		return classZero, 0
	}
	return classRead, 0
}

func TestPlanner(t *testing.T) {
	for _, tc := range []struct {
		name string
		cs   int64
		size int64
		sub  int
		opts Options
	}{
		{"64k", 64 << 10, 3<<20 + 1536, 1, Options{}},
		{"4k-no-sparse", 4096, 1<<20 + 512, 1, Options{SparseSize: -1}},
		{"64k-backed", 64 << 10, 3<<20 + 1536, 1, Options{Backed: true, BackingSize: 2<<20 + 512}},
		{"512-backed", 512, 1 << 20, 1, Options{Backed: true, BackingSize: 1 << 19}},
		{"2M-backed-short", 2 << 20, 5<<20 + 512, 1, Options{Backed: true}},
		{"4k-backed-no-sparse", 4096, 1 << 20, 1, Options{Backed: true, BackingSize: 1 << 30, SparseSize: -1}},
		{"64k-sub-backed", 64 << 10, 3<<20 + 1536, 32, Options{Backed: true, BackingSize: 2<<20 + 512}},
		{"16k-sub-backed", 16 << 10, 1<<20 + 1536, 32, Options{Backed: true, BackingSize: 1 << 30}},
		{"64k-sub", 64 << 10, 3<<20 + 1536, 32, Options{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for seed := range uint64(4) {
				m := randomLayered(seed, tc.size)
				const chunk = 3
				nclusters := (tc.size + tc.cs - 1) / tc.cs
				got := make([]class, 0, nclusters)
				masks := map[int64]uint32{}
				var pl *planner
				opts, err := tc.opts.withDefaults()
				if err != nil {
					t.Fatal(err)
				}
				pl = newPlanner(tc.cs, tc.size, chunk, tc.sub, opts, func(first, n int64, c class) error {
					if first != int64(len(got)) || n <= 0 {
						t.Fatalf("run [%d, +%d) after %d clusters", first, n, len(got))
					}
					for j, m := range pl.takeMasks(nil, first, first+n) {
						if m != 0 {
							masks[first+int64(j)] = m
						}
					}
					for range n {
						got = append(got, c)
					}
					return nil
				})
				if err := disk.Extents(m, 0, tc.size, pl.extent); err != nil {
					t.Fatal(err)
				}
				if err := pl.flush(); err != nil {
					t.Fatal(err)
				}
				if int64(len(got)) != nclusters {
					t.Fatalf("seed %d: %d clusters classified, want %d", seed, len(got), nclusters)
				}
				for i := range nclusters {
					want, wantMask := wantClass(m, tc.cs, i, tc.sub, tc.opts)
					if got[i] != want || masks[i] != wantMask {
						t.Fatalf("seed %d: cluster %d: class %d, mask %#x, want %d, %#x", seed, i, got[i], masks[i], want, wantMask)
					}
				}
			}
		})
	}
}

// TestClustersBacked checks Clusters with a backing file: every cluster
// the source's top layer leaves to its backing file is skipped, every
// other one reads as the source does, and the clusters that read as
// zeros are zero clusters (or, without zero clusters, zero data).
func TestClustersBacked(t *testing.T) {
	for _, tc := range []struct {
		name     string
		cs       int
		compress bool
		noZero   bool
		opts     Options
	}{
		{"64k", 64 << 10, false, false, Options{BackingSize: 2 << 20}},
		{"4k-compress", 4096, true, false, Options{BackingSize: 3 << 20, Workers: 3, ChunkSize: 64 << 10}},
		{"64k-v2", 64 << 10, false, true, Options{BackingSize: 1 << 30}},
		{"64k-v2-compress", 64 << 10, true, true, Options{BackingSize: 1 << 30}},
		{"no-sparse", 16 << 10, false, false, Options{BackingSize: 1 << 30, SparseSize: -1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src := randomLayered(7, 3<<20+512)
			// A cluster of one repeated byte, for memClusters'
			// "compression".
			for i := 1 << 20; i < 1<<20+tc.cs; i++ {
				src.data[i] = 7
			}
			src.extents = append([]disk.Extent{{Offset: 0, Length: 1<<20 + int64(tc.cs), Status: disk.StatusData | disk.StatusAllocated, HostOffset: -1}},
				clipExtents(src.extents, 1<<20+int64(tc.cs))...)
			tc.opts.Backed = true
			m := &memClusters{cs: tc.cs, clusters: map[int64][]byte{}, failAt: -1, noZero: tc.noZero}
			if _, err := Clusters(context.Background(), src, m, tc.compress, tc.opts); err != nil {
				t.Fatal(err)
			}
			cs := int64(tc.cs)
			for i := range (src.Size() + cs - 1) / cs {
				want := make([]byte, cs)
				copy(want, src.data[i*cs:min(src.Size(), (i+1)*cs)])
				c, _ := wantClass(src, cs, i, 1, tc.opts)
				got, stored := m.clusters[i]
				switch {
				case c == classSkip:
					if stored || m.zero[i] {
						t.Fatalf("cluster %d: stored, want it left to the backing file", i)
					}
				case m.zero[i]:
					if !bytes.Equal(want, make([]byte, cs)) {
						t.Fatalf("cluster %d: zero cluster, but the source holds data", i)
					}
				case !stored:
					t.Fatalf("cluster %d: neither stored nor zero (class %d)", i, c)
				case !bytes.Equal(got, want):
					t.Fatalf("cluster %d: stored data differs", i)
				case tc.opts.SparseSize >= 0 && !tc.noZero && bytes.Equal(got, make([]byte, cs)):
					t.Fatalf("cluster %d: zeros stored as data", i)
				}
			}
			if len(m.zero) == 0 && !tc.noZero && tc.opts.SparseSize >= 0 {
				t.Error("no zero cluster written")
			}
		})
	}
}

// clipExtents returns the extents from offset from on.
func clipExtents(es []disk.Extent, from int64) []disk.Extent {
	var out []disk.Extent
	for _, e := range es {
		if end := e.Offset + e.Length; end > from {
			if e.Offset < from {
				e.Length, e.Offset = end-from, from
			}
			out = append(out, e)
		}
	}
	return out
}
