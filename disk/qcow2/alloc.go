package qcow2

import (
	"encoding/binary"
	"fmt"

	"github.com/imgloop/imgloop/disk"
)

// Host cluster allocation for writes (docs/interop/qcow2.txt, "Host
// cluster management"). Clusters are always taken from the end of the
// file; freed clusters are not reused yet. Refcount updates are ordered so
// that a crash leaves at worst leaked clusters, never a cluster in use
// with a refcount too small:
//
//  1. new refcount blocks are written (zeroed), the refcounts of the new
//     clusters set to 1, and the file synced;
//  2. the refcount table entries of new blocks are written and synced;
//
// and only then does the caller write data and tables that use the
// clusters.

// allocator hands out host clusters at the end of the image file and
// keeps their refcounts. It is used under writer.mu only.
type allocator struct {
	img  *Image
	refs *refcountTable
	cs   int64
	// end is the first byte past every cluster in use or allocated: the
	// next cluster handed out.
	end int64
	// metaEnd is the end of the metadata found at Open (header, L1 table,
	// refcount table and blocks): nothing is ever allocated below it.
	metaEnd int64
}

// newAllocator reads the refcount table of img, whose file is fileSize
// bytes long.
func newAllocator(img *Image, fileSize int64) (*allocator, error) {
	h := img.hdr
	refs, err := readRefcountTable(img.f, h, fileSize)
	if err != nil {
		return nil, err
	}
	cs := img.geo.clusterSize()
	a := &allocator{img: img, refs: refs, cs: cs}
	meta := max(cs, int64(h.L1TableOffset)+int64(h.L1Size)*8,
		int64(h.RefcountTableOffset)+int64(h.RefcountTableClusters)<<h.ClusterBits)
	for i := range refs.entries {
		off, p := refs.blockFor(uint64(i))
		switch p {
		case refblockOK:
			meta = max(meta, int64(off)+cs)
		case refblockNone:
		default:
			return nil, &disk.FormatError{Format: formatName, Offset: int64(refs.offset) + int64(i)*8, Corrupt: true,
				What: fmt.Sprintf("refcount table entry %d (%#x): %s", i, refs.entries[i], p)}
		}
	}
	a.metaEnd = alignUp(meta, cs)
	a.end = max(alignUp(fileSize, cs), a.metaEnd)
	refs.fileSize = a.end
	return a, nil
}

// alignUp rounds n up to a multiple of the power of two a.
func alignUp(n, a int64) int64 { return (n + a - 1) &^ (a - 1) }

// take reserves n clusters at the end of the file and returns the offset
// of the first. It refuses offsets that could overlap the image's
// metadata.
func (a *allocator) take(n int64) (int64, error) {
	off := a.end
	if off < a.metaEnd || off < a.cs {
		return 0, a.img.corrupt(off, fmt.Sprintf("allocation at %#x would overlap metadata ending at %#x", off, a.metaEnd))
	}
	if off+n*a.cs > int64(offsetMask)+1 {
		return 0, &disk.UnsupportedError{Format: formatName, Feature: "growing the image file past 2^56 bytes"}
	}
	a.end += n * a.cs
	return off, nil
}

// allocate reserves n contiguous clusters plus extra single clusters (for
// example a new L2 table), sets their refcounts to 1 (adding refcount
// blocks where needed) and makes that durable. It returns the offset of
// the n clusters and of each extra one.
func (a *allocator) allocate(n int64, extra int) (int64, []int64, error) {
	start, err := a.take(n)
	if err != nil {
		return 0, nil, err
	}
	queue := make([]uint64, 0, n+int64(extra))
	for i := int64(0); i < n; i++ {
		queue = append(queue, uint64(start/a.cs+i))
	}
	extras := make([]int64, extra)
	for i := range extras {
		if extras[i], err = a.take(1); err != nil {
			return 0, nil, err
		}
		queue = append(queue, uint64(extras[i]/a.cs))
	}
	if err := a.setRefcounts(queue, 1); err != nil {
		return 0, nil, err
	}
	return start, extras, nil
}

