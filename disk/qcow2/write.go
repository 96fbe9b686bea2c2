package qcow2

import (
	"fmt"

	"github.com/imgloop/imgloop/disk"
)

// Writes. A write to clusters allocated with refcount 1 (OFLAG_COPIED set;
// with extended L2 entries, to subclusters already allocated) goes
// straight to the host file, holding only the shared side of
// Image.reuse. Any other write takes the allocation mutex and:
//
//   - gives each guest cluster that needs one a host cluster (a free one,
//     or one at the end of the file): unallocated and zero clusters,
//     compressed clusters (rewritten uncompressed) and clusters shared
//     with an internal snapshot (copied);
//   - writes the data, filling the rest of each partial cluster (with
//     extended L2 entries, of each partial subcluster) with the current
//     content: the backing file's data, zeros, or the old cluster's;
//   - points the L2 entries at the new clusters in memory (copying an L2
//     table shared with a snapshot first), and queues the old clusters
//     for release.
//
// The metadata reaches the file at the next Flush (or when too much of it
// is pending), in the order described in meta.go. With an external data
// file, guest cluster i lives at offset i × cluster size of the data file
// and only the L2 entries change.

// maxRunBytes bounds how many bytes of new clusters one allocating step
// prepares.
const maxRunBytes = 8 << 20

// WriteAt writes len(p) bytes at guest offset off. A request reaching
// past Size fails whole with disk.ErrOutOfRange. Images opened read-only
// (or on a snapshot) return disk.ErrReadOnly; images this driver cannot
// write return a *disk.UnsupportedError; after a failed metadata update
// or when corruption is found, every write returns that error.
func (img *Image) WriteAt(p []byte, off int64) (int, error) {
	return img.writeEntry(p, off, false)
}

var _ disk.FUAWriter = (*Image)(nil)

// WriteAtFUA is WriteAt whose data is durable when it returns
// (disk.FUAWriter). A write that lands wholly in allocated clusters,
// whose mapping is already durable, makes only its own data durable
// (pwritev2 with RWF_DSYNC on the host file); any other write is followed
// by a Flush.
func (img *Image) WriteAtFUA(p []byte, off int64) (int, error) {
	return img.writeEntry(p, off, true)
}

// writeEntry admits WriteAt and WriteAtFUA.
func (img *Image) writeEntry(p []byte, off int64, fua bool) (int, error) {
	t, err := img.enter()
	if err != nil {
		return 0, err
	}
	defer img.exit(t)
	if err := img.writable("write"); err != nil {
		return 0, err
	}
	if err := disk.CheckRange(off, int64(len(p)), img.size.Load()); err != nil {
		return 0, fmt.Errorf("qcow2: write: %w", err)
	}
	return img.writeAt(p, off, fua)
}

// writeAt is WriteAt (WriteAtFUA with fua set) for a caller already
// admitted, with the range checked.
func (img *Image) writeAt(p []byte, off int64, fua bool) (int, error) {
	_, syncs := img.data.(disk.SyncWriter)
	direct := fua && syncs // in-place pieces are written durably
	needFlush := !direct   // with FUA: a Flush must follow
	done := 0
	for done < len(p) {
		n, err := img.writeInPlace(p[done:], off+int64(done), direct)
		done += n
		if err != nil {
			return done, err
		}
		if done == len(p) {
			break
		}
		needFlush = true
		n, err = img.writeAlloc(p[done:], off+int64(done))
		done += n
		if err != nil {
			return done, err
		}
	}
	if fua && (needFlush || !img.w.clean.Load()) {
		return done, img.flush()
	}
	return done, nil
}

