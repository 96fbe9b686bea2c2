package qcow2

import (
	"encoding/binary"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/imgloop/imgloop/disk"
)

// Writes (issue 3, first slice). An image opened with ReadOnly false (and
// no snapshot selected) accepts writes when it is a plain version 2 or 3
// image: no extended L2 entries, internal snapshots, external data file,
// autoclear features (bitmaps), dirty or corrupt flag. Other images open
// and read as before; their writes fail with a *disk.UnsupportedError
// naming the feature.
//
// A write to a cluster that is allocated with refcount 1 (the COPIED flag
// set) goes straight to the host file, without any lock. Any other
// cluster (unallocated, zero, compressed, or shared) gets a new host
// cluster at the end of the file, under the writer's allocation mutex, in
// an order that keeps the image consistent across a crash (at worst
// leaking clusters):
//
//  1. refcounts of the new clusters (and new refcount blocks) — sync;
//  2. the data, the untouched parts of partial clusters copied from the
//     old content (backing file, zeros, inflated compressed data), and a
//     new L2 table's content — sync;
//  3. the L2 entries (in an existing table), or the L1 entry of a new
//     L2 table;
//  4. if old clusters are released (compressed, preallocated zero, or
//     shared clusters rewritten): sync, then their refcounts decremented.
//
// Flush (and Close) sync the host file. Reads never take the allocation
// mutex: they see the old or the new L1 entry (read atomically) and the
// old or the new L2 slice (replaced whole in the cache).

// maxZeroChunk bounds the buffer WriteZeroes writes through.
const maxZeroChunk = 1 << 20

// writer is the write side of an Image opened read-write.
type writer struct {
	// unsupported names the feature that prevents writes, "" if none.
	unsupported string
	// err is why the write side could not be set up (refcount table
	// unreadable), returned by every write.
	err error

	mu    sync.Mutex // allocating writes
	alloc *allocator // under mu
	// end mirrors alloc.end for lock-free checks of host offsets.
	end atomic.Int64
	// failed holds the error of an allocating write that failed part
	// way: the in-memory tables may no longer match the file, so every
	// later write returns it.
	failed atomic.Pointer[error]
	// meta lists the metadata found at Open that data writes must never
	// touch: the header cluster, the L1 table and the refcount table.
	meta []span
}

// span is a range of host bytes.
type span struct{ off, n int64 }

// overlaps reports whether [off, off+n) meets s.
func (s span) overlaps(off, n int64) bool { return off < s.off+s.n && s.off < off+n }

// initWriter sets up the write side of an image opened read-write. It
// never fails Open: an image this version cannot write still reads, and
// its writes return the reason.
func (img *Image) initWriter(fileSize int64) {
	w := &writer{}
	img.w = w
	h := img.hdr
	switch {
	case h.CryptMethod != 0:
		w.unsupported = "encryption"
	case h.Corrupt():
		w.unsupported = "writing an image marked corrupt"
	case h.Dirty():
		w.unsupported = "writing a dirty image (its refcounts need repair)"
	case h.ExtendedL2():
		w.unsupported = "writing extended L2 entries"
	case h.HasDataFile():
		w.unsupported = "writing an external data file"
	case len(img.snaps) > 0 || h.NbSnapshots > 0:
		w.unsupported = "writing an image with internal snapshots"
	case h.AutoclearFeatures != 0:
		w.unsupported = fmt.Sprintf("writing an image with autoclear features %#x (persistent bitmaps)", h.AutoclearFeatures)
	}
	if w.unsupported != "" {
		return
	}
	a, err := newAllocator(img, fileSize)
	if err != nil {
		w.err = fmt.Errorf("qcow2: write: %w", err)
		return
	}
	w.alloc = a
	w.end.Store(a.end)
	w.meta = []span{
		{0, img.geo.clusterSize()},
		{int64(h.L1TableOffset), int64(h.L1Size) * 8},
		{int64(h.RefcountTableOffset), int64(h.RefcountTableClusters) << h.ClusterBits},
	}
	// Data clusters may now lie past the file's size at Open; writes
	// check host offsets against the allocation end instead.
	img.geo.dataSize = int64(offsetMask) + 1
}

// writable returns nil if img accepts writes, else why not.
func (img *Image) writable(op string) error {
	if img.closed.Load() {
		return disk.ErrClosed
	}
	w := img.w
	switch {
	case w == nil:
		return fmt.Errorf("qcow2: %s: %w", op, disk.ErrReadOnly)
	case w.unsupported != "":
		return fmt.Errorf("qcow2: %s: %w", op, &disk.UnsupportedError{Format: formatName, Feature: w.unsupported})
	case w.err != nil:
		return w.err
	}
	if err := w.failed.Load(); err != nil {
		return fmt.Errorf("qcow2: %s: an earlier write failed: %w", op, *err)
	}
	return nil
}

