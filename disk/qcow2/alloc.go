package qcow2

import (
	"encoding/binary"
	"fmt"

	"github.com/imgloop/imgloop/disk"
)

// Host cluster allocation (docs/interop/qcow2.txt, "Host cluster
// management"). The allocator keeps the refcount blocks it has touched in
// memory and writes them back when the writer flushes its metadata (see
// meta.go for the order). Free clusters (refcount 0) are reused, lowest
// first, before the file grows.

// maxCleanRefblocks bounds how many unchanged refcount blocks stay loaded
// after a metadata flush.
const maxCleanRefblocks = 64

// maxRefblockBytes bounds the refcount blocks held in memory (changed or
// not) between metadata flushes, with lazy refcounts too: past it they
// are written back (see writer.limitDirty). With the L2 slice cache's
// 32 MiB and its pinned slices, it keeps a writer's metadata in memory
// near QEMU's default metadata cache whatever the workload.
const maxRefblockBytes = 4 << 20

// allocator hands out host clusters and keeps their refcounts. It is used
// under writer.mu; what isMeta reads (meta, t.offset, the length of
// t.entries, moved) is changed under writer.metaMu too, as writes in
// place call isMeta without writer.mu.
type allocator struct {
	img *Image
	t   *refcountTable // the table entries in memory are authoritative
	cs  int64
	cb  uint
	// end is the first byte past every cluster in use: clusters at or
	// past it are free, and the file grows from there.
	end int64
	// freeHint is the lowest cluster index that may be free.
	freeHint uint64
	// blocks holds the refcount blocks read or created, by table index.
	blocks map[uint64]*refBlock
	// newEntries lists table indexes whose entry changed in memory (new
	// blocks): written only after the blocks themselves are durable.
	newEntries map[uint64]bool
	// moved is set when the refcount table was moved in memory to larger
	// clusters: it reaches the file (and the header) at the next flush.
	moved *movedTable
	// meta is the set of host clusters holding metadata besides the
	// header, L1 table and refcount table (which are checked by range):
	// refcount blocks, L2 tables, the snapshot table and snapshot L1
	// tables. Data must never be written there.
	meta clusterSet
}

// refBlock is a refcount block in memory.
type refBlock struct {
	off   uint64
	data  []byte
	dirty bool
}

// movedTable is a refcount table placed at new clusters in memory.
type movedTable struct {
	off, n       int64 // the new table
	oldOff, oldN int64 // the table on disk it replaces
}

// newAllocator reads the refcount table of img, whose file is fileSize
// bytes long, and notes where its metadata lies.
func newAllocator(img *Image, fileSize int64) (*allocator, error) {
	h := img.header()
	refs, err := readRefcountTable(img.f, h, fileSize)
	if err != nil {
		return nil, err
	}
	cs := img.geo.clusterSize()
	a := &allocator{img: img, t: refs, cs: cs, cb: img.geo.clusterBits,
		blocks: map[uint64]*refBlock{}, newEntries: map[uint64]bool{}}
	end := max(alignUp(fileSize, cs), cs)
	mark := func(off, n int64) {
		if n <= 0 {
			return
		}
		for c := off >> a.cb; c < (off+n+cs-1)>>a.cb; c++ {
			a.meta.add(uint64(c))
		}
		end = max(end, alignUp(off+n, cs))
	}
	for i := range refs.entries {
		off, p := refs.blockFor(uint64(i))
		switch p {
		case refblockOK:
			mark(int64(off), cs)
		case refblockNone:
		default:
			return nil, &disk.FormatError{Format: formatName, Offset: int64(refs.offset) + int64(i)*8, Corrupt: true,
				What: fmt.Sprintf("refcount table entry %d (%#x): %s", i, refs.entries[i], p)}
		}
	}
	end = max(end, alignUp(int64(h.L1TableOffset)+int64(h.L1Size)*8, cs),
		alignUp(int64(h.RefcountTableOffset)+int64(h.RefcountTableClusters)<<h.ClusterBits, cs))
	for _, l2 := range img.l1 {
		if l2 != 0 {
			mark(int64(l2), cs)
		}
	}
	if len(img.snaps) > 0 {
		last := img.snaps[len(img.snaps)-1]
		n := last.Offset + 40 + int64(last.ExtraDataSize) + int64(len(last.ID)) + int64(len(last.Name))
		mark(int64(h.SnapshotsOffset), n-int64(h.SnapshotsOffset))
		for _, s := range img.snaps {
			mark(int64(s.L1TableOffset), int64(s.L1Size)*8)
		}
	}
	a.end = end
	refs.fileSize = 1 << 62 // blocks past the file's end are allocated by us
	return a, nil
}

