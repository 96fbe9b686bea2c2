package qcow2

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sort"
	"sync"
	"sync/atomic"

	"github.com/imgloop/imgloop/disk"
)

// Metadata write-back. Writes change L2 entries, L1 entries and refcounts
// in memory; the changed L2 slices stay pinned in the slice cache (so
// readers see them) until a metadata flush writes everything in an order
// that keeps the image consistent across a crash at any point:
//
//	A. refcount blocks (increments, and decrements made safe by an
//	   earlier flush); new refcount blocks are linked into the refcount
//	   table, or a moved table into the header, only after a sync;
//	   then sync, which also makes every data write so far durable;
//	B. L2 slices and L1 entries; sync;
//	C. clusters the tables stopped using (rewritten compressed or
//	   shared clusters, discarded clusters, copied L2 tables) lose one
//	   reference in memory; those reaching 0 become free (and are
//	   punched when discarded).
//
// So no table entry on disk ever points at a cluster whose refcount on
// disk is too low, or at data not yet written: a crash leaves at worst
// leaked clusters. With lazy refcounts (a version 3 feature) the image
// is marked dirty before its first write and refcounts are written only
// when it is closed; a dirty image opened read-write has its refcounts
// rebuilt first.

// maxDirtySlices bounds the L2 slices changed in memory: past it an
// allocating write flushes the metadata itself.
const maxDirtySlices = 4096

// writer is the write side of an Image opened read-write.
type writer struct {
	// unsupported names the feature that prevents writes, "" if none.
	unsupported string
	// err is why the write side could not be set up, returned by every
	// write.
	err error

	mu    sync.Mutex // allocation and metadata changes
	alloc *allocator // under mu
	// end mirrors alloc.end for lock-free checks of host offsets.
	end atomic.Int64
	// metaMu guards what allocator.isMeta reads (the metadata set, the
	// refcount table's place and a moved table), so that writes in
	// place, which do not hold mu, can check host offsets against it:
	// changes to those take metaMu besides mu.
	metaMu sync.RWMutex
	// clean is set when every metadata change made so far is durable
	// (the last metadata flush left nothing to write), and cleared (under
	// mu) before each change: a write in place that finds it set after
	// its data is durable needs no metadata flush (see WriteAtFUA).
	clean atomic.Bool

	// failed holds the error that stopped the write side (a failed
	// metadata update, or corruption found): every later write returns
	// it.
	failed atomic.Pointer[error]

	// lazy: lazy refcounts (the dirty bit is set before the first write).
	lazy bool
	// started is set once the header was prepared for writing (unknown
	// autoclear bits cleared, the dirty bit set for lazy refcounts).
	started atomic.Bool

	// Under mu: the metadata changed in memory.
	l1Copied    []bool              // OFLAG_COPIED of each active L1 entry
	dirtyL1     map[uint64]bool     // L1 indexes to write
	dirtyL2     map[uint64]bool     // L2 slice offsets to write (pinned in the cache)
	pendingFree []pendingFree       // released after the next table write
	newTables   map[uint64]struct{} // L2 tables allocated since the last flush
}

// pendingFree is a host range whose reference goes away once the table
// change that dropped it is durable.
type pendingFree struct {
	off, n int64
	punch  bool // punch a hole once free (discard)
}

// initWriter sets up the write side of an image opened read-write. It
// never fails Open: an image this version cannot write still reads, and
// its writes return the reason.
func (img *Image) initWriter(fileSize int64) {
	w := &writer{dirtyL1: map[uint64]bool{}, dirtyL2: map[uint64]bool{}, newTables: map[uint64]struct{}{}}
	img.w = w
	h := img.header()
	switch {
	case h.CryptMethod != 0:
		w.unsupported = "encryption"
	case h.Corrupt():
		w.unsupported = "writing an image marked corrupt (repair it with imgloop check -r all)"
	case h.Dirty():
		w.unsupported = "writing a dirty image whose refcounts could not be repaired"
	}
	if w.unsupported != "" {
		return
	}
	w.lazy = h.Version >= 3 && h.LazyRefcounts()
	if err := img.readL1Flags(); err != nil {
		w.err = err
		return
	}
	a, err := newAllocator(img, fileSize)
	if err != nil {
		w.err = fmt.Errorf("qcow2: write: %w", err)
		return
	}
	w.alloc = a
	w.end.Store(a.end)
	w.clean.Store(true)
	// Data clusters may now lie past the file's size at Open; writes
	// check host offsets against the allocation end instead.
	img.geo.dataSize = int64(offsetMask) + 1
}

