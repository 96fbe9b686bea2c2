package qcow2

import (
	"encoding/binary"
	"fmt"
	"sync"

	"github.com/klauspost/compress/flate"
	"github.com/klauspost/compress/zstd"

	"github.com/imgloop/imgloop/disk"
)

// Streaming writer: a new image written front to back in one pass, for
// conversions. Data clusters are appended from cluster 1 in guest order;
// each L2 table is appended once the guest clusters it maps are all
// written; Close appends the L1 table, the refcount blocks and the
// refcount table, and writes the header (with the backing file name and
// format, if any) into cluster 0 last.

// streamBufSize is the size of the write buffer: appended bytes are
// written to the file in runs of this size.
const streamBufSize = 4 << 20

// deflateWindow is the window QEMU inflates zlib-type clusters with
// (windowBits -12): a stream may not refer further back than this.
const deflateWindow = 4096

// StreamWriter writes a new qcow2 image in one pass: the guest clusters
// that hold data, in increasing order, then the metadata on Close. Guest
// clusters never written stay unallocated: they read as zeros, or through
// the backing file when the image has one. It is not safe for concurrent
// use, except Compress.
type StreamWriter struct {
	f      disk.File
	p      *createParams
	cs     int64
	maxRef uint64 // largest refcount an entry holds

	buf    []byte // pending bytes, to be written at bufOff
	bufOff int64
	pos    int64 // end of the data appended so far (file offset)

	next  int64    // lowest guest cluster index WriteCluster accepts
	l1    []uint64 // L1 entries
	l2    []byte   // current L2 table, for guest clusters of l2Idx
	l2Idx int64    // index of the L1 entry l2 belongs to; -1: none
	l2Set bool     // l2 has an entry

	// Refcounts: every host cluster below pos (rounded up) has refcount
	// 1 except those listed in shared (compressed clusters sharing a
	// host cluster), in increasing cluster order.
	shared   []sharedRef
	lastHost int64  // host cluster of the latest compressed data, -1: none
	lastRefs uint64 // its refcount so far

	closed bool
	err    error // sticky: the first write error
}

// sharedRef is a host cluster with a refcount above 1.
type sharedRef struct {
	cluster int64
	refs    uint64
}

// streamUnsupported lists the creation options a StreamWriter refuses.
var streamUnsupported = []string{"data_file", "data_file_raw"}

// NewStreamWriter starts a qcow2 image of size bytes (rounded up to 512)
// in f, which must be empty (new or truncated). opts are qemu-img's
// creation options (see Driver.Create); external data files and
// preallocation other than off are not supported. A backing file
// (backing_file) needs its format (backing_fmt), as qemu-img convert
// wants; the writer stores both in the header but does not open the
// backing file: the caller checks that it exists and has that format.
func NewStreamWriter(f disk.File, size int64, opts map[string]string) (*StreamWriter, error) {
	p, err := streamParams(size, opts)
	if err != nil {
		return nil, err
	}
	cs := int64(1) << p.clusterBits
	w := &StreamWriter{
		f:        f,
		p:        p,
		cs:       cs,
		maxRef:   uint64(1)<<(uint64(1)<<p.refcountOrder) - 1,
		pos:      cs,
		bufOff:   cs,
		l1:       make([]uint64, p.l1Size()),
		l2:       make([]byte, cs),
		l2Idx:    -1,
		lastHost: -1,
	}
	if p.refcountOrder == 6 {
		w.maxRef = ^uint64(0)
	}
	return w, nil
}

// CheckStreamOptions reports the error NewStreamWriter would return for
// an image of size bytes with the creation options opts, without a file:
// callers check the options before creating (and truncating) the file.
func CheckStreamOptions(size int64, opts map[string]string) error {
	_, err := streamParams(size, opts)
	return err
}