// writeInPlace writes the longest prefix of p (at guest offset pos) that
// lies in clusters writable in place, and returns its length. With sync
// set each piece is written durably (disk.SyncWriter).
func (img *Image) writeInPlace(p []byte, pos int64, sync bool) (int, error) {
	rt := img.reuse.Enter()
	defer img.reuse.Exit(rt)
	cb := img.geo.clusterBits
	cs := img.geo.clusterSize()
	runHost, runAt, runLen := int64(-1), 0, 0
	flush := func() error {
		if runLen == 0 {
			return nil
		}
		var err error
		if sync {
			_, err = img.data.(disk.SyncWriter).WriteAtSync(p[runAt:runAt+runLen], runHost)
		} else {
			_, err = img.data.WriteAt(p[runAt:runAt+runLen], runHost)
		}
		if err != nil {
			return fmt.Errorf("qcow2: writing data at %#x: %w", runHost, err)
		}
		img.startWriteback(runHost, int64(runLen))
		runLen = 0
		return nil
	}
	done := 0
	for done < len(p) {
		cur := pos + int64(done)
		ci := uint64(cur) >> cb
		in := cur - int64(ci)<<cb
		n := int(min(cs-in, int64(len(p)-done)))
		word, bitmap, err := img.entry(ci)
		if err != nil {
			return done, err
		}
		host, ok, err := img.inPlace(ci, word, bitmap, in, int64(n), true)
		if err != nil {
			if ferr := flush(); ferr != nil {
				return runAt, ferr
			}
			return done, img.fail(err)
		}
		if !ok {
			break
		}
		if runLen > 0 && runHost+int64(runLen) != host+in {
			if err := flush(); err != nil {
				return runAt, err
			}
		}
		if runLen == 0 {
			runHost, runAt = host+in, done
		}
		runLen += n
		done += n
	}
	if err := flush(); err != nil {
		return runAt, err
	}
	return done, nil
}

// inPlace reports whether [in, in+n) of guest cluster ci, whose L2 entry
// is word and bitmap, can be written in place, and the cluster's host
// offset. An entry that claims so but points into metadata or past the
// allocated end of the file is corruption. shared tells that the caller
// does not hold w.mu (metaMu is then taken to read the metadata set).
func (img *Image) inPlace(ci, word, bitmap uint64, in, n int64, shared bool) (int64, bool, error) {
	g := &img.geo
	e, bad := g.decodeL2(word, bitmap)
	if bad != "" {
		return 0, false, img.corrupt(-1, fmt.Sprintf("L2 entry of guest cluster %d: %s", ci, bad))
	}
	if e.kind != kindNormal || (word&entryCopied == 0 && !g.dataFile) {
		return 0, false, nil
	}
	if g.extended {
		scb := g.subclusterBits()
		for sc := in >> scb; sc <= (in+n-1)>>scb; sc++ {
			if e.bitmap>>sc&1 == 0 {
				return 0, false, nil
			}
		}
	}
	host := int64(e.host)
	if err := img.checkDataCluster(ci, host, shared); err != nil {
		return 0, false, err
	}
	return host, true, nil
}

// checkDataCluster refuses a data cluster at host offset host that lies
// past the allocated end of the image file or overlaps its metadata
// (QEMU's "metadata overlap" check). shared: the caller does not hold
// w.mu.
func (img *Image) checkDataCluster(ci uint64, host int64, shared bool) error {
	if img.geo.dataFile {
		return nil // the data file holds no metadata
	}
	w := img.w
	cs := img.geo.clusterSize()
	if host+cs > w.end.Load() {
		return img.corrupt(-1, fmt.Sprintf("guest cluster %d maps to host offset %#x, past the end of the image's clusters (%#x)", ci, host, w.end.Load()))
	}
	if shared {
		w.metaMu.RLock()
		defer w.metaMu.RUnlock()
	}
	if w.alloc.isMeta(host, cs) {
		return img.corrupt(-1, fmt.Sprintf("guest cluster %d maps to host offset %#x, which holds metadata", ci, host))
	}
	return nil
}

// writeAlloc writes a prefix of p at guest offset pos, at least the part
// in pos's cluster, under the allocation mutex. It returns how many bytes
// of p it wrote.
func (img *Image) writeAlloc(p []byte, pos int64) (int, error) {
	w := img.w
	w.mu.Lock()
	defer w.mu.Unlock()
	if err := w.failed.Load(); err != nil {
		return 0, fmt.Errorf("qcow2: write: the image's write side stopped: %w", *err)
	}
	n, changed, err := img.writeAllocLocked(p, pos)
	w.end.Store(w.alloc.end)
	if err != nil {
		if changed {
			return n, img.fail(err)
		}
		return n, err
	}
	return n, img.limitDirty()
}