// repairDirty repairs the refcounts of a dirty image in f (as qemu-img
// check -r all does) and clears its dirty bit.
func repairDirty(f disk.File) error {
	res, err := Check(f, CheckOptions{Repair: RepairAll})
	if err != nil {
		return err
	}
	if res.ExitCode() != 0 {
		return fmt.Errorf("qcow2: repairing the refcounts of a dirty image left %d corruptions, %d leaks", res.Corruptions, res.Leaks)
	}
	var b [8]byte
	if _, err := f.ReadAt(b[:], offIncompatibleFeatures); err != nil {
		return err
	}
	incompat := binary.BigEndian.Uint64(b[:])
	if incompat&IncompatDirty == 0 {
		return nil
	}
	binary.BigEndian.PutUint64(b[:], incompat&^IncompatDirty)
	if _, err := f.WriteAt(b[:], offIncompatibleFeatures); err != nil {
		return err
	}
	return f.Sync()
}

// readL1Flags reads the OFLAG_COPIED flags of the active L1 table.
func (img *Image) readL1Flags() error {
	w := img.w
	w.l1Copied = make([]bool, len(img.l1))
	if len(img.l1) == 0 {
		return nil
	}
	buf := make([]byte, len(img.l1)*8)
	if _, err := img.f.ReadAt(buf, int64(img.header().L1TableOffset)); err != nil {
		return fmt.Errorf("qcow2: reading L1 table: %w", err)
	}
	for i := range w.l1Copied {
		w.l1Copied[i] = binary.BigEndian.Uint64(buf[i*8:])&entryCopied != 0
	}
	return nil
}

// writable returns nil if img accepts writes, else why not.
func (img *Image) writable(op string) error {
	if img.closed.Load() {
		return disk.ErrClosed
	}
	w := img.w
	switch {
	case img.snapshot != nil || w == nil:
		return fmt.Errorf("qcow2: %s: %w", op, disk.ErrReadOnly)
	case w.unsupported != "":
		// The image is read-only for this driver (see Capabilities).
		return fmt.Errorf("qcow2: %s: %w: %w", op, disk.ErrReadOnly, &disk.UnsupportedError{Format: formatName, Feature: w.unsupported})
	case w.err != nil:
		return w.err
	}
	if err := w.failed.Load(); err != nil {
		return fmt.Errorf("qcow2: %s: the image's write side stopped: %w", op, *err)
	}
	if !w.started.Load() {
		return img.start()
	}
	return nil
}

// start prepares the header for the first write: autoclear feature bits
// other than data-file-raw are cleared (whatever they describe, such as
// persistent bitmaps, is not kept up to date by this driver, and the
// spec asks a writer that does not know them to clear them), and with
// lazy refcounts the dirty bit is set; then the file is synced.
func (img *Image) start() error {
	w := img.w
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.started.Load() {
		return nil
	}
	if img.header().Version >= 3 {
		err := img.writeFeatures(func(h *Header) (uint64, uint64) {
			incompat := h.IncompatibleFeatures
			if w.lazy {
				incompat |= IncompatDirty
			}
			return incompat, h.AutoclearFeatures & AutoclearDataFileRaw
		})
		if err != nil {
			return img.fail(err)
		}
	}
	w.started.Store(true)
	return nil
}