// streamParams parses and checks the creation options of a StreamWriter.
func streamParams(size int64, opts map[string]string) (*createParams, error) {
	p, err := parseCreateOptions(opts)
	if err != nil {
		return nil, err
	}
	for _, k := range streamUnsupported {
		if _, ok := opts[k]; ok {
			return nil, &disk.UnsupportedError{Format: formatName, Feature: "option " + k + " when converting"}
		}
	}
	switch {
	case p.backingFile == "" && p.backingFmt != "":
		return nil, optErr("backing_fmt %q given without a backing file", p.backingFmt)
	case p.backingFile != "" && p.backingFmt == "":
		return nil, optErr("use of a backing file requires an explicit backing format (backing_fmt)")
	}
	if size < 0 || size > disk.MaxCreateSize {
		return nil, optErr("image size %d out of range", size)
	}
	p.size = size
	if err := p.check(); err != nil {
		return nil, err
	}
	if p.prealloc != disk.PreallocOff {
		return nil, &disk.UnsupportedError{Format: formatName, Feature: "preallocation=" + p.prealloc + " when converting"}
	}
	// Check now that the header fits in a cluster.
	cs := int64(1) << p.clusterBits
	if _, err := p.encodeHeader(&createLayout{cs: cs, l1Size: p.l1Size()}); err != nil {
		return nil, err
	}
	return p, nil
}

// ClusterSize returns the image's cluster size: WriteCluster takes
// clusters of this many bytes.
func (w *StreamWriter) ClusterSize() int { return int(w.cs) }

// Clusters returns the number of guest clusters of the disk.
func (w *StreamWriter) Clusters() int64 { return (w.p.virtualSize() + w.cs - 1) / w.cs }

// checkIndex checks that guest cluster index may be written next.
func (w *StreamWriter) checkIndex(index int64) error {
	switch {
	case w.closed:
		return fmt.Errorf("qcow2: stream writer: %w", disk.ErrClosed)
	case w.err != nil:
		return w.err
	case index < w.next:
		return fmt.Errorf("qcow2: stream writer: cluster %d written out of order (next is %d)", index, w.next)
	case index >= w.Clusters():
		return fmt.Errorf("qcow2: stream writer: cluster %d: %w (disk of %d clusters)", index, disk.ErrOutOfRange, w.Clusters())
	}
	return nil
}

// WriteCluster stores guest cluster index, data (one cluster), in a new
// host cluster. Indexes must increase from call to call.
func (w *StreamWriter) WriteCluster(index int64, data []byte) error {
	if err := w.checkIndex(index); err != nil {
		return err
	}
	if int64(len(data)) != w.cs {
		return fmt.Errorf("qcow2: stream writer: cluster %d of %d bytes, want %d", index, len(data), w.cs)
	}
	if err := w.setL2(index); err != nil {
		return err
	}
	host := w.alignCluster()
	w.append(data)
	w.putL2(index, uint64(host)|entryCopied, bitmapAllocMask)
	w.next = index + 1
	return w.err
}

// WriteCompressed stores guest cluster index as compressed, the output
// of Compress for it. Indexes must increase from call to call.
func (w *StreamWriter) WriteCompressed(index int64, compressed []byte) error {
	if err := w.checkIndex(index); err != nil {
		return err
	}
	if len(compressed) == 0 || int64(len(compressed)) >= w.cs {
		return fmt.Errorf("qcow2: stream writer: compressed cluster %d of %d bytes (cluster size %d)", index, len(compressed), w.cs)
	}
	if err := w.setL2(index); err != nil {
		return err
	}
	n := int64(len(compressed))
	// Each host cluster the data touches gains a reference; start a new
	// host cluster where the current one's refcount is full.
	if w.pos%w.cs != 0 && w.pos/w.cs == w.lastHost && w.lastRefs >= w.maxRef {
		w.alignCluster()
	}
	off := w.pos
	first, last := off/w.cs, (off+n-1)/w.cs
	for c := first; c <= last; c++ {
		if c == w.lastHost {
			w.lastRefs++
			continue
		}
		w.endShared()
		w.lastHost, w.lastRefs = c, 1
	}
	w.append(compressed)
	sectors := uint64((off+n-1)>>9 - off>>9)
	x := 62 - (w.p.clusterBits - 8)
	w.putL2(index, entryCompressed|sectors<<x|uint64(off), 0)
	w.next = index + 1
	return w.err
}