// oldCluster is a guest cluster about to be given a new host cluster.
type oldCluster struct {
	word, bitmap uint64
	e            l2Entry
}

// writeAllocLocked is writeAlloc under w.mu; changed reports whether it
// changed anything (an error then stops the write side).
func (img *Image) writeAllocLocked(p []byte, pos int64) (_ int, changed bool, _ error) {
	w := img.w
	g := &img.geo
	cb := g.clusterBits
	cs := g.clusterSize()
	ci0 := uint64(pos) >> cb
	in0 := pos - int64(ci0)<<cb
	word, bitmap, err := img.entry(ci0)
	if err != nil {
		return 0, false, err
	}
	n0 := min(cs-in0, int64(len(p)))
	if host, ok, err := img.inPlace(ci0, word, bitmap, in0, n0, false); err != nil {
		return 0, true, err
	} else if ok {
		// Made writable by another write while this one waited.
		if _, err := img.data.WriteAt(p[:n0], host+in0); err != nil {
			return 0, false, fmt.Errorf("qcow2: writing data at %#x: %w", host+in0, err)
		}
		return int(n0), false, nil
	}
	e, _ := g.decodeL2(word, bitmap) // inPlace validated it
	if (e.kind == kindNormal || e.kind == kindZeroAlloc) && (word&entryCopied != 0 || g.dataFile) {
		// The host cluster stays: a preallocated zero cluster, or (with
		// extended L2 entries) unallocated or zero subclusters of an
		// allocated cluster.
		n, err := img.fillInPlace(p[:n0], pos, word, e)
		return n, true, err
	}
	// A run of clusters of one L2 slice that all need a new cluster.
	perSlice := uint64(img.cache.sliceSize / g.entryBytes())
	end := pos + int64(len(p))
	maxRun := uint64(max(1, maxRunBytes/cs))
	old := []oldCluster{{word, bitmap, e}}
	for ci := ci0 + 1; ci%perSlice != 0 && int64(ci)<<cb < end && uint64(len(old)) < maxRun; ci++ {
		word, bitmap, err := img.entry(ci)
		if err != nil {
			return 0, false, err
		}
		e, bad := g.decodeL2(word, bitmap)
		if bad != "" {
			return 0, true, img.corrupt(-1, fmt.Sprintf("L2 entry of guest cluster %d: %s", ci, bad))
		}
		if (e.kind == kindNormal || e.kind == kindZeroAlloc) && (word&entryCopied != 0 || g.dataFile) {
			break
		}
		old = append(old, oldCluster{word, bitmap, e})
	}
	if !g.dataFile {
		for j, o := range old {
			if err := img.checkOld(ci0+uint64(j), o.e); err != nil {
				return 0, true, err
			}
		}
	}
	k := int64(len(old))
	groupStart := int64(ci0) << cb
	n := min(int64(len(p)), groupStart+k*cs-pos)
	// Host clusters.
	hosts := make([]int64, k)
	fresh := make([]bool, k)
	if g.dataFile {
		for j := range hosts {
			hosts[j] = groupStart + int64(j)*cs
		}
	} else {
		if hosts, fresh, err = w.alloc.takeRun(int(k)); err != nil {
			return 0, true, err
		}
		w.end.Store(w.alloc.end)
	}
	// Data: whole clusters straight from p, partial ones through a
	// buffer filled with the current content.
	words := make([]uint64, k)
	var bitmaps []uint64
	if g.extended {
		bitmaps = make([]uint64, k)
	}
	type piece struct {
		host  int64
		b     []byte
		fromP bool // b is part of p
	}
	var pieces []piece
	var bufs []*[]byte // from img.clusterPool, returned when written
	defer func() {
		for _, b := range bufs {
			img.clusterPool.Put(b)
		}
	}()
	for j := range k {
		cStart := groupStart + j*cs
		a, b := max(pos, cStart), min(pos+n, cStart+cs) // the part p covers
		move := old[j].e.kind == kindNormal || old[j].e.kind == kindCompressed
		var mask uint32
		if g.extended {
			scb := g.subclusterBits()
			mask = subclusterMask(uint(a-cStart)>>scb, uint(b-1-cStart)>>scb)
			switch old[j].e.kind {
			case kindCompressed:
				mask = ^uint32(0)
			case kindNormal:
				mask |= uint32(old[j].bitmap)
			}
		}
		switch {
		case a == cStart && b == cStart+cs:
			pieces = append(pieces, piece{hosts[j], p[a-pos : b-pos], true})
		case fresh[j] && img.readsZero(old[j], cStart):
			// The new cluster reads as zeros already: write only p's
			// part of it.
			pieces = append(pieces, piece{hosts[j] + a - cStart, p[a-pos : b-pos], false})
		default:
			bp := img.clusterPool.Get().(*[]byte)
			bufs = append(bufs, bp)
			buf := *bp
			lo, hi := int64(0), cs // what to fill from the current content
			if g.extended && !move {
				scs := int64(1) << g.subclusterBits()
				lo = (a - cStart) &^ (scs - 1)
				hi = alignUp(b-cStart, scs)
				// Subclusters outside [lo, hi) stay unallocated: they
				// are written as zeros, not as a pooled buffer's
				// leftovers.
				clear(buf[:lo])
				clear(buf[hi:])
			}
			if lo < a-cStart {
				if err := img.readOld(buf[lo:a-cStart], cStart+lo); err != nil {
					return 0, true, err
				}
			}
			if b-cStart < hi {
				if err := img.readOld(buf[b-cStart:hi], b); err != nil {
					return 0, true, err
				}
			}
			copy(buf[a-cStart:], p[a-pos:b-pos])
			pieces = append(pieces, piece{hosts[j], buf, false})
		}
		words[j] = uint64(hosts[j]) | entryCopied
		if g.extended {
			zero := uint32(old[j].bitmap>>32) &^ mask
			if old[j].e.kind == kindCompressed {
				zero = 0
			}
			bitmaps[j] = uint64(zero)<<32 | uint64(mask)
		}
	}
	for i := 0; i < len(pieces); {
		// Whole clusters of p contiguous on the host are written at once.
		j := i + 1
		for pieces[i].fromP && j < len(pieces) && pieces[j].fromP && pieces[j].host == pieces[j-1].host+cs {
			j++
		}
		for m := i; m < j; m++ {
			if err := img.checkDataCluster(ci0+uint64(m), hosts[m], false); err != nil {
				return 0, true, err
			}
		}
		b := pieces[i].b
		if j > i+1 {
			start := groupStart + int64(i)*cs - pos
			b = p[start : start+int64(j-i)*cs]
		}
		if _, err := img.data.WriteAt(b, pieces[i].host); err != nil {
			// No table points at the new clusters yet: they only leak,
			// and the write side can go on.
			return 0, false, fmt.Errorf("qcow2: writing data at %#x: %w", pieces[i].host, err)
		}
		img.startWriteback(pieces[i].host, int64(len(b)))
		i = j
	}
	if err := img.setEntries(ci0, words, bitmaps); err != nil {
		return 0, true, err
	}
	if !g.dataFile {
		for _, o := range old {
			img.queueFree(o.e, cs, false)
		}
	}
	return int(n), true, nil
}

