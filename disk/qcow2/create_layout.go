package qcow2

import (
	"fmt"

	"github.com/imgloop/imgloop/disk"
)

// createLayout places every cluster of a new image. Every cluster below
// total is in use with refcount 1; no other cluster is.
type createLayout struct {
	cs          int64
	refsInBlock int64   // refcount entries per refcount block
	rtOff       int64   // refcount table
	rtClusters  int64   // its length in clusters
	rbOffs      []int64 // refcount blocks, by index in the refcount table
	l1Off       int64   // 0 when l1Size is 0
	l1Size      int64
	l2Offs      []int64   // preallocation: L2 table i
	data        []dataRun // preallocation without a data file: where guest clusters live
	// dataStart and dataEnd bound the data clusters (falloc and full
	// preallocation write or allocate them).
	dataStart, dataEnd int64
	total              int64 // clusters in use
	fileSize           int64
}

// dataRun maps n guest clusters from guest cluster index guest to
// consecutive host clusters from byte offset host.
type dataRun struct {
	guest, host, n int64
}

// layout computes where everything goes, as QEMU places it where that is
// simple to follow (see layoutPlain, layoutMetadata, layoutFull).
func (p *createParams) layout() (*createLayout, error) {
	var l *createLayout
	var ok bool
	switch {
	case p.prealloc == disk.PreallocOff || p.virtualSize() == 0:
	case p.dataFile == "" && (p.prealloc == disk.PreallocFalloc || p.prealloc == disk.PreallocFull):
		l, ok = p.layoutFull(), true
	default:
		l, ok = p.layoutMetadata()
	}
	if !ok {
		l = p.layoutPlain()
	}
	if l.rtClusters*l.cs > maxRefcountTableBytes {
		return nil, optErr("the image size is too large for file format 'qcow2' (refcount table of %d bytes)", l.rtClusters*l.cs)
	}
	if err := l.verify(p); err != nil {
		return nil, err
	}
	return l, nil
}

// base returns the layout's fixed part, as QEMU's creation writes it
// before growing the image: header, refcount table (cluster 1), first
// refcount block (cluster 2), L1 table (from cluster 3). It returns the
// first free cluster.
func (p *createParams) base() (*createLayout, int64) {
	cs := int64(1) << p.clusterBits
	l := &createLayout{cs: cs, l1Size: p.l1Size(), rtOff: cs, rtClusters: 1}
	l.refsInBlock = cs * 8 >> p.refcountOrder
	l.rbOffs = []int64{2 * cs}
	next := int64(3)
	if l.l1Size > 0 {
		l.l1Off = next * cs
		next += (l.l1Size*8 + cs - 1) / cs
	}
	return l, next
}

// fixRefcounts returns how many refcount blocks and refcount table
// clusters cover n clusters in use besides them (the first counted
// blocks are in n): the smallest counts that also cover the blocks and
// the table themselves.
func fixRefcounts(n, counted, cs, refsInBlock int64) (blocks, table int64) {
	blocks, table = 1, 1
	for {
		total := n + blocks + table - counted
		nb := (total + refsInBlock - 1) / refsInBlock
		nt := (nb*8 + cs - 1) / cs
		if nb <= blocks && nt <= table {
			return blocks, table
		}
		blocks, table = max(blocks, nb), max(table, nt)
	}
}

// layoutPlain places, in order: header, refcount table, first refcount
// block, L1 table, then with preallocation each L2 table followed by the
// data clusters it maps, then the further refcount blocks. Without
// preallocation this is QEMU's layout, big L1 tables included; with it,
// it is the fallback for shapes whose QEMU layout is not followed.
func (p *createParams) layoutPlain() *createLayout {
	cs := int64(1) << p.clusterBits
	l, _ := p.base()
	l1Clusters := (l.l1Size*8 + cs - 1) / cs
	var nL2, perL2, nData int64
	prealloc := p.prealloc != disk.PreallocOff && p.virtualSize() > 0
	if prealloc {
		nL2 = l.l1Size
		if p.dataFile == "" {
			perL2 = p.l2Entries()
			nData = (p.virtualSize() + cs - 1) / cs
		}
	}
	// Header, table (counted by fixRefcounts), L1, L2 tables and data.
	rb, rt := fixRefcounts(1+l1Clusters+nL2+nData, 0, cs, l.refsInBlock)
	l.rtClusters = rt
	l.rbOffs = []int64{(1 + rt) * cs}
	next := 2 + rt
	if l.l1Size > 0 {
		l.l1Off = next * cs
		next += l1Clusters
	}
	if prealloc {
		l.dataStart = next * cs
		for i := int64(0); i < nL2; i++ {
			l.l2Offs = append(l.l2Offs, next*cs)
			next++
			if p.dataFile == "" {
				g := i * perL2
				n := min(perL2, nData-g)
				l.data = append(l.data, dataRun{guest: g, host: next * cs, n: n})
				next += n
			}
		}
		l.dataEnd = next * cs
	}
	for i := int64(1); i < rb; i++ {
		l.rbOffs = append(l.rbOffs, next*cs)
		next++
	}
	l.total = next
	l.fileSize = next * cs
	if !prealloc && rb == 1 && l.l1Size > 0 {
		// QEMU's file ends with the L1 table's last entry.
		l.fileSize = l.l1Off + l.l1Size*8
	}
	return l
}