// WriteAt writes len(p) bytes at guest offset off. A request reaching
// past Size fails whole with disk.ErrOutOfRange. Images opened read-only
// return disk.ErrReadOnly; images with features this version cannot write
// return a *disk.UnsupportedError. See the write notes above for the
// order of updates.
func (img *Image) WriteAt(p []byte, off int64) (int, error) {
	if err := img.writable("write"); err != nil {
		return 0, err
	}
	if err := disk.CheckRange(off, int64(len(p)), img.size); err != nil {
		return 0, fmt.Errorf("qcow2: write: %w", err)
	}
	cb := img.geo.clusterBits
	cs := img.geo.clusterSize()
	// A pending direct write: runs of allocated clusters contiguous on
	// the host are written at once.
	runHost, runAt, runLen := int64(-1), 0, 0
	flushRun := func() error {
		if runLen == 0 {
			return nil
		}
		if _, err := img.f.WriteAt(p[runAt:runAt+runLen], runHost); err != nil {
			return fmt.Errorf("qcow2: writing data at %#x: %w", runHost, err)
		}
		runLen = 0
		return nil
	}
	done := 0
	for done < len(p) {
		pos := off + int64(done)
		ci := uint64(pos) >> cb
		in := pos - int64(ci)<<cb
		n := int(min(cs-in, int64(len(p)-done)))
		ref, err := img.l2Ref(ci)
		if err != nil {
			return done, err
		}
		if host, ok := img.inPlace(ref); ok {
			if runLen > 0 && runHost+int64(runLen) != host+in {
				if err := flushRun(); err != nil {
					return runAt, err
				}
			}
			if runLen == 0 {
				runHost, runAt = host+in, done
			}
			runLen += n
			done += n
			continue
		}
		if err := flushRun(); err != nil {
			return runAt, err
		}
		m, err := img.writeAlloc(p[done:], pos)
		done += m
		if err != nil {
			return done, err
		}
	}
	if err := flushRun(); err != nil {
		return runAt, err
	}
	return done, nil
}

// inPlace reports whether the cluster of ref can be written in place (a
// normal cluster with refcount 1) and its host offset.
func (img *Image) inPlace(ref l2Ref) (int64, bool) {
	if ref.entry.kind != kindNormal || ref.word&entryCopied == 0 {
		return 0, false
	}
	host := int64(ref.entry.host)
	cs := img.geo.clusterSize()
	if host+cs > img.w.end.Load() {
		return 0, false // writeAlloc reports it
	}
	for _, m := range img.w.meta {
		if m.overlaps(host, cs) {
			return 0, false
		}
	}
	return host, true
}

// l2Ref locates the L2 entry of a guest cluster.
type l2Ref struct {
	l1i      uint64 // L1 index
	table    uint64 // L2 table offset, 0 if the table is unallocated
	sliceOff uint64 // host offset of the entry's slice (table != 0)
	idx      uint64 // index of the entry in its slice
	slice    []byte // the cached slice (table != 0)
	word     uint64 // the raw entry, 0 without a table
	entry    l2Entry
}

// l2Ref reads the L2 entry of guest cluster ci through the cache.
func (img *Image) l2Ref(ci uint64) (l2Ref, error) {
	g := &img.geo
	l2Bits := g.l2Bits()
	perSlice := uint64(img.cache.sliceSize / 8)
	r := l2Ref{l1i: ci >> l2Bits}
	if r.l1i >= uint64(len(img.l1)) {
		return r, img.corrupt(int64(img.hdr.L1TableOffset), fmt.Sprintf("guest cluster %d lies past the L1 table", ci))
	}
	l2i := ci & (1<<l2Bits - 1)
	r.idx = l2i % perSlice
	r.table = atomic.LoadUint64(&img.l1[r.l1i])
	if r.table == 0 {
		return r, nil
	}
	r.sliceOff = r.table + l2i/perSlice*uint64(img.cache.sliceSize)
	slice, err := img.l2Slice(r.sliceOff)
	if err != nil {
		return r, err
	}
	r.slice = slice
	r.word = binary.BigEndian.Uint64(slice[r.idx*8:])
	e, bad := g.decodeL2(r.word, 0)
	if bad != "" {
		return r, img.corrupt(int64(r.sliceOff+r.idx*8), fmt.Sprintf("L2 table at %#x: %s", r.table, bad))
	}
	r.entry = e
	return r, nil
}