// readsZero reports whether the whole guest cluster at cStart, mapped by
// o, reads as zeros.
func (img *Image) readsZero(o oldCluster, cStart int64) bool {
	noBacking := img.backing == nil || cStart >= img.backingSize
	if img.geo.extended {
		return o.e.kind != kindCompressed && o.e.host == 0 && (noBacking || uint32(o.bitmap>>32) == ^uint32(0))
	}
	switch o.e.kind {
	case kindZero, kindZeroAlloc:
		return true
	case kindUnallocated:
		return noBacking
	}
	return false
}

// checkOld refuses to release the host cluster of entry e (guest cluster
// ci) when it overlaps metadata: the entry is corrupt, and releasing it
// would free a table.
func (img *Image) checkOld(ci uint64, e l2Entry) error {
	n := img.geo.clusterSize()
	switch e.kind {
	case kindCompressed:
		n = e.csize
	case kindNormal, kindZeroAlloc:
	default:
		return nil
	}
	if img.w.alloc.isMeta(int64(e.host), n) {
		return img.corrupt(-1, fmt.Sprintf("guest cluster %d maps to host offset %#x, which holds metadata", ci, e.host))
	}
	return nil
}

// queueFree queues the release of the host cluster (or compressed data)
// of entry e once the table change that dropped it is durable.
func (img *Image) queueFree(e l2Entry, cs int64, punch bool) {
	w := img.w
	switch e.kind {
	case kindCompressed:
		w.pendingFree = append(w.pendingFree, pendingFree{off: int64(e.host), n: e.csize, punch: punch})
	case kindNormal, kindZeroAlloc:
		w.pendingFree = append(w.pendingFree, pendingFree{off: int64(e.host), n: cs, punch: punch})
	}
}