// layoutMetadata follows QEMU's metadata preallocation: from the first
// free cluster after the base layout, each L2 table is allocated, then
// the data clusters it maps; a cluster past the refcount blocks' reach
// gets a new refcount block in the next free cluster. It reports false
// (use layoutPlain) where QEMU would move the refcount table or place a
// refcount block outside the range it covers.
func (p *createParams) layoutMetadata() (*createLayout, bool) {
	l, next := p.base()
	if next > l.refsInBlock {
		return nil, false
	}
	cs := l.cs
	maxBlocks := cs / 8              // one refcount table cluster
	cover := func(a, b int64) bool { // clusters [a, b) were just allocated
		for k := a / l.refsInBlock; k <= (b-1)/l.refsInBlock; k++ {
			if k < int64(len(l.rbOffs)) {
				continue
			}
			if k != int64(len(l.rbOffs)) || k >= maxBlocks || next/l.refsInBlock != k {
				return false
			}
			l.rbOffs = append(l.rbOffs, next*cs)
			next++
		}
		return true
	}
	alloc := func(n int64) (int64, bool) {
		s := next
		next += n
		return s, cover(s, s+n)
	}
	entries := p.l2Entries()
	clusters := (p.virtualSize() + cs - 1) / cs
	l.dataStart = next * cs
	for i := int64(0); i < l.l1Size; i++ {
		s, ok := alloc(1)
		if !ok {
			return nil, false
		}
		l.l2Offs = append(l.l2Offs, s*cs)
		if p.dataFile != "" {
			continue
		}
		g := i * entries
		n := min(entries, clusters-g)
		s, ok = alloc(n)
		if !ok {
			return nil, false
		}
		l.data = append(l.data, dataRun{guest: g, host: s * cs, n: n})
	}
	l.dataEnd = next * cs
	l.total = next
	l.fileSize = next * cs
	return l, true
}

// layoutFull follows QEMU's falloc and full preallocation, which grows
// the base image in one step: new refcount blocks, then a new refcount
// table, then all data clusters, in one run after the L1 table. The old
// refcount table's cluster 1 is freed and reused for the first L2 table;
// the other L2 tables follow the data.
func (p *createParams) layoutFull() *createLayout {
	l, next := p.base()
	cs := l.cs
	nData := (p.virtualSize() + cs - 1) / cs
	nL2 := l.l1Size
	// In use besides the new blocks and table: the base (with cluster 1
	// and the first block), data, L2 tables but the first.
	rb, rt := fixRefcounts(next+nData+nL2-1, 1, cs, l.refsInBlock)
	for i := int64(1); i < rb; i++ {
		l.rbOffs = append(l.rbOffs, next*cs)
		next++
	}
	l.rtOff, l.rtClusters = next*cs, rt
	next += rt
	l.dataStart = next * cs
	l.data = []dataRun{{guest: 0, host: next * cs, n: nData}}
	next += nData
	l.dataEnd = next * cs
	l.l2Offs = append(l.l2Offs, cs)
	for i := int64(1); i < nL2; i++ {
		l.l2Offs = append(l.l2Offs, next*cs)
		next++
	}
	l.total = next
	l.fileSize = next * cs
	return l
}

// verify checks the invariants every layout must meet: the refcount
// blocks cover every cluster in use, themselves included, and the table
// lists them all.
func (l *createLayout) verify(p *createParams) error {
	nb := int64(len(l.rbOffs))
	switch {
	case nb*l.refsInBlock < l.total:
		return fmt.Errorf("qcow2: internal error: %d refcount blocks cover %d of %d clusters", nb, nb*l.refsInBlock, l.total)
	case nb*8 > l.rtClusters*l.cs:
		return fmt.Errorf("qcow2: internal error: %d refcount blocks overflow a table of %d clusters", nb, l.rtClusters)
	case l.fileSize > l.total*l.cs || l.fileSize <= (l.total-1)*l.cs:
		return fmt.Errorf("qcow2: internal error: file of %d bytes for %d clusters", l.fileSize, l.total)
	}
	return nil
}