// lockMeta and unlockMeta bracket a change of what isMeta reads (see
// allocator). The allocator of an image opened by Check has no writer.
func (a *allocator) lockMeta() {
	if a.img.w != nil {
		a.img.w.metaMu.Lock()
	}
}

func (a *allocator) unlockMeta() {
	if a.img.w != nil {
		a.img.w.metaMu.Unlock()
	}
}

// alignUp rounds n up to a multiple of the power of two a.
func alignUp(n, a int64) int64 { return (n + a - 1) &^ (a - 1) }

// isMeta reports whether [off, off+n) meets the image's metadata.
func (a *allocator) isMeta(off, n int64) bool {
	h := a.img.header()
	if off < a.cs {
		return true
	}
	if overlaps(off, n, int64(h.L1TableOffset), int64(h.L1Size)*8) ||
		overlaps(off, n, int64(a.t.offset), int64(len(a.t.entries))*8) {
		return true
	}
	if a.moved != nil && overlaps(off, n, a.moved.oldOff, a.moved.oldN) {
		return true
	}
	for c := off >> a.cb; c < (off+n+a.cs-1)>>a.cb; c++ {
		if a.meta.has(uint64(c)) {
			return true
		}
	}
	return false
}

// overlaps reports whether [a, a+an) meets [b, b+bn).
func overlaps(a, an, b, bn int64) bool { return an > 0 && bn > 0 && a < b+bn && b < a+an }

// block returns refcount block i, reading it, or creating it (and
// allocating its cluster) when create is set and it does not exist. It
// returns nil without error when the block does not exist and create is
// not set.
func (a *allocator) block(i uint64, create bool) (*refBlock, error) {
	if b, ok := a.blocks[i]; ok {
		return b, nil
	}
	t := a.t
	off, p := t.blockFor(i)
	switch p {
	case refblockOK:
		b := &refBlock{off: off, data: make([]byte, a.cs)}
		if err := readAtZero(a.img.f, b.data, int64(off), a.end); err != nil {
			return nil, fmt.Errorf("qcow2: reading refcount block at %#x: %w", off, err)
		}
		a.blocks[i] = b
		return b, nil
	case refblockNone:
		if !create {
			return nil, nil
		}
	default:
		return nil, a.img.corrupt(int64(t.offset+i*8), fmt.Sprintf("refcount table entry %d (%#x): %s", i, t.entries[i], p))
	}
	if i >= uint64(len(t.entries)) {
		if err := a.growTable(i); err != nil {
			return nil, err
		}
		// Growing the table may have created this very block.
		if b, ok := a.blocks[i]; ok {
			return b, nil
		}
	}
	// The new block goes at the end of the file; its own refcount is set
	// once it is registered, so that a block covering itself is found.
	at, err := a.endRun(1)
	if err != nil {
		return nil, err
	}
	c := uint64(at >> a.cb)
	a.end = at + a.cs
	b := &refBlock{off: c << a.cb, data: make([]byte, a.cs), dirty: true}
	a.blocks[i] = b
	t.entries[i] = b.off
	a.newEntries[i] = true
	a.lockMeta()
	a.meta.add(c)
	a.unlockMeta()
	if err := a.adjust(c, 1); err != nil {
		return nil, err
	}
	return b, nil
}