// writeAlloc writes a prefix of p at guest offset pos, at least the part
// in pos's cluster, allocating new host clusters for a run of clusters of
// one L2 slice that cannot be written in place. It returns how many bytes
// of p it wrote.
func (img *Image) writeAlloc(p []byte, pos int64) (int, error) {
	w := img.w
	w.mu.Lock()
	defer w.mu.Unlock()
	if err := w.failed.Load(); err != nil {
		return 0, fmt.Errorf("qcow2: write: an earlier write failed: %w", *err)
	}
	n, changed, err := img.writeAllocLocked(p, pos)
	if err != nil && changed {
		w.failed.Store(&err)
	}
	return n, err
}

// writeAllocLocked is writeAlloc under the allocation mutex; changed
// reports whether it got as far as changing the file (an error then
// leaves the writer unusable).
func (img *Image) writeAllocLocked(p []byte, pos int64) (_ int, changed bool, _ error) {
	w := img.w
	g := &img.geo
	cb := g.clusterBits
	cs := g.clusterSize()
	ci0 := uint64(pos) >> cb
	ref, err := img.l2Ref(ci0)
	if err != nil {
		return 0, false, err
	}
	groupStart := int64(ci0) << cb
	if host, ok := img.inPlace(ref); ok {
		// Allocated by another write while this one waited.
		n := min(int64(len(p)), groupStart+cs-pos)
		if _, err := img.f.WriteAt(p[:n], host+pos-groupStart); err != nil {
			return 0, false, fmt.Errorf("qcow2: writing data at %#x: %w", host+pos-groupStart, err)
		}
		return int(n), false, nil
	}
	if ref.entry.kind == kindNormal && ref.word&entryCopied != 0 {
		return 0, false, img.corrupt(int64(ref.sliceOff+ref.idx*8),
			fmt.Sprintf("data cluster at %#x overlaps metadata or lies past the end of the file (%#x)", ref.entry.host, w.end.Load()))
	}
	// Gather the run: following clusters of the same slice that the
	// write covers and that need a new cluster too.
	end := pos + int64(len(p))
	perSlice := uint64(img.cache.sliceSize / 8)
	old := []l2Ref{ref}
	for k := uint64(1); ref.idx+k < perSlice && int64(ci0+k)<<cb < end; k++ {
		r := ref
		r.idx += k
		r.word, r.entry = 0, l2Entry{}
		if r.table != 0 {
			r.word = binary.BigEndian.Uint64(ref.slice[r.idx*8:])
			e, bad := g.decodeL2(r.word, 0)
			if bad != "" {
				return 0, false, img.corrupt(int64(r.sliceOff+r.idx*8), fmt.Sprintf("L2 table at %#x: %s", r.table, bad))
			}
			r.entry = e
			if e.kind == kindNormal && r.word&entryCopied != 0 {
				break
			}
		}
		old = append(old, r)
	}
	for _, r := range old {
		if r.entry.kind == kindUnallocated || r.entry.kind == kindZero {
			continue
		}
		n := cs
		if r.entry.kind == kindCompressed {
			n = r.entry.csize
		}
		for _, m := range w.meta {
			if m.overlaps(int64(r.entry.host), n) {
				return 0, false, img.corrupt(int64(r.sliceOff+r.idx*8),
					fmt.Sprintf("L2 entry %#016x points into metadata at %#x", r.word, m.off))
			}
		}
	}
	k := int64(len(old))
	groupEnd := groupStart + k*cs
	buf := make([]byte, k*cs)
	if pos > groupStart {
		if err := img.readOld(buf[:cs], groupStart); err != nil {
			return 0, false, err
		}
	}
	if end < groupEnd && (k > 1 || pos == groupStart) {
		if err := img.readOld(buf[(k-1)*cs:], groupEnd-cs); err != nil {
			return 0, false, err
		}
	}
	n := copy(buf[pos-groupStart:], p)

	// 1. Refcounts.
	extra := 0
	if ref.table == 0 {
		extra = 1
	}
	host, extras, err := w.alloc.allocate(k, extra)
	w.end.Store(w.alloc.end)
	if err != nil {
		return 0, true, err
	}
	// 2. Data, and a new L2 table.
	if _, err := img.f.WriteAt(buf, host); err != nil {
		return 0, true, fmt.Errorf("qcow2: writing data at %#x: %w", host, err)
	}
	entries := make([]byte, k*8)
	for j := range k {
		binary.BigEndian.PutUint64(entries[j*8:], uint64(host+j*cs)|entryCopied)
	}
	if ref.table == 0 {
		table := make([]byte, cs)
		l2i := ci0 & (1<<g.l2Bits() - 1)
		copy(table[l2i*8:], entries)
		if _, err := img.f.WriteAt(table, extras[0]); err != nil {
			return 0, true, fmt.Errorf("qcow2: writing L2 table at %#x: %w", extras[0], err)
		}
	}
	if err := img.f.Sync(); err != nil {
		return 0, true, fmt.Errorf("qcow2: sync: %w", err)
	}
	// 3. The L2 entries, or the L1 entry.
	if ref.table == 0 {
		var b [8]byte
		binary.BigEndian.PutUint64(b[:], uint64(extras[0])|entryCopied)
		at := int64(img.hdr.L1TableOffset) + int64(ref.l1i)*8
		if _, err := img.f.WriteAt(b[:], at); err != nil {
			return 0, true, fmt.Errorf("qcow2: writing L1 entry %d: %w", ref.l1i, err)
		}
		atomic.StoreUint64(&img.l1[ref.l1i], uint64(extras[0]))
	} else {
		at := int64(ref.sliceOff + ref.idx*8)
		if _, err := img.f.WriteAt(entries, at); err != nil {
			return 0, true, fmt.Errorf("qcow2: writing L2 entries at %#x: %w", at, err)
		}
		slice := make([]byte, len(ref.slice))
		copy(slice, ref.slice)
		copy(slice[ref.idx*8:], entries)
		img.cache.set(ref.sliceOff, slice)
	}
	// 4. Release what the old entries used.
	var free []span
	for _, r := range old {
		switch r.entry.kind {
		case kindCompressed:
			free = append(free, span{int64(r.entry.host), r.entry.csize})
		case kindNormal, kindZeroAlloc:
			free = append(free, span{int64(r.entry.host), cs})
		}
	}
	if len(free) > 0 {
		if err := img.f.Sync(); err != nil {
			return n, true, fmt.Errorf("qcow2: sync: %w", err)
		}
		for _, s := range free {
			if err := w.alloc.release(s.off, s.n); err != nil {
				return n, true, err
			}
		}
	}
	return n, true, nil
}

