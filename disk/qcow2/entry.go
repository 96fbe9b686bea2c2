package qcow2

import "fmt"

// L1 and L2 table entries (docs/interop/qcow2.txt, "Cluster mapping" and
// "Extended L2 Entries").

const (
	// entryCopied is bit 63 of L1 and standard L2 entries: the refcount
	// is exactly one ("QCOW_OFLAG_COPIED").
	entryCopied = uint64(1) << 63
	// entryCompressed is bit 62 of an L2 entry: a compressed cluster.
	entryCompressed = uint64(1) << 62
	// entryZero is bit 0 of a standard cluster descriptor (version 3
	// without extended L2 entries): the cluster reads as zeros.
	entryZero = uint64(1)

	// offsetMask selects bits 9-55: the host offset of an L2 table (in an
	// L1 entry) or of a data cluster (in a standard L2 entry).
	offsetMask = uint64(0x00fffffffffffe00)
	// l1ReservedMask: bits 0-8 and 56-62 of an L1 entry must be zero.
	l1ReservedMask = uint64(0x7f000000000001ff)
	// l2ReservedMask: bits 1-8 and 56-61 of a standard cluster
	// descriptor must be zero.
	l2ReservedMask = uint64(0x3f000000000001fe)

	// subclustersPerCluster is the number of subclusters of a standard
	// cluster in an image with extended L2 entries.
	subclustersPerCluster = 32
	// bitmapAllocMask selects the allocation bits (0-31) of a subcluster
	// allocation bitmap; the zero bits are the next 32.
	bitmapAllocMask = uint64(0xffffffff)
)

// clusterKind is how a guest cluster (or subcluster) is stored.
type clusterKind uint8

const (
	// kindUnallocated: not defined by this image; reads go to the backing
	// file, or return zeros without one.
	kindUnallocated clusterKind = iota
	// kindZero: reads as zeros, no host cluster ("zero plain").
	kindZero
	// kindZeroAlloc: reads as zeros, with a preallocated host cluster.
	kindZeroAlloc
	// kindNormal: data stored uncompressed in a host cluster.
	kindNormal
	// kindCompressed: data stored compressed.
	kindCompressed
)