// refcount returns the refcount of host cluster c.
func (a *allocator) refcount(c uint64) (uint64, error) {
	bb := a.t.blockBits()
	b, err := a.block(c>>bb, false)
	if err != nil || b == nil {
		return 0, err
	}
	return refcountEntry(b.data, a.t.order, c&(1<<bb-1)), nil
}

// adjust adds delta (+1 or -1) to the refcount of host cluster c.
func (a *allocator) adjust(c uint64, delta int) error {
	bb := a.t.blockBits()
	b, err := a.block(c>>bb, delta > 0)
	if err != nil {
		return err
	}
	var v uint64
	if b != nil {
		v = refcountEntry(b.data, a.t.order, c&(1<<bb-1))
	}
	switch {
	case delta < 0 && v == 0:
		return a.img.corrupt(int64(c<<a.cb), fmt.Sprintf("freeing host cluster %#x whose refcount is already 0", c<<a.cb))
	case delta > 0 && v >= a.t.maxRefcount():
		return &disk.UnsupportedError{Format: formatName,
			Feature: fmt.Sprintf("a refcount above %d (refcount_bits=%d)", a.t.maxRefcount(), 1<<a.t.order)}
	}
	if delta > 0 {
		v++
	} else {
		v--
		if v == 0 && c < a.freeHint {
			a.freeHint = c
		}
	}
	putRefcountEntry(b.data, a.t.order, c&(1<<bb-1), v)
	b.dirty = true
	return nil
}

// free returns the index of a free host cluster: the lowest one from
// freeHint on whose refcount is 0 and that holds no metadata. Past the
// end of the file only clusters without a refcount block are taken on
// trust: a crash may leave a refcount for a cluster whose data never
// reached the file. It does not take the cluster.
func (a *allocator) free() (uint64, error) {
	bb := a.t.blockBits()
	for c := a.freeHint; ; {
		b, err := a.block(c>>bb, false)
		if err != nil {
			return 0, err
		}
		blockEnd := (c>>bb + 1) << bb
		for ; c < blockEnd; c++ {
			if (b == nil || refcountEntry(b.data, a.t.order, c&(1<<bb-1)) == 0) && !a.isMeta(int64(c<<a.cb), a.cs) {
				a.freeHint = c
				return c, nil
			}
		}
		if int64(c)<<a.cb > int64(offsetMask) {
			return 0, &disk.UnsupportedError{Format: formatName, Feature: "growing the image file past 2^56 bytes"}
		}
	}
}

// take allocates one host cluster (refcount 1) and returns its offset.
// The refcount reaches the file at the next metadata flush.
func (a *allocator) take() (int64, error) {
	off, _, err := a.takeFresh()
	return off, err
}

// takeFresh is take, and also reports whether the cluster lies past
// every cluster ever used, so that it reads as zeros (a hole, or past
// the end of the file) until written.
func (a *allocator) takeFresh() (int64, bool, error) {
	c, err := a.free()
	if err != nil {
		return 0, false, err
	}
	fresh := int64(c)<<a.cb >= a.end
	off, err := a.takeAt(c)
	return off, fresh, err
}

// takeAt takes the free cluster c.
func (a *allocator) takeAt(c uint64) (int64, error) {
	if int64(c+1)<<a.cb > int64(offsetMask)+1 {
		return 0, &disk.UnsupportedError{Format: formatName, Feature: "growing the image file past 2^56 bytes"}
	}
	if int64(c)<<a.cb >= a.end {
		a.end = int64(c+1) << a.cb
	}
	if err := a.adjust(c, 1); err != nil {
		return 0, err
	}
	return int64(c) << a.cb, nil
}

// takeRun allocates n host clusters, contiguous when free space allows,
// and returns their offsets and which ones are fresh (see takeFresh).
func (a *allocator) takeRun(n int) ([]int64, []bool, error) {
	offs := make([]int64, n)
	fresh := make([]bool, n)
	for i := range offs {
		off, f, err := a.takeFresh()
		if err != nil {
			return nil, nil, err
		}
		offs[i], fresh[i] = off, f
	}
	return offs, fresh, nil
}

