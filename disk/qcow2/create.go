package qcow2

import (
	"encoding/binary"
	"fmt"
	"math/bits"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/disk/hostfile"
)

// Creation defaults, as qemu-img's.
const (
	defaultClusterBits   = 16 // 64 KiB
	defaultRefcountOrder = 4  // 16-bit refcounts
	// createHeaderLengthV3 is the header_length QEMU writes: the version 3
	// fields, compression_type and padding to a multiple of 8.
	createHeaderLengthV3 = 112
	// l2Copied is QCOW_OFLAG_COPIED, set on L1 and L2 entries whose
	// cluster has refcount 1.
	l2Copied = uint64(1) << 63
)

// maxClusterNoFeatureTable: QEMU leaves the feature name table out of
// images with clusters of 4 KiB or less (seen with qemu-img 7.2).
const maxClusterNoFeatureTable = 4096

// createFeatureTable is the feature name table QEMU writes into version 3
// images, in its order.
var createFeatureTable = []FeatureName{
	{featureIncompatible, 0, "dirty bit"},
	{featureIncompatible, 1, "corrupt bit"},
	{featureIncompatible, 2, "external data file"},
	{featureIncompatible, 3, "compression type"},
	{featureIncompatible, 4, "extended L2 entries"},
	{featureCompatible, 0, "lazy refcounts"},
	{featureAutoclear, 0, "bitmaps"},
	{featureAutoclear, 1, "raw external data"},
}

// createOptionNames lists the options Create accepts.
var createOptionNames = []string{
	"backing_file", "backing_fmt", "cluster_size", "compat", "compression_type",
	"data_file", "data_file_raw", "extended_l2", "lazy_refcounts", "preallocation",
	"refcount_bits",
}

// createParams are the parsed creation options.
type createParams struct {
	raw map[string]string // the options as typed

	size          int64 // virtual size as requested (before rounding)
	clusterBits   uint32
	version       uint32
	lazyRefcounts bool
	refcountOrder uint32
	extendedL2    bool
	zstd          bool
	prealloc      string
	dataFile      string
	dataFileRaw   bool
	backingFile   string
	backingFmt    string

	clusterSize  int64 // parsed cluster_size (checked later)
	refcountBits uint64
}

// Create makes a new qcow2 image of size bytes (disk.SizeFromBacking:
// the backing file's size; rounded up to 512) at path, laid out as
// qemu-img 7.2 lays it out: the header and its extensions in cluster 0,
// the refcount table in cluster 1, the first refcount block in cluster 2
// and the L1 table from cluster 3; with preallocation, the L2 tables and
// data clusters where QEMU puts them (see layout). The options are
// qemu-img's, with its defaults: cluster_size (64k), compat (1.1; 0.10,
// v2, v3), lazy_refcounts (off), refcount_bits (16), extended_l2 (off),
// compression_type (zlib or zstd), preallocation (off, metadata, falloc,
// full), data_file, data_file_raw, backing_file and backing_fmt. It
// implements disk.Creator.
//
// The backing file, if any, is opened read-only (through disk.Open, so
// its driver must be registered) to check it and to read its size; a
// relative name is resolved against path's folder but stored as given.
// An external data file is created beside the image, sized to the
// virtual disk. On error the files Create made are removed.
func (Driver) Create(path string, size int64, opts disk.CreateOptions) error {
	p, err := parseCreateOptions(opts.Options)
	if err != nil {
		return err
	}
	if err := p.probeBacking(path, &size, opts.Unsafe); err != nil {
		return err
	}
	if size < 0 || size > disk.MaxCreateSize {
		return fmt.Errorf("qcow2: %w: image size %d out of range", disk.ErrInvalidOption, size)
	}
	p.size = size
	if opts.Announce != nil {
		opts.Announce(p.describe(path))
	}
	if err := p.check(); err != nil {
		return err
	}
	return p.create(path)
}

// optErr returns an error matching disk.ErrInvalidOption.
func optErr(format string, args ...any) error {
	return fmt.Errorf("qcow2: %w: %s", disk.ErrInvalidOption, fmt.Sprintf(format, args...))
}