// writeFeatures writes the incompatible and autoclear feature fields of
// the header that change returns (given the current header), if they
// differ, and syncs. The header changes under img.hdrMu, so that
// concurrent changes (a write's failure, the first write, Close) each
// start from the other's result.
func (img *Image) writeFeatures(change func(h *Header) (incompat, auto uint64)) error {
	img.hdrMu.Lock()
	defer img.hdrMu.Unlock()
	cur := img.hdr.Load()
	incompat, auto := change(cur)
	if incompat == cur.IncompatibleFeatures && auto == cur.AutoclearFeatures {
		return nil
	}
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], incompat)
	if _, err := img.f.WriteAt(b[:], offIncompatibleFeatures); err != nil {
		return fmt.Errorf("qcow2: writing the header's feature bits: %w", err)
	}
	binary.BigEndian.PutUint64(b[:], auto)
	if _, err := img.f.WriteAt(b[:], offAutoclearFeatures); err != nil {
		return fmt.Errorf("qcow2: writing the header's feature bits: %w", err)
	}
	if err := img.syncFiles(); err != nil {
		return err
	}
	h := *cur
	h.IncompatibleFeatures, h.AutoclearFeatures = incompat, auto
	img.hdr.Store(&h)
	return nil
}

// fail stops the write side with err (the in-memory metadata may no
// longer match the file). If err reports corruption, the image is
// marked corrupt on disk as QEMU does, so that it is not written again
// before a repair. It returns err.
func (img *Image) fail(err error) error {
	w := img.w
	w.failed.CompareAndSwap(nil, &err)
	var fe *disk.FormatError
	if errors.As(err, &fe) && fe.Corrupt && img.header().Version >= 3 {
		_ = img.writeFeatures(func(h *Header) (uint64, uint64) {
			return h.IncompatibleFeatures | IncompatCorrupt, h.AutoclearFeatures
		})
	}
	return err
}

// syncFiles syncs the image file and the external data file.
func (img *Image) syncFiles() error {
	if img.data != img.f {
		if err := img.data.Sync(); err != nil {
			return fmt.Errorf("qcow2: sync of the data file: %w", err)
		}
	}
	if err := img.f.Sync(); err != nil {
		return fmt.Errorf("qcow2: sync: %w", err)
	}
	return nil
}

// metaDirty reports whether metadata changes wait to be written.
func (w *writer) metaDirty() bool {
	return len(w.dirtyL1) > 0 || len(w.dirtyL2) > 0 || len(w.pendingFree) > 0 || (!w.lazy && w.alloc.dirty())
}

// limitDirty bounds the metadata held in memory between flushes: it
// flushes the metadata when too many L2 slices wait to be written, and
// when too many refcount blocks are loaded it drops the unchanged ones
// and, if that is not enough, writes the changed ones back (with lazy
// refcounts too: refcount blocks may reach the file at any time, as
// they only hold decrements once the tables that dropped the clusters
// are durable, and a lazy image is marked dirty anyway). Called under
// w.mu.
func (img *Image) limitDirty() error {
	w := img.w
	if len(w.dirtyL2) > maxDirtySlices {
		return img.flushMeta(false)
	}
	if a := w.alloc; a.tooManyBlocks() {
		a.dropClean()
		if a.tooManyBlocks() {
			if err := a.writeBack(true); err != nil {
				return img.fail(err)
			}
			if err := img.syncFiles(); err != nil {
				return img.fail(err)
			}
			a.dropClean()
		}
	}
	return nil
}

// flushMeta writes the metadata changed in memory (steps A to C above)
// until nothing is left, and syncs. Called under w.mu.
func (img *Image) flushMeta(final bool) error {
	w := img.w
	if !w.metaDirty() && !(final && w.alloc.dirty()) {
		if err := img.syncFiles(); err != nil {
			return err
		}
		w.clean.Store(true)
		return nil
	}
	for range 3 {
		if err := img.flushMetaOnce(final); err != nil {
			return img.fail(err)
		}
		if !w.metaDirty() && !(final && w.alloc.dirty()) {
			w.clean.Store(true)
			return nil
		}
	}
	return img.fail(fmt.Errorf("qcow2: metadata flush did not settle"))
}