// WriteZero makes guest cluster index read as zeros without storing
// data: a zero cluster (version 3 images; with extended L2 entries, every
// subcluster reads as zeros), which hides the backing file's data there.
// Version 2 images have no zero clusters: WriteZero then returns an
// error matching disk.ErrNotSupported, and the caller writes a cluster
// of zeros instead. Indexes must increase from call to call.
func (w *StreamWriter) WriteZero(index int64) error {
	if err := w.checkIndex(index); err != nil {
		return err
	}
	if w.p.version < 3 {
		return fmt.Errorf("qcow2: stream writer: zero clusters in a version 2 image: %w", disk.ErrNotSupported)
	}
	if err := w.setL2(index); err != nil {
		return err
	}
	if w.p.extendedL2 {
		w.putL2(index, 0, bitmapAllocMask<<32)
	} else {
		w.putL2(index, entryZero, 0)
	}
	w.next = index + 1
	return w.err
}

// Subclusters returns the number of subclusters of a cluster that
// WriteSubclusters can allocate on their own: 32 with extended L2
// entries, otherwise 1.
func (w *StreamWriter) Subclusters() int {
	if w.p.extendedL2 {
		return 32
	}
	return 1
}

// WriteSubclusters stores guest cluster index (data: one cluster) with
// only the subclusters of alloc (bit i: subcluster i) allocated; those of
// zero read as zeros, and the others are unallocated (they read through
// the backing file, or as zeros without one). The cluster takes a host
// cluster only if alloc is not 0. It needs extended L2 entries (see
// Subclusters), except for alloc and zero both all ones or 0. Indexes
// must increase from call to call.
func (w *StreamWriter) WriteSubclusters(index int64, data []byte, alloc, zero uint32) error {
	if err := w.checkIndex(index); err != nil {
		return err
	}
	if alloc&zero != 0 {
		return fmt.Errorf("qcow2: stream writer: cluster %d: subclusters %#x both allocated and zero", index, alloc&zero)
	}
	if !w.p.extendedL2 {
		switch {
		case alloc == ^uint32(0):
			return w.WriteCluster(index, data)
		case zero == ^uint32(0):
			return w.WriteZero(index)
		case alloc == 0 && zero == 0:
			w.next = index + 1
			return nil
		}
		return fmt.Errorf("qcow2: stream writer: cluster %d: subclusters without extended L2 entries", index)
	}
	if alloc == 0 {
		if zero != 0 {
			if err := w.setL2(index); err != nil {
				return err
			}
			w.putL2(index, 0, uint64(zero)<<32)
		}
		w.next = index + 1
		return w.err
	}
	if int64(len(data)) != w.cs {
		return fmt.Errorf("qcow2: stream writer: cluster %d of %d bytes, want %d", index, len(data), w.cs)
	}
	if err := w.setL2(index); err != nil {
		return err
	}
	host := w.alignCluster()
	w.append(data)
	w.putL2(index, uint64(host)|entryCopied, uint64(alloc)|uint64(zero)<<32)
	w.next = index + 1
	return w.err
}

// endShared records the refcount of the last host cluster holding
// compressed data if it is above 1.
func (w *StreamWriter) endShared() {
	if w.lastHost >= 0 && w.lastRefs > 1 {
		w.shared = append(w.shared, sharedRef{w.lastHost, w.lastRefs})
	}
	w.lastHost, w.lastRefs = -1, 0
}

// alignCluster moves the append position to the next cluster boundary
// and returns it.
func (w *StreamWriter) alignCluster() int64 {
	if r := w.pos % w.cs; r != 0 {
		w.append(make([]byte, w.cs-r)) // tail of a cluster of compressed data
	}
	return w.pos
}

// append adds b at the end of the file, through the write buffer.
func (w *StreamWriter) append(b []byte) {
	w.pos += int64(len(b))
	if len(w.buf)+len(b) > streamBufSize {
		w.flush()
		if len(b) >= streamBufSize {
			w.writeAt(b, w.bufOff)
			w.bufOff += int64(len(b))
			return
		}
	}
	if w.buf == nil {
		w.buf = make([]byte, 0, streamBufSize)
	}
	w.buf = append(w.buf, b...)
}