// parseCreateOptions parses each option's value on its own; check tests
// the values against each other.
func parseCreateOptions(m map[string]string) (*createParams, error) {
	p := &createParams{
		raw:          m,
		clusterSize:  1 << defaultClusterBits,
		refcountBits: 1 << defaultRefcountOrder,
		version:      3,
		prealloc:     disk.PreallocOff,
	}
	for _, k := range sortedOptionNames(m) {
		v := m[k]
		var err error
		switch k {
		case "cluster_size":
			p.clusterSize, err = disk.ParseSize(v)
		case "refcount_bits":
			p.refcountBits, err = strconv.ParseUint(v, 10, 64)
			if err != nil {
				err = fmt.Errorf("invalid number %q", v)
			}
		case "lazy_refcounts":
			p.lazyRefcounts, err = disk.ParseBool(v)
		case "extended_l2":
			p.extendedL2, err = disk.ParseBool(v)
		case "data_file_raw":
			p.dataFileRaw, err = disk.ParseBool(v)
		case "compat", "compression_type", "preallocation":
			// Checked after the announcement, as qemu-img does.
		case "data_file":
			p.dataFile = v
		case "backing_file":
			p.backingFile = v
		case "backing_fmt":
			p.backingFmt = v
		default:
			if k == "encryption" || strings.HasPrefix(k, "encrypt.") {
				return nil, &disk.UnsupportedError{Format: formatName, Feature: "creating encrypted images (option " + k + ")"}
			}
			return nil, optErr("unknown parameter %q (known: %s)", k, strings.Join(createOptionNames, ", "))
		}
		if err != nil {
			return nil, optErr("%s: %v", k, err)
		}
	}
	return p, nil
}

// probeBacking opens the backing file, as qemu-img create does, to check
// that it exists and has the format named, and to take the size from it
// when *size is disk.SizeFromBacking. With unsafe set the backing file is
// not opened: its format and the size must be given.
func (p *createParams) probeBacking(path string, size *int64, unsafe bool) error {
	if p.backingFile == "" {
		if p.backingFmt != "" {
			return optErr("backing_fmt %q given without a backing file", p.backingFmt)
		}
		if *size == disk.SizeFromBacking {
			return optErr("image creation needs a size (or a backing file to take it from)")
		}
		return nil
	}
	if unsafe {
		switch {
		case p.backingFmt == "":
			return optErr("backing file specified without backing format (needed when the backing file is not opened)")
		case *size == disk.SizeFromBacking:
			return optErr("image creation needs a size when the backing file is not opened")
		}
		return nil
	}
	full := disk.ResolveName(path, p.backingFile)
	if a, err := filepath.Abs(path); err == nil {
		if b, err := filepath.Abs(full); err == nil && a == b {
			return optErr("backing file %q is the image being created", p.backingFile)
		}
	}
	if p.backingFmt == "" {
		detected := "unknown"
		if f, err := hostfile.Open(full, true); err == nil {
			d, err := disk.Probe(f)
			f.Close()
			if err == nil {
				detected = d.Name()
			}
		} else {
			return fmt.Errorf("qcow2: could not open backing image %q: %w", p.backingFile, err)
		}
		return optErr("backing file specified without backing format (detected format of %s; give -F %s)", detected, detected)
	}
	// Opened as qemu-img create opens it, to learn its size: read, with
	// writes shared where the format allows (bdrv_img_create has no
	// BlockBackend refusing them).
	img, err := disk.Open(full, disk.OpenOptions{Format: p.backingFmt, ReadOnly: true, ShareWrite: true, Parents: []string{absPath(path)}})
	if err != nil {
		return fmt.Errorf("qcow2: could not open backing image %q: %w", p.backingFile, err)
	}
	n := img.Size()
	img.Close()
	if *size == disk.SizeFromBacking {
		*size = n
	}
	return nil
}

// absPath returns path made absolute, or path if that fails.
func absPath(path string) string {
	if a, err := filepath.Abs(path); err == nil {
		return a
	}
	return path
}

// describe returns the line qemu-img create prints, with its option order
// and defaults; values appear as typed, cluster_size in bytes.
func (p *createParams) describe(path string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "Formatting '%s', fmt=qcow2 cluster_size=%d", path, p.clusterSize)
	opt := func(name, def string) {
		if v, ok := p.raw[name]; ok {
			fmt.Fprintf(&b, " %s=%s", name, v)
		} else if def != "" {
			fmt.Fprintf(&b, " %s=%s", name, def)
		}
	}
	opt("extended_l2", "off")
	opt("preallocation", "")
	opt("compression_type", "zlib")
	fmt.Fprintf(&b, " size=%d", p.size)
	opt("compat", "")
	opt("backing_file", "")
	opt("backing_fmt", "")
	opt("data_file", "")
	opt("data_file_raw", "")
	opt("lazy_refcounts", "off")
	opt("refcount_bits", "16")
	return b.String()
}