// atEnd allocates n contiguous clusters at the end of the file.
func (a *allocator) atEnd(n int64) (int64, error) {
	off, err := a.endRun(n)
	if err != nil {
		return 0, err
	}
	// The bound is fixed first: a refcount block created for these
	// clusters goes right after them and moves a.end.
	end := off + n*a.cs
	a.end = end
	for c := off >> a.cb; c < end>>a.cb; c++ {
		if err := a.adjust(uint64(c), 1); err != nil {
			return 0, err
		}
	}
	return off, nil
}

// endRun returns the offset of the first n contiguous clusters from the
// end of the file on that have no refcount (a crash may have kept a
// refcount block but not the data that was extending the file). It
// does not take them.
func (a *allocator) endRun(n int64) (int64, error) {
	off := a.end
	for c := off >> a.cb; c < (off>>a.cb)+n; c++ {
		if off+n*a.cs > int64(offsetMask)+1 {
			return 0, &disk.UnsupportedError{Format: formatName, Feature: "growing the image file past 2^56 bytes"}
		}
		rc, err := a.refcount(uint64(c))
		if err != nil {
			return 0, err
		}
		if rc != 0 {
			off = (c + 1) << a.cb
		}
	}
	return off, nil
}

// allocate reserves n contiguous clusters at the end of the file plus
// extra single clusters, sets their refcounts to 1 and makes the
// refcounts durable before it returns (used for metadata written
// directly, such as a moved L1 table). It returns the offset of the n
// clusters and of each extra one.
func (a *allocator) allocate(n int64, extra int) (int64, []int64, error) {
	start, err := a.atEnd(n)
	if err != nil {
		return 0, nil, err
	}
	extras := make([]int64, extra)
	for i := range extras {
		if extras[i], err = a.take(); err != nil {
			return 0, nil, err
		}
	}
	if err := a.writeBack(true); err != nil {
		return 0, nil, err
	}
	return start, extras, a.img.syncFiles()
}

// release drops one reference from each host cluster overlapping
// [off, off+n). The caller has made durable every table change that
// stopped using them; the decrements reach the file at the next
// metadata flush.
func (a *allocator) release(off, n int64) error {
	for c := off >> a.cb; c <= (off+n-1)>>a.cb; c++ {
		if err := a.adjust(uint64(c), -1); err != nil {
			return err
		}
		if rc, err := a.refcount(uint64(c)); err == nil && rc == 0 {
			a.lockMeta()
			a.meta.remove(uint64(c))
			a.unlockMeta()
		}
	}
	return nil
}

// growTable makes room in the in-memory refcount table for index i (and
// more, doubling it) at new clusters at the end of the file. The table
// reaches the file, then the header, at the next flush.
func (a *allocator) growTable(i uint64) error {
	t := a.t
	oldN := int64(len(t.entries)) * 8
	n := max(2*oldN, alignUp(int64(i+1)*8, a.cs))
	// Leave room for the refcount blocks of the table itself.
	n = alignUp(n+a.cs, a.cs)
	if n > maxRefcountTableBytes {
		return &disk.UnsupportedError{Format: formatName,
			Feature: fmt.Sprintf("a refcount table over %d MiB", maxRefcountTableBytes>>20)}
	}
	off, err := a.endRun(n / a.cs)
	if err != nil {
		return err
	}
	a.end = off + n
	entries := make([]uint64, n/8)
	copy(entries, t.entries)
	a.lockMeta()
	t.entries = entries
	prev := a.moved
	if prev == nil {
		a.moved = &movedTable{off: off, n: n, oldOff: int64(t.offset), oldN: oldN}
	} else {
		// Moved twice before a flush: the intermediate table never
		// reached the file.
		a.moved = &movedTable{off: off, n: n, oldOff: prev.oldOff, oldN: prev.oldN}
	}
	t.offset = uint64(off)
	a.unlockMeta()
	for c := off >> a.cb; c < (off+n)>>a.cb; c++ {
		if err := a.adjust(uint64(c), 1); err != nil {
			return err
		}
	}
	if prev != nil {
		return a.release(prev.off, prev.n)
	}
	return nil
}