// flush writes the buffered bytes.
func (w *StreamWriter) flush() {
	if len(w.buf) > 0 {
		w.writeAt(w.buf, w.bufOff)
		w.bufOff += int64(len(w.buf))
		w.buf = w.buf[:0]
	}
}

// writeAt writes b at off, keeping the first error.
func (w *StreamWriter) writeAt(b []byte, off int64) {
	if w.err != nil {
		return
	}
	if _, err := w.f.WriteAt(b, off); err != nil {
		w.err = fmt.Errorf("qcow2: stream writer: writing %d bytes at %#x: %w", len(b), off, err)
	}
}

// entriesPerL2 returns the number of entries of an L2 table.
func (w *StreamWriter) entriesPerL2() int64 { return w.p.l2Entries() }

// setL2 makes the current L2 table the one mapping guest cluster index,
// appending the previous one if it has entries.
func (w *StreamWriter) setL2(index int64) error {
	i := index / w.entriesPerL2()
	if i == w.l2Idx {
		return nil
	}
	w.endL2()
	w.l2Idx = i
	return w.err
}

// endL2 appends the current L2 table, if it has entries, and points its
// L1 entry at it.
func (w *StreamWriter) endL2() {
	if w.l2Set {
		off := w.alignCluster()
		w.append(w.l2)
		w.l1[w.l2Idx] = uint64(off) | entryCopied
		clear(w.l2)
		w.l2Set = false
	}
	w.l2Idx = -1
}

// putL2 sets the L2 entry of guest cluster index (its bitmap too, with
// extended L2 entries).
func (w *StreamWriter) putL2(index int64, word, bitmap uint64) {
	j := index % w.entriesPerL2()
	if w.p.extendedL2 {
		binary.BigEndian.PutUint64(w.l2[j*16:], word)
		binary.BigEndian.PutUint64(w.l2[j*16+8:], bitmap)
	} else {
		binary.BigEndian.PutUint64(w.l2[j*8:], word)
	}
	w.l2Set = true
}

// Close writes the last L2 table, the L1 table, the refcount blocks and
// table, then the header, and syncs f. It does not close f. After Close
// the writer accepts nothing more.
func (w *StreamWriter) Close() error {
	if w.closed {
		return fmt.Errorf("qcow2: stream writer: %w", disk.ErrClosed)
	}
	w.closed = true
	if w.err != nil {
		return w.err
	}
	w.endL2()
	w.endShared()
	cs := w.cs
	l := &createLayout{cs: cs, l1Size: int64(len(w.l1))}
	if l.l1Size > 0 {
		l.l1Off = w.alignCluster()
		t := make([]byte, l.l1Size*8)
		for i, e := range w.l1 {
			binary.BigEndian.PutUint64(t[i*8:], e)
		}
		w.append(t)
	}
	used := w.alignCluster() / cs // clusters in use besides the refcounts
	refsInBlock := cs * 8 >> w.p.refcountOrder
	rb, rt := fixRefcounts(used, 0, cs, refsInBlock)
	if rt*cs > maxRefcountTableBytes {
		return optErr("the image is too large for file format 'qcow2' (refcount table of %d bytes)", rt*cs)
	}
	total := used + rb + rt
	block := make([]byte, cs)
	shared := w.shared
	for b := range rb {
		clear(block)
		for j := int64(0); j < refsInBlock; j++ {
			c := b*refsInBlock + j
			if c >= total {
				break
			}
			refs := uint64(1)
			if len(shared) > 0 && shared[0].cluster == c {
				refs = shared[0].refs
				shared = shared[1:]
			}
			putRefcountEntry(block, uint(w.p.refcountOrder), uint64(j), refs)
		}
		w.append(block)
	}
	l.rtOff, l.rtClusters = w.pos, rt
	table := make([]byte, rt*cs)
	for b := range rb {
		binary.BigEndian.PutUint64(table[b*8:], uint64((used+b)*cs))
	}
	w.append(table)
	w.flush()
	if w.err != nil {
		return w.err
	}
	hdr, err := w.p.encodeHeader(l)
	if err != nil {
		return err
	}
	if _, err := w.f.WriteAt(hdr, 0); err != nil {
		return fmt.Errorf("qcow2: stream writer: writing the header: %w", err)
	}
	if err := w.f.Sync(); err != nil {
		return fmt.Errorf("qcow2: stream writer: %w", err)
	}
	return nil
}