// subclusterMask returns the bits of subclusters first to last.
func subclusterMask(first, last uint) uint32 {
	return uint32((uint64(1)<<(last+1) - 1) &^ (uint64(1)<<first - 1))
}

// fillInPlace writes p (inside one guest cluster, at guest offset pos)
// into the cluster's existing host cluster when the entry (word, e) is a
// preallocated zero cluster, or has unallocated or zero subclusters where
// p goes: the partial units at p's ends are filled with the current
// content, and the entry is updated to show the data. Under w.mu.
func (img *Image) fillInPlace(p []byte, pos int64, word uint64, e l2Entry) (int, error) {
	g := &img.geo
	cb := g.clusterBits
	ci := uint64(pos) >> cb
	cStart := int64(ci) << cb
	host := int64(e.host)
	if err := img.checkDataCluster(ci, host, false); err != nil {
		return 0, err
	}
	a, b := pos-cStart, pos-cStart+int64(len(p))
	unit := g.clusterSize()
	if g.extended {
		unit = int64(1) << g.subclusterBits()
	}
	lo, hi := a&^(unit-1), alignUp(b, unit)
	bp := img.clusterPool.Get().(*[]byte)
	defer img.clusterPool.Put(bp)
	buf := (*bp)[:hi-lo]
	if lo < a {
		if err := img.readOld(buf[:a-lo], cStart+lo); err != nil {
			return 0, err
		}
	}
	if b < hi {
		if err := img.readOld(buf[b-lo:], cStart+b); err != nil {
			return 0, err
		}
	}
	copy(buf[a-lo:], p)
	if _, err := img.data.WriteAt(buf, host+lo); err != nil {
		return 0, fmt.Errorf("qcow2: writing data at %#x: %w", host+lo, err)
	}
	newWord := uint64(host) | entryCopied
	var bitmaps []uint64
	if g.extended {
		scb := g.subclusterBits()
		mask := subclusterMask(uint(lo>>scb), uint((hi-1)>>scb))
		alloc := uint32(e.bitmap) | mask
		zero := uint32(e.bitmap>>32) &^ mask
		bitmaps = []uint64{uint64(zero)<<32 | uint64(alloc)}
		newWord = word &^ entryZero
	}
	if err := img.setEntries(ci, []uint64{newWord}, bitmaps); err != nil {
		return 0, err
	}
	return len(p), nil
}

// writebackMin is the smallest data write after which the host file is
// asked to start writing it back (see disk.WritebackStarter): large
// writes then reach the disk while more are made, and Flush waits less.
const writebackMin = 512 << 10

// startWriteback starts the write-back of a large data write.
func (img *Image) startWriteback(off, n int64) {
	if n < writebackMin {
		return
	}
	if ws, ok := img.data.(disk.WritebackStarter); ok {
		ws.StartWriteback(off, n)
	}
}

// readOld fills buf with the current content of the guest disk at off;
// the part past the end of the disk reads as zeros.
func (img *Image) readOld(buf []byte, off int64) error {
	n := max(0, min(int64(len(buf)), img.size.Load()-off))
	clear(buf[n:])
	if n == 0 {
		return nil
	}
	if _, err := img.readAt(buf[:n], off); err != nil {
		return fmt.Errorf("qcow2: reading guest offset %#x to copy it: %w", off, err)
	}
	return nil
}