// check validates the option values and their combinations, with
// qemu-img's rules.
func (p *createParams) check() error {
	if v, ok := p.raw["compat"]; ok {
		switch v {
		case "0.10", "v2":
			p.version = 2
		case "1.1", "v3":
			p.version = 3
		default:
			return optErr("compat: invalid value %q (want 0.10, 1.1, v2 or v3)", v)
		}
	}
	cs := p.clusterSize
	if cs < 1<<minClusterBits || cs > 1<<maxClusterBits || cs&(cs-1) != 0 {
		return optErr("cluster size must be a power of two between 512 and 2048k (cluster_size=%d)", cs)
	}
	p.clusterBits = uint32(bits.TrailingZeros64(uint64(cs)))
	switch v := p.raw["compression_type"]; v {
	case "", "zlib":
	case "zstd":
		p.zstd = true
	default:
		return optErr("compression_type: invalid value %q (want zlib or zstd)", v)
	}
	if v, ok := p.raw["preallocation"]; ok {
		switch v {
		case disk.PreallocOff, disk.PreallocMetadata, disk.PreallocFalloc, disk.PreallocFull:
			p.prealloc = v
		default:
			return optErr("preallocation: invalid value %q (want off, metadata, falloc or full)", v)
		}
	}
	rb := p.refcountBits
	if rb == 0 || rb > 64 || rb&(rb-1) != 0 {
		return optErr("refcount width must be a power of two and may not exceed 64 bits (refcount_bits=%d)", rb)
	}
	p.refcountOrder = uint32(bits.TrailingZeros64(rb))
	if p.version < 3 {
		v3only := func(what string) error {
			return optErr("%s only supported with compatibility level 1.1 and above (compat=1.1)", what)
		}
		switch {
		case p.lazyRefcounts:
			return v3only("lazy refcounts are")
		case p.extendedL2:
			return v3only("extended L2 entries are")
		case p.zstd:
			return v3only("non-zlib compression type is")
		case p.dataFile != "":
			return v3only("external data files are")
		case rb != 16:
			return v3only("refcount widths other than 16 bits are")
		}
	}
	if p.extendedL2 && p.clusterBits < minExtendedL2ClusterBits {
		return optErr("extended L2 entries are only supported with cluster sizes of at least %d bytes (cluster_size=%d)", 1<<minExtendedL2ClusterBits, cs)
	}
	if p.dataFileRaw && p.dataFile == "" {
		return optErr("data_file_raw requires data_file")
	}
	if p.dataFileRaw && p.backingFile != "" {
		return optErr("backing file and data_file_raw cannot be used at the same time")
	}
	if p.dataFileRaw && p.prealloc == disk.PreallocOff {
		// The data file must read as the disk by itself: every guest
		// cluster maps to the same offset in it.
		p.prealloc = disk.PreallocMetadata
	}
	if len(p.backingFile) > maxBackingFileSize {
		return optErr("backing file name of %d bytes exceeds the limit of %d", len(p.backingFile), maxBackingFileSize)
	}
	if len(p.backingFmt) > maxBackingFormatSize {
		return optErr("backing format name %q is longer than %d bytes", p.backingFmt, maxBackingFormatSize)
	}
	if l1 := p.l1Size(); l1 > maxL1Entries {
		return optErr("the image size is too large for file format 'qcow2' (try using a larger cluster size)")
	}
	return nil
}

// sortedOptionNames returns m's keys in order, so that errors do not depend on
// map order.
func sortedOptionNames(m map[string]string) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	for i := 1; i < len(keys); i++ {
		for j := i; j > 0 && keys[j] < keys[j-1]; j-- {
			keys[j], keys[j-1] = keys[j-1], keys[j]
		}
	}
	return keys
}

// virtualSize is the size rounded up to a sector, as qemu-img rounds it.
func (p *createParams) virtualSize() int64 { return (p.size + 511) &^ 511 }

// l2Entries returns the entries per L2 table.
func (p *createParams) l2Entries() int64 {
	if p.extendedL2 {
		return 1 << (p.clusterBits - 4)
	}
	return 1 << (p.clusterBits - 3)
}

// l1Size returns the number of L1 entries that map the virtual disk.
func (p *createParams) l1Size() int64 {
	span := int64(1) << p.clusterBits * p.l2Entries()
	return (p.virtualSize() + span - 1) / span
}