// Compress compresses one cluster of data with the image's compression
// type (zlib: raw deflate that QEMU's 4 KiB window inflates; or zstd)
// and appends it to dst. It reports false when the result is not
// smaller than a cluster: store the cluster uncompressed then, as QEMU
// does. It is safe for concurrent use.
func (w *StreamWriter) Compress(dst, data []byte) ([]byte, bool) {
	if int64(len(data)) != w.cs {
		return dst, false
	}
	start := len(dst)
	var err error
	if w.p.zstd {
		dst, err = compressZstd(dst, data)
	} else {
		dst, err = compressDeflate(dst, data)
	}
	if err != nil || int64(len(dst)-start) >= w.cs {
		return dst[:start], false
	}
	return dst, true
}

// deflateWriter holds the two compressors compressDeflate uses.
type deflateWriter struct {
	lz, huff *flate.Writer
}

var deflateWriters = sync.Pool{New: func() any {
	lz, _ := flate.NewWriter(nil, flate.DefaultCompression)
	huff, _ := flate.NewWriter(nil, flate.HuffmanOnly)
	return &deflateWriter{lz: lz, huff: huff}
}}

// sliceWriter appends to a byte slice.
type sliceWriter struct{ b []byte }

func (s *sliceWriter) Write(p []byte) (int, error) {
	s.b = append(s.b, p...)
	return len(p), nil
}

// compressDeflate compresses data as one raw deflate stream whose
// back-references never reach further than deflateWindow bytes: each
// 4 KiB piece is compressed on its own (a fresh dictionary), the pieces
// ending with a sync flush so that they chain into one stream. A piece
// the fast compressor leaves stored (it entropy-codes only pieces with
// matches, at this size: text without repeats stays stored) is compressed
// again with Huffman coding alone, and the smaller output kept.
func compressDeflate(dst, data []byte) ([]byte, error) {
	dw := deflateWriters.Get().(*deflateWriter)
	defer deflateWriters.Put(dw)
	out := &sliceWriter{b: dst}
	piece := func(fw *flate.Writer, p []byte, last bool) error {
		fw.Reset(out)
		if _, err := fw.Write(p); err != nil {
			return err
		}
		if last {
			return fw.Close()
		}
		return fw.Flush()
	}
	var alt []byte
	for off := 0; off < len(data); off += deflateWindow {
		p := data[off:min(len(data), off+deflateWindow)]
		last := off+deflateWindow >= len(data)
		start := len(out.b)
		if err := piece(dw.lz, p, last); err != nil {
			return dst, err
		}
		if len(out.b)-start < len(p) {
			continue
		}
		alt = append(alt[:0], out.b[start:]...)
		out.b = out.b[:start]
		if err := piece(dw.huff, p, last); err != nil {
			return dst, err
		}
		if len(out.b)-start > len(alt) {
			out.b = append(out.b[:start], alt...)
		}
	}
	return out.b, nil
}

var zstdEncoder = sync.OnceValues(func() (*zstd.Encoder, error) {
	return zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedDefault),
		// Entropy-code literals even in blocks without matches, as
		// zstd does: text without repeats then still shrinks.
		zstd.WithAllLitEntropyCompression(true),
		// No frame checksum, as QEMU writes its frames (zstd's default):
		// hashing the cluster took a third of the time.
		zstd.WithEncoderCRC(false))
})

// compressZstd compresses data as one zstd frame.
func compressZstd(dst, data []byte) ([]byte, error) {
	enc, err := zstdEncoder()
	if err != nil {
		return dst, err
	}
	return enc.EncodeAll(data, dst), nil
}