// flushMetaOnce runs steps A to C once.
func (img *Image) flushMetaOnce(final bool) error {
	w := img.w
	a := w.alloc
	// A. New L2 tables are written here too: nothing on disk points at
	// them before step B.
	for off := range w.dirtyL2 {
		if _, ok := w.newTables[off&^uint64(a.cs-1)]; !ok {
			continue
		}
		if err := img.writeSlice(off); err != nil {
			return err
		}
		img.cache.unpin(off)
		delete(w.dirtyL2, off)
	}
	if err := a.writeBack(final); err != nil {
		return err
	}
	if err := img.syncFiles(); err != nil {
		return err
	}
	// B.
	if len(w.dirtyL2) > 0 || len(w.dirtyL1) > 0 {
		for off := range w.dirtyL2 {
			if err := img.writeSlice(off); err != nil {
				return err
			}
		}
		if err := img.writeL1(); err != nil {
			return err
		}
		if err := img.syncFiles(); err != nil {
			return err
		}
		for off := range w.dirtyL2 {
			img.cache.unpin(off)
		}
		clear(w.dirtyL2)
		clear(w.dirtyL1)
		clear(w.newTables)
	}
	// C. Requests still using the clusters finish first (img.reuse).
	if len(w.pendingFree) == 0 {
		return nil
	}
	img.reuse.Lock()
	defer img.reuse.Unlock()
	hp, canPunch := img.f.(disk.HolePuncher)
	for _, p := range w.pendingFree {
		if err := a.release(p.off, p.n); err != nil {
			return err
		}
		if !p.punch || !canPunch {
			continue
		}
		// Punch the whole clusters that became free.
		for c := p.off >> a.cb; c <= (p.off+p.n-1)>>a.cb; c++ {
			if rc, err := a.refcount(uint64(c)); err == nil && rc == 0 {
				_ = hp.PunchHole(c<<a.cb, a.cs)
			}
		}
	}
	w.pendingFree = w.pendingFree[:0]
	return nil
}

// writeSlice writes the L2 slice at host offset off from the cache.
func (img *Image) writeSlice(off uint64) error {
	slice, err := img.l2Slice(off)
	if err != nil {
		return err
	}
	if _, err := img.f.WriteAt(slice, int64(off)); err != nil {
		return fmt.Errorf("qcow2: writing L2 table slice at %#x: %w", off, err)
	}
	return nil
}

// writeL1 writes the changed L1 entries, contiguous ones at once.
func (img *Image) writeL1() error {
	w := img.w
	if len(w.dirtyL1) == 0 {
		return nil
	}
	idx := make([]uint64, 0, len(w.dirtyL1))
	for i := range w.dirtyL1 {
		if i < uint64(len(img.l1)) { // the table may have shrunk (Resize)
			idx = append(idx, i)
		}
	}
	sort.Slice(idx, func(i, j int) bool { return idx[i] < idx[j] })
	for len(idx) > 0 {
		n := 1
		for n < len(idx) && idx[n] == idx[0]+uint64(n) {
			n++
		}
		buf := make([]byte, n*8)
		for k := range n {
			i := idx[0] + uint64(k)
			e := atomic.LoadUint64(&img.l1[i])
			if e != 0 && i < uint64(len(w.l1Copied)) && w.l1Copied[i] {
				e |= entryCopied
			}
			binary.BigEndian.PutUint64(buf[k*8:], e)
		}
		at := int64(img.header().L1TableOffset) + int64(idx[0])*8
		if _, err := img.f.WriteAt(buf, at); err != nil {
			return fmt.Errorf("qcow2: writing L1 entries at %#x: %w", at, err)
		}
		idx = idx[n:]
	}
	return nil
}

// Flush makes every completed write durable: it writes the metadata
// changed in memory (in crash-safe order) and syncs the host files. It
// does nothing for a read-only image, and returns disk.ErrClosed after
// Close.
func (img *Image) Flush() error {
	t, err := img.enter()
	if err != nil {
		return err
	}
	defer img.exit(t)
	return img.flush()
}