// create writes the image (and its data file) to disk.
func (p *createParams) create(path string) (err error) {
	l, err := p.layout()
	if err != nil {
		return err
	}
	hdr, err := p.encodeHeader(l)
	if err != nil {
		return err
	}
	if p.dataFile != "" && absPath(disk.ResolveName(path, p.dataFile)) == absPath(path) {
		return optErr("data file %q is the image itself", p.dataFile)
	}
	f, err := hostfile.Create(path)
	if err != nil {
		return fmt.Errorf("qcow2: %w", err)
	}
	var data *hostfile.OSFile
	dataPath := ""
	defer func() {
		if data != nil {
			if cerr := data.Close(); err == nil && cerr != nil {
				err = fmt.Errorf("qcow2: data file: %w", cerr)
			}
		}
		if cerr := f.Close(); err == nil && cerr != nil {
			err = fmt.Errorf("qcow2: %w", cerr)
		}
		if err != nil {
			os.Remove(path)
			if dataPath != "" {
				os.Remove(dataPath)
			}
		}
	}()
	if p.dataFile != "" {
		dataPath = disk.ResolveName(path, p.dataFile)
		if data, err = hostfile.Create(dataPath); err != nil {
			dataPath = ""
			return fmt.Errorf("qcow2: data file: %w", err)
		}
		if err := p.fillDataFile(data); err != nil {
			return fmt.Errorf("qcow2: data file %s: %w", dataPath, err)
		}
	}
	if err := p.writeImage(f, l, hdr); err != nil {
		return fmt.Errorf("qcow2: writing %s: %w", path, err)
	}
	return nil
}

// fillDataFile sizes the external data file to the virtual disk and
// preallocates it as asked.
func (p *createParams) fillDataFile(f disk.File) error {
	size := p.virtualSize()
	if err := f.Truncate(size); err != nil {
		return err
	}
	if p.prealloc == disk.PreallocFalloc || p.prealloc == disk.PreallocFull {
		if err := disk.Allocate(f, 0, size, p.prealloc == disk.PreallocFull); err != nil {
			return err
		}
	}
	return f.Sync()
}

// writeImage writes the image file: its size, the preallocated data
// area, the refcount structures, L1 and L2 tables, and the header last.
func (p *createParams) writeImage(f disk.File, l *createLayout, hdr []byte) error {
	cs := l.cs
	if err := f.Truncate(l.fileSize); err != nil {
		return err
	}
	if len(l.l2Offs) > 0 && p.dataFile == "" && (p.prealloc == disk.PreallocFalloc || p.prealloc == disk.PreallocFull) {
		if err := disk.Allocate(f, l.dataStart, l.dataEnd-l.dataStart, p.prealloc == disk.PreallocFull); err != nil {
			return err
		}
	}
	be := binary.BigEndian

	// Refcount blocks: clusters [0, total) have refcount 1.
	block := make([]byte, cs)
	filled := int64(0) // entries of block set to 1
	for i, off := range l.rbOffs {
		n := min(l.total-int64(i)*l.refsInBlock, l.refsInBlock)
		if n < filled {
			clear(block)
			filled = 0
		}
		for ; filled < n; filled++ {
			putRefcountEntry(block, uint(p.refcountOrder), uint64(filled), 1)
		}
		if err := writeAll(f, block, off); err != nil {
			return err
		}
	}
	// Refcount table.
	rt := make([]byte, l.rtClusters*cs)
	for i, off := range l.rbOffs {
		be.PutUint64(rt[i*8:], uint64(off))
	}
	if err := writeAll(f, rt, l.rtOff); err != nil {
		return err
	}
	if len(l.l2Offs) > 0 {
		if err := p.writeTables(f, l); err != nil {
			return err
		}
	}
	if err := writeAll(f, hdr, 0); err != nil {
		return err
	}
	return f.Sync()
}

// writeTables writes the L1 table and the L2 tables of a preallocated
// image: every guest cluster maps to a host cluster with refcount 1 (in a
// data file, to the same offset).
func (p *createParams) writeTables(f disk.File, l *createLayout) error {
	be := binary.BigEndian
	cs := l.cs
	l1 := make([]byte, l.l1Size*8)
	for i, off := range l.l2Offs {
		be.PutUint64(l1[i*8:], uint64(off)|l2Copied)
	}
	if err := writeAll(f, l1, l.l1Off); err != nil {
		return err
	}
	entries := p.l2Entries()
	entrySize := cs / entries
	clusters := (p.virtualSize() + cs - 1) / cs
	l2 := make([]byte, cs)
	data := l.data // the dataRun holding the next guest cluster
	for i, off := range l.l2Offs {
		clear(l2)
		for j := int64(0); j < entries; j++ {
			g := int64(i)*entries + j
			if g >= clusters {
				break
			}
			host := g * cs // in the data file
			if p.dataFile == "" {
				for len(data) > 0 && g >= data[0].guest+data[0].n {
					data = data[1:]
				}
				if len(data) == 0 || g < data[0].guest {
					return fmt.Errorf("qcow2: internal error: guest cluster %d has no host cluster", g)
				}
				host = data[0].host + (g-data[0].guest)*cs
			}
			// With extended L2 entries the subcluster bitmap stays 0, as
			// QEMU leaves it: allocated clusters reading as zeros.
			be.PutUint64(l2[j*entrySize:], uint64(host)|l2Copied)
		}
		if err := writeAll(f, l2, off); err != nil {
			return err
		}
	}
	return nil
}