// setRefcounts sets the refcount of each host cluster index in queue to
// v, adding (and counting) refcount blocks for clusters that have none,
// then syncs; new blocks are linked into the refcount table after that
// sync, and synced again.
func (a *allocator) setRefcounts(queue []uint64, v uint64) error {
	t := a.refs
	bb := t.blockBits()
	var newBlocks []uint64 // refcount table indexes
	zero := make([]byte, a.cs)
	var grown *grownTable
	for i := 0; i < len(queue); i++ {
		bi := queue[i] >> bb
		if bi >= uint64(len(t.entries)) {
			if grown != nil {
				return a.img.corrupt(-1, "refcount table grew twice in one allocation")
			}
			g, err := a.growTable(bi)
			if err != nil {
				return err
			}
			grown = g
			for c := g.off / a.cs; c < (g.off+g.n)/a.cs; c++ {
				queue = append(queue, uint64(c))
			}
		}
		if t.entries[bi] != 0 {
			continue
		}
		off, err := a.take(1)
		if err != nil {
			return err
		}
		if _, err := a.img.f.WriteAt(zero, off); err != nil {
			return fmt.Errorf("qcow2: writing refcount block at %#x: %w", off, err)
		}
		t.entries[bi] = uint64(off)
		newBlocks = append(newBlocks, bi)
		queue = append(queue, uint64(off/a.cs))
	}
	t.fileSize = a.end
	for _, c := range queue {
		if err := t.writeRefcount(a.img.f, c, v); err != nil {
			return err
		}
	}
	if err := a.img.f.Sync(); err != nil {
		return fmt.Errorf("qcow2: sync: %w", err)
	}
	if grown != nil {
		return a.moveTable(grown)
	}
	if len(newBlocks) == 0 {
		return nil
	}
	var b [8]byte
	for _, bi := range newBlocks {
		binary.BigEndian.PutUint64(b[:], t.entries[bi])
		if _, err := a.img.f.WriteAt(b[:], int64(t.offset+bi*8)); err != nil {
			return fmt.Errorf("qcow2: writing refcount table entry %d: %w", bi, err)
		}
	}
	if err := a.img.f.Sync(); err != nil {
		return fmt.Errorf("qcow2: sync: %w", err)
	}
	return nil
}

// release drops one reference from each host cluster overlapping
// [off, off+n). The caller has made durable every table change that
// stopped using them.
func (a *allocator) release(off, n int64) error {
	t := a.refs
	for c := off / a.cs; c <= (off+n-1)/a.cs; c++ {
		rc, err := t.Refcount(uint64(c))
		if err != nil {
			return err
		}
		if rc == 0 {
			return a.img.corrupt(off, fmt.Sprintf("freeing host cluster %#x whose refcount is already 0", c*a.cs))
		}
		if err := t.writeRefcount(a.img.f, uint64(c), rc-1); err != nil {
			return err
		}
	}
	return nil
}

// grownTable is a refcount table being moved to a larger place.
type grownTable struct {
	off, n       int64 // the new table's offset and size in bytes
	oldOff, oldN int64 // the old table's
}

// growTable makes room in the in-memory refcount table for index bi (and
// more, doubling it), at new clusters at the end of the file. The caller
// sets the refcounts of those clusters, then calls moveTable.
func (a *allocator) growTable(bi uint64) (*grownTable, error) {
	t := a.refs
	oldN := int64(len(t.entries)) * 8
	n := max(2*oldN, alignUp(int64(bi+1)*8, a.cs))
	// Leave room for the refcount blocks of the table itself and of what
	// follows it.
	n = alignUp(n+a.cs, a.cs)
	if n > maxRefcountTableBytes {
		return nil, &disk.UnsupportedError{Format: formatName,
			Feature: fmt.Sprintf("a refcount table over %d MiB", maxRefcountTableBytes>>20)}
	}
	off, err := a.take(n / a.cs)
	if err != nil {
		return nil, err
	}
	entries := make([]uint64, n/8)
	copy(entries, t.entries)
	t.entries = entries
	return &grownTable{off: off, n: n, oldOff: int64(t.offset), oldN: oldN}, nil
}

// moveTable writes the grown refcount table (whose clusters, and every
// new refcount block, have their refcounts set and synced), syncs, points
// the header at it, syncs, and releases the old table.
func (a *allocator) moveTable(g *grownTable) error {
	t := a.refs
	buf := make([]byte, g.n)
	for i, e := range t.entries {
		binary.BigEndian.PutUint64(buf[i*8:], e)
	}
	f := a.img.f
	if _, err := f.WriteAt(buf, g.off); err != nil {
		return fmt.Errorf("qcow2: writing refcount table at %#x: %w", g.off, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("qcow2: sync: %w", err)
	}
	var hdr [12]byte
	binary.BigEndian.PutUint64(hdr[:], uint64(g.off))
	binary.BigEndian.PutUint32(hdr[8:], uint32(g.n/a.cs))
	if _, err := f.WriteAt(hdr[:], offRefcountTableOffset); err != nil {
		return fmt.Errorf("qcow2: writing the refcount table offset to the header: %w", err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("qcow2: sync: %w", err)
	}
	t.offset = uint64(g.off)
	return a.release(g.oldOff, g.oldN)
}