// flush is Flush for a caller already admitted.
func (img *Image) flush() error {
	w := img.w
	if w == nil || w.alloc == nil || !w.started.Load() {
		return nil
	}
	if err := w.failed.Load(); err != nil {
		return fmt.Errorf("qcow2: flush: the image's write side stopped: %w", *err)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	return img.flushMeta(false)
}

// flushOnClose writes everything back before Close closes the file, and
// clears the dirty bit of a lazy-refcounts image.
func (img *Image) flushOnClose() error {
	w := img.w
	if w == nil || w.alloc == nil || !w.started.Load() {
		return nil
	}
	if err := w.failed.Load(); err != nil {
		return fmt.Errorf("qcow2: close: writes since the last flush may be lost: the image's write side stopped: %w", *err)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if err := img.flushMeta(true); err != nil {
		return err
	}
	return img.writeFeatures(func(h *Header) (uint64, uint64) {
		return h.IncompatibleFeatures &^ IncompatDirty, h.AutoclearFeatures
	})
}

// writableTable returns the host offset of the L2 table of L1 index l1i
// ready to be changed: allocated (a zeroed new table) when missing, and
// copied when shared with a snapshot (OFLAG_COPIED clear). Under w.mu.
func (img *Image) writableTable(l1i uint64) (uint64, error) {
	w := img.w
	for uint64(len(w.l1Copied)) < uint64(len(img.l1)) {
		w.l1Copied = append(w.l1Copied, false) // the L1 table grew (Resize)
	}
	cur := atomic.LoadUint64(&img.l1[l1i])
	if cur != 0 && w.l1Copied[l1i] {
		return cur, nil
	}
	w.clean.Store(false)
	a := w.alloc
	off, err := a.take()
	if err != nil {
		return 0, err
	}
	a.lockMeta()
	a.meta.add(uint64(off) >> a.cb)
	a.unlockMeta()
	w.end.Store(a.end)
	ss := uint64(img.cache.sliceSize)
	for s := uint64(0); s < uint64(a.cs); s += ss {
		slice := make([]byte, ss)
		if cur != 0 {
			old, err := img.l2Slice(cur + s)
			if err != nil {
				return 0, err
			}
			copy(slice, old)
		}
		img.cache.set(uint64(off)+s, slice, true)
		w.dirtyL2[uint64(off)+s] = true
	}
	w.newTables[uint64(off)] = struct{}{}
	atomic.StoreUint64(&img.l1[l1i], uint64(off))
	w.l1Copied[l1i] = true
	w.dirtyL1[l1i] = true
	if cur != 0 {
		w.pendingFree = append(w.pendingFree, pendingFree{off: int64(cur), n: a.cs})
	}
	return uint64(off), nil
}

// entry returns the raw L2 entry (and bitmap) of guest cluster ci, zero
// when its table is unallocated.
func (img *Image) entry(ci uint64) (word, bitmap uint64, err error) {
	g := &img.geo
	l2Bits := g.l2Bits()
	l1i := ci >> l2Bits
	if l1i >= uint64(len(img.l1)) {
		return 0, 0, img.corrupt(int64(img.header().L1TableOffset), fmt.Sprintf("guest cluster %d lies past the L1 table", ci))
	}
	table := atomic.LoadUint64(&img.l1[l1i])
	if table == 0 {
		return 0, 0, nil
	}
	eb := uint64(g.entryBytes())
	pos := (ci & (1<<l2Bits - 1)) * eb
	ss := uint64(img.cache.sliceSize)
	slice, err := img.l2Slice(table + pos/ss*ss)
	if err != nil {
		return 0, 0, err
	}
	word = binary.BigEndian.Uint64(slice[pos%ss:])
	if g.extended {
		bitmap = binary.BigEndian.Uint64(slice[pos%ss+8:])
	}
	return word, bitmap, nil
}

// setEntries sets the L2 entries of guest clusters ci, ci+1, ... (all in
// one L2 slice) to words and bitmaps (nil without extended L2), in a
// new copy of the slice pinned in the cache. Under w.mu.
func (img *Image) setEntries(ci uint64, words, bitmaps []uint64) error {
	g := &img.geo
	w := img.w
	l2Bits := g.l2Bits()
	table, err := img.writableTable(ci >> l2Bits)
	if err != nil {
		return err
	}
	eb := uint64(g.entryBytes())
	pos := (ci & (1<<l2Bits - 1)) * eb
	ss := uint64(img.cache.sliceSize)
	sliceOff := table + pos/ss*ss
	old, err := img.l2Slice(sliceOff)
	if err != nil {
		return err
	}
	slice := make([]byte, ss)
	copy(slice, old)
	w.clean.Store(false)
	at := pos % ss
	for k, word := range words {
		binary.BigEndian.PutUint64(slice[at:], word)
		if g.extended {
			binary.BigEndian.PutUint64(slice[at+8:], bitmaps[k])
		}
		at += eb
	}
	img.cache.set(sliceOff, slice, true)
	w.dirtyL2[sliceOff] = true
	return nil
}