// writeAll writes p at off.
func writeAll(f disk.File, p []byte, off int64) error {
	if _, err := f.WriteAt(p, off); err != nil {
		return err
	}
	return nil
}

// encodeHeader returns the header, its extensions and the backing file
// name, as QEMU lays them out in cluster 0: header extensions backing
// format, external data file name and (version 3, clusters over 4 KiB)
// feature name table,
// the end marker, then the backing file name.
func (p *createParams) encodeHeader(l *createLayout) ([]byte, error) {
	be := binary.BigEndian
	hl := v2HeaderLength
	if p.version >= 3 {
		hl = createHeaderLengthV3
	}
	b := make([]byte, hl, l.cs)
	be.PutUint32(b[offMagic:], magic)
	be.PutUint32(b[offVersion:], p.version)
	be.PutUint32(b[offClusterBits:], p.clusterBits)
	be.PutUint64(b[offSize:], uint64(p.virtualSize()))
	be.PutUint32(b[offL1Size:], uint32(l.l1Size))
	be.PutUint64(b[offL1TableOffset:], uint64(l.l1Off))
	be.PutUint64(b[offRefcountTableOffset:], uint64(l.rtOff))
	be.PutUint32(b[offRefcountTableClusters:], uint32(l.rtClusters))
	if p.version >= 3 {
		var incompat, compat, autoclear uint64
		if p.dataFile != "" {
			incompat |= IncompatDataFile
		}
		if p.zstd {
			incompat |= IncompatCompression
			b[compressionTypeOffset] = compressionZstd
		}
		if p.extendedL2 {
			incompat |= IncompatExtendedL2
		}
		if p.lazyRefcounts {
			compat |= CompatLazyRefcounts
		}
		if p.dataFileRaw {
			autoclear |= AutoclearDataFileRaw
		}
		be.PutUint64(b[offIncompatibleFeatures:], incompat)
		be.PutUint64(b[offCompatibleFeatures:], compat)
		be.PutUint64(b[offAutoclearFeatures:], autoclear)
		be.PutUint32(b[offRefcountOrder:], p.refcountOrder)
		be.PutUint32(b[offHeaderLength:], uint32(hl))
	}
	ext := func(typ uint32, data []byte) {
		var h [8]byte
		be.PutUint32(h[:], typ)
		be.PutUint32(h[4:], uint32(len(data)))
		b = append(b, h[:]...)
		b = append(b, data...)
		b = append(b, make([]byte, (8-len(data)%8)%8)...)
	}
	if p.backingFmt != "" {
		ext(extBackingFormat, []byte(p.backingFmt))
	}
	if p.dataFile != "" {
		ext(extDataFile, []byte(p.dataFile))
	}
	if p.version >= 3 && l.cs > maxClusterNoFeatureTable {
		t := make([]byte, len(createFeatureTable)*featureNameEntrySize)
		for i, fn := range createFeatureTable {
			e := t[i*featureNameEntrySize:]
			e[0], e[1] = fn.Type, fn.Bit
			copy(e[2:featureNameEntrySize], fn.Name)
		}
		ext(extFeatureTable, t)
	}
	b = append(b, make([]byte, 8)...) // end of extensions
	if p.backingFile != "" {
		be.PutUint64(b[offBackingFileOffset:], uint64(len(b)))
		be.PutUint32(b[offBackingFileSize:], uint32(len(p.backingFile)))
		b = append(b, p.backingFile...)
	}
	if int64(len(b)) > l.cs {
		return nil, optErr("the header, its extensions and the backing file name (%d bytes) do not fit in one cluster of %d bytes (use a larger cluster_size)", len(b), l.cs)
	}
	return b, nil
}

// Driver implements disk.Creator.
var _ disk.Creator = Driver{}