// String returns the name `imgloop map --offset` prints.
func (k clusterKind) String() string {
	switch k {
	case kindUnallocated:
		return "unallocated"
	case kindZero, kindZeroAlloc:
		return "zero"
	case kindNormal:
		return "normal"
	case kindCompressed:
		return "compressed"
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// geometry is what decoding a table entry needs to know about the image.
type geometry struct {
	clusterBits uint   // cluster_bits
	version     uint32 // 2 or 3
	extended    bool   // extended L2 entries (incompatible bit 4)
	dataFile    bool   // external data file (incompatible bit 2)
	fileSize    int64  // size of the image file
	dataSize    int64  // size of the file data clusters live in
}

func (g *geometry) clusterSize() int64 { return 1 << g.clusterBits }

// entryBytes is the size of one L2 entry: 8, or 16 with extended L2.
func (g *geometry) entryBytes() int {
	if g.extended {
		return 16
	}
	return 8
}

// l2Bits is log2 of the number of entries in an L2 table.
func (g *geometry) l2Bits() uint {
	if g.extended {
		return g.clusterBits - 4
	}
	return g.clusterBits - 3
}

// subclusterBits is log2 of the unit an L2 entry allocates: the
// subcluster size with extended L2 entries, else the cluster size.
func (g *geometry) subclusterBits() uint {
	if g.extended {
		return g.clusterBits - 5
	}
	return g.clusterBits
}

// decodeL1 returns the L2 table offset of an L1 entry (0 if the whole L2
// table is unallocated), or a description of what is wrong with it.
func (g *geometry) decodeL1(e uint64) (uint64, string) {
	if e&l1ReservedMask != 0 {
		return 0, fmt.Sprintf("L1 entry %#016x has reserved bits set", e)
	}
	off := e & offsetMask
	if off == 0 {
		return 0, ""
	}
	if off&uint64(g.clusterSize()-1) != 0 {
		return 0, fmt.Sprintf("L2 table offset %#x is not cluster aligned", off)
	}
	if off > uint64(g.fileSize) || uint64(g.fileSize)-off < uint64(g.clusterSize()) {
		return 0, fmt.Sprintf("L2 table at %#x lies past the end of the file (size %#x)", off, g.fileSize)
	}
	return off, ""
}

// l2Entry is a decoded L2 entry.
type l2Entry struct {
	kind clusterKind // the cluster's kind; see sub for extended entries
	// host is the host cluster offset (kindNormal, kindZeroAlloc, and
	// kindNormal clusters with unallocated subclusters), or the byte
	// offset of the compressed data (kindCompressed).
	host uint64
	// csize is the number of compressed bytes the descriptor spans, from
	// host to the end of its last sector (kindCompressed).
	csize int64
	// bitmap is the subcluster allocation bitmap (extended L2 only).
	bitmap uint64
}

// decodeL2 decodes and validates the L2 entry word (and, with extended L2
// entries, its bitmap). It returns a description of what is wrong, or "".
func (g *geometry) decodeL2(word, bitmap uint64) (l2Entry, string) {
	if word&entryCompressed != 0 {
		return g.decodeCompressed(word, bitmap)
	}
	if word&l2ReservedMask != 0 {
		return l2Entry{}, fmt.Sprintf("L2 entry %#016x has reserved bits set", word)
	}
	host := word & offsetMask
	zero := word&entryZero != 0
	if zero && (g.version < 3 || g.extended) {
		return l2Entry{}, fmt.Sprintf("L2 entry %#016x sets the zero flag, which this image version does not have", word)
	}
	e := l2Entry{host: host, bitmap: bitmap}
	allocated := host != 0 || (g.dataFile && word&entryCopied != 0)
	if host == 0 && word&entryCopied != 0 && !g.dataFile {
		return l2Entry{}, fmt.Sprintf("L2 entry %#016x has host offset 0", word)
	}
	if allocated && host&uint64(g.clusterSize()-1) != 0 {
		return l2Entry{}, fmt.Sprintf("data cluster offset %#x is not cluster aligned", host)
	}
	switch {
	case zero && allocated:
		e.kind = kindZeroAlloc
	case zero:
		e.kind = kindZero
	case allocated:
		e.kind = kindNormal
	default:
		e.kind = kindUnallocated
	}
	if g.extended {
		if bitmap>>32&bitmap != 0 {
			return l2Entry{}, fmt.Sprintf("subcluster bitmap %#016x marks subclusters both allocated and zero", bitmap)
		}
		if !allocated && bitmap&bitmapAllocMask != 0 {
			return l2Entry{}, fmt.Sprintf("subcluster bitmap %#016x allocates subclusters of an unallocated cluster", bitmap)
		}
	}
	// A normal cluster's data must start inside the file that holds it;
	// zero clusters are never read, so their preallocation is not checked.
	if e.kind == kindNormal && (!g.extended || bitmap&bitmapAllocMask != 0) && host >= uint64(g.dataSize) {
		return l2Entry{}, fmt.Sprintf("data cluster at %#x lies past the end of the file (size %#x)", host, g.dataSize)
	}
	return e, ""
}

// decodeCompressed decodes a compressed cluster descriptor
// (x = 62 - (cluster_bits - 8)).
func (g *geometry) decodeCompressed(word, bitmap uint64) (l2Entry, string) {
	if g.dataFile {
		return l2Entry{}, fmt.Sprintf("compressed L2 entry %#016x in an image with an external data file", word)
	}
	if word&entryCopied != 0 {
		return l2Entry{}, fmt.Sprintf("compressed L2 entry %#016x has the copied flag set", word)
	}
	if g.extended && bitmap != 0 {
		return l2Entry{}, fmt.Sprintf("compressed L2 entry has a non-zero subcluster bitmap %#016x", bitmap)
	}
	x := 62 - (g.clusterBits - 8)
	off := word & (uint64(1)<<x - 1)
	if off&^(uint64(1)<<56-1) != 0 {
		return l2Entry{}, fmt.Sprintf("compressed L2 entry %#016x has offset bits above 55 set", word)
	}
	sectors := (word>>x)&(uint64(1)<<(g.clusterBits-8)-1) + 1
	if off == 0 || off >= uint64(g.fileSize) {
		return l2Entry{}, fmt.Sprintf("compressed cluster at %#x lies outside the file (size %#x)", off, g.fileSize)
	}
	csize := int64(sectors)*512 - int64(off&511)
	return l2Entry{kind: kindCompressed, host: off, csize: csize}, ""
}

// subcluster returns the kind of subcluster sc of the entry and how many
// consecutive subclusters from sc (up to the end of the cluster) share it.
// Without extended L2 entries a cluster is one subcluster.
func (g *geometry) subcluster(e l2Entry, sc uint) (clusterKind, uint) {
	if !g.extended || e.kind == kindCompressed {
		return e.kind, subclustersPerClusterOf(g) - sc
	}
	alloc := uint32(e.bitmap)
	zero := uint32(e.bitmap >> 32)
	var kind clusterKind
	var same uint32 // bit i set: subcluster i has kind
	switch {
	case zero>>sc&1 != 0:
		if e.kind == kindNormal {
			kind = kindZeroAlloc
		} else {
			kind = kindZero
		}
		same = zero
	case alloc>>sc&1 != 0:
		kind, same = kindNormal, alloc
	default:
		kind, same = kindUnallocated, ^(alloc | zero)
	}
	n := uint(0)
	for i := sc; i < subclustersPerCluster && same>>i&1 != 0; i++ {
		n++
	}
	return kind, n
}

func subclustersPerClusterOf(g *geometry) uint {
	if g.extended {
		return subclustersPerCluster
	}
	return 1
}