// readOld fills buf (one cluster) with the current content of the guest
// cluster at off; the part past the end of the disk reads as zeros.
func (img *Image) readOld(buf []byte, off int64) error {
	n := min(int64(len(buf)), img.size-off)
	clear(buf[n:])
	if _, err := img.ReadAt(buf[:n], off); err != nil {
		return fmt.Errorf("qcow2: reading cluster at guest offset %#x to copy it: %w", off, err)
	}
	return nil
}

// Discard returns disk.ErrReadOnly for a read-only image, else an error
// matching disk.ErrNotSupported (not implemented yet).
func (img *Image) Discard(off, n int64) error {
	if err := img.writable("discard"); err != nil {
		return err
	}
	return fmt.Errorf("qcow2: discard: %w", &disk.UnsupportedError{Format: formatName, Feature: "discard"})
}

// WriteZeroes writes zeros over [off, off+n) as ordinary data (zero
// clusters are not written yet). It returns disk.ErrReadOnly for a
// read-only image.
func (img *Image) WriteZeroes(off, n int64, flags disk.ZeroFlags) error {
	if err := img.writable("write zeroes"); err != nil {
		return err
	}
	if err := disk.CheckRange(off, n, img.size); err != nil {
		return fmt.Errorf("qcow2: write zeroes: %w", err)
	}
	zero := make([]byte, min(n, maxZeroChunk))
	for n > 0 {
		k := min(n, int64(len(zero)))
		if _, err := img.WriteAt(zero[:k], off); err != nil {
			return err
		}
		off += k
		n -= k
	}
	return nil
}

// Flush makes every completed write durable (syncs the host file). It
// does nothing for a read-only image, and returns disk.ErrClosed after
// Close.
func (img *Image) Flush() error {
	if img.closed.Load() {
		return disk.ErrClosed
	}
	if img.w == nil || img.w.alloc == nil {
		return nil
	}
	if err := img.f.Sync(); err != nil {
		return fmt.Errorf("qcow2: flush: %w", err)
	}
	return nil
}

// flushOnClose syncs a writable image's file before Close closes it.
func (img *Image) flushOnClose() error {
	if img.w == nil || img.w.alloc == nil {
		return nil
	}
	if err := img.f.Sync(); err != nil {
		return fmt.Errorf("qcow2: flush: %w", err)
	}
	return nil
}