// writeBack writes the changed refcount blocks, then (after a sync) the
// refcount table entries of new blocks, or a moved table and the header
// fields pointing to it. With lazy refcounts it does nothing unless final
// is set. The caller syncs afterwards.
func (a *allocator) writeBack(final bool) error {
	if a.img.w.lazy && !final {
		return nil
	}
	f := a.img.f
	for _, b := range a.blocks {
		if !b.dirty {
			continue
		}
		if _, err := f.WriteAt(b.data, int64(b.off)); err != nil {
			return fmt.Errorf("qcow2: writing refcount block at %#x: %w", b.off, err)
		}
		b.dirty = false
	}
	if len(a.newEntries) == 0 && a.moved == nil {
		a.trimBlocks()
		return nil
	}
	if err := a.img.syncFiles(); err != nil {
		return err
	}
	t := a.t
	if m := a.moved; m != nil {
		buf := make([]byte, m.n)
		for i, e := range t.entries {
			binary.BigEndian.PutUint64(buf[i*8:], e)
		}
		if _, err := f.WriteAt(buf, m.off); err != nil {
			return fmt.Errorf("qcow2: writing refcount table at %#x: %w", m.off, err)
		}
		if err := a.img.syncFiles(); err != nil {
			return err
		}
		var hdr [12]byte
		binary.BigEndian.PutUint64(hdr[:], uint64(m.off))
		binary.BigEndian.PutUint32(hdr[8:], uint32(m.n>>a.cb))
		if _, err := f.WriteAt(hdr[:], offRefcountTableOffset); err != nil {
			return fmt.Errorf("qcow2: writing the refcount table offset to the header: %w", err)
		}
		a.img.updateHeader(func(h *Header) {
			h.RefcountTableOffset = uint64(m.off)
			h.RefcountTableClusters = uint32(m.n >> a.cb)
		})
		a.lockMeta()
		a.moved = nil
		a.unlockMeta()
		if err := a.img.syncFiles(); err != nil {
			return err
		}
		clear(a.newEntries)
		// The old table is free now that the header points elsewhere.
		if err := a.release(m.oldOff, m.oldN); err != nil {
			return err
		}
		a.trimBlocks()
		return nil
	}
	var b [8]byte
	for i := range a.newEntries {
		binary.BigEndian.PutUint64(b[:], t.entries[i])
		if _, err := f.WriteAt(b[:], int64(t.offset+i*8)); err != nil {
			return fmt.Errorf("qcow2: writing refcount table entry %d: %w", i, err)
		}
	}
	clear(a.newEntries)
	a.trimBlocks()
	return nil
}

// tooManyBlocks reports whether more refcount blocks are loaded than
// maxRefblockBytes allows (at least maxCleanRefblocks).
func (a *allocator) tooManyBlocks() bool {
	return int64(len(a.blocks)) > max(maxCleanRefblocks, maxRefblockBytes/a.cs)
}

// trimBlocks forgets unchanged blocks beyond maxCleanRefblocks.
func (a *allocator) trimBlocks() {
	if len(a.blocks) <= maxCleanRefblocks {
		return
	}
	a.dropClean()
}

// dropClean forgets every unchanged block.
func (a *allocator) dropClean() {
	for i, b := range a.blocks {
		if !b.dirty {
			delete(a.blocks, i)
		}
	}
}

// dirty reports whether refcount changes wait to be written.
func (a *allocator) dirty() bool {
	if len(a.newEntries) > 0 || a.moved != nil {
		return true
	}
	for _, b := range a.blocks {
		if b.dirty {
			return true
		}
	}
	return false
}
