package qcow2

import (
	"encoding/binary"
	"fmt"
	"io"
	"math"
	"strconv"

	"github.com/imgloop/imgloop/disk"
)

// Header is the decoded QCOW2 image header (docs/interop/qcow2.txt,
// "Header"), with the header extensions the driver understands. Field names
// are the spec's, in MixedCaps.
//
// For version 2 images the version 3 fields hold the values the spec says
// to assume: no feature bits, RefcountOrder 4, HeaderLength 72,
// CompressionType 0 (zlib).
type Header struct {
	Magic                 uint32 // magic: "QFI\xfb"
	Version               uint32 // version: 2 or 3
	BackingFileOffset     uint64 // backing_file_offset
	BackingFileSize       uint32 // backing_file_size
	ClusterBits           uint32 // cluster_bits
	Size                  uint64 // size: virtual disk size in bytes
	CryptMethod           uint32 // crypt_method
	L1Size                uint32 // l1_size
	L1TableOffset         uint64 // l1_table_offset
	RefcountTableOffset   uint64 // refcount_table_offset
	RefcountTableClusters uint32 // refcount_table_clusters
	NbSnapshots           uint32 // nb_snapshots
	SnapshotsOffset       uint64 // snapshots_offset
	IncompatibleFeatures  uint64 // incompatible_features (v3)
	CompatibleFeatures    uint64 // compatible_features (v3)
	AutoclearFeatures     uint64 // autoclear_features (v3)
	RefcountOrder         uint32 // refcount_order (4 for v2)
	HeaderLength          uint32 // header_length (72 for v2)
	CompressionType       uint8  // compression_type (0 zlib, 1 zstd)

	// From the header extensions and the backing file name area.
	BackingFile       string        // backing file name, "" if none
	BackingFormat     string        // backing file format name extension
	DataFile          string        // external data file name extension
	FeatureNames      []FeatureName // feature name table extension
	Extensions        []Extension   // every extension, in file order
	HasBitmaps        bool          // bitmaps extension present
	CryptHeaderOffset uint64        // full disk encryption header pointer
	CryptHeaderLength uint64

	// From the bitmaps extension (zero without it); the bitmap directory
	// itself is not read.
	NbBitmaps             uint32 // nb_bitmaps
	BitmapDirectorySize   uint64 // bitmap_directory_size
	BitmapDirectoryOffset uint64 // bitmap_directory_offset
	// Bitmaps is the bitmap directory, read when the bitmaps extension is
	// present and its autoclear bit set.
	Bitmaps []Bitmap
}

// FeatureName is one entry of the feature name table extension.
type FeatureName struct {
	Type uint8 // 0 incompatible, 1 compatible, 2 autoclear
	Bit  uint8
	Name string
}

// Extension is one header extension as found in the file.
type Extension struct {
	Type   uint32
	Offset int64 // file offset of the extension's data
	Length uint32
}

// Header layout and the limits applied to it. The limits are QEMU's
// (block/qcow2.h): images beyond them cannot be opened by QEMU either,
// and they bound every allocation made from header fields.
const (
	// magic is "QFI\xfb".
	magic = 0x514649fb
	// v2HeaderLength is the fixed length of a version 2 header.
	v2HeaderLength = 72
	// v3MinHeaderLength is the shortest version 3 header: the fields up to
	// header_length.
	v3MinHeaderLength = 104
	// compressionTypeOffset is the offset of compression_type; the field is
	// present when header_length is larger.
	compressionTypeOffset = 104

	// minClusterBits and maxClusterBits bound cluster_bits (512 B to 2 MiB).
	minClusterBits = 9
	maxClusterBits = 21
	// minExtendedL2ClusterBits: extended L2 entries split a cluster into 32
	// subclusters of at least 512 bytes.
	minExtendedL2ClusterBits = 14
	// maxRefcountOrder: refcount_bits may not exceed 64.
	maxRefcountOrder = 6
	// maxL1Entries is QEMU's QCOW_MAX_L1_SIZE (32 MiB) in 8-byte entries.
	maxL1Entries = 32 << 20 / 8
	// maxRefcountTableBytes is QEMU's QCOW_MAX_REFTABLE_SIZE (8 MiB).
	maxRefcountTableBytes = 8 << 20
	// maxBackingFileSize is the spec's limit on backing_file_size.
	maxBackingFileSize = 1023
	// maxBackingFormatSize: QEMU keeps the backing format in a 16-byte
	// buffer and refuses longer names.
	maxBackingFormatSize = 15
)

// Header field offsets, used to report where a bad field is.
const (
	offMagic                 = 0
	offVersion               = 4
	offBackingFileOffset     = 8
	offBackingFileSize       = 16
	offClusterBits           = 20
	offSize                  = 24
	offCryptMethod           = 32
	offL1Size                = 36
	offL1TableOffset         = 40
	offRefcountTableOffset   = 48
	offRefcountTableClusters = 56
	offNbSnapshots           = 60
	offSnapshotsOffset       = 64
	offIncompatibleFeatures  = 72
	offCompatibleFeatures    = 80
	offAutoclearFeatures     = 88
	offRefcountOrder         = 96
	offHeaderLength          = 100
)

// readHeader reads and validates the header, its extensions and the
// backing file name from the first cluster of f, a file of fileSize bytes.
// Tables the header points to must be cluster aligned, within QEMU's size
// limits and inside the file; their contents are not read.
//
// Errors: *disk.FormatError (disk.ErrFormat) for a malformed header, with
// the offset of the bad field; *disk.UnsupportedError (disk.ErrNotSupported)
// for encryption, unknown incompatible features and unknown compression
// types; *disk.UnsupportedFormatError for a version other than 2 and 3;
// the read error of f, wrapped.
func readHeader(f io.ReaderAt, fileSize int64) (*Header, error) {
	return parseHeader(f, fileSize, false)
}

// readHeaderToCheck is readHeader for Check, which must diagnose what it
// can: it refuses only what QEMU's qcow2_do_open refuses under
// BDRV_O_CHECK. The L1 and refcount tables may then overlap the header
// or lie past the end of the file (QEMU reads zeros there), and the
// refcount table may be empty: Check reads them as QEMU does and counts
// what follows as corruptions.
func readHeaderToCheck(f io.ReaderAt, fileSize int64) (*Header, error) {
	return parseHeader(f, fileSize, true)
}

// parseHeader is readHeader, or with toCheck readHeaderToCheck.
func parseHeader(f io.ReaderAt, fileSize int64, toCheck bool) (*Header, error) {
	if fileSize < v2HeaderLength {
		if fileSize >= 4 {
			// Say "not qcow2" rather than "short" for a small foreign file.
			var m [4]byte
			if err := readAt(f, m[:], 0); err != nil {
				return nil, err
			}
			if binary.BigEndian.Uint32(m[:]) != magic {
				return nil, formatErr(offMagic, "bad magic %#08x, want %#08x (\"QFI\\xfb\")", binary.BigEndian.Uint32(m[:]), magic)
			}
		}
		return nil, formatErr(0, "file of %d bytes is too small for a qcow2 header (%d bytes)", fileSize, v2HeaderLength)
	}
	var fixed [v3MinHeaderLength]byte
	n := min(int64(len(fixed)), fileSize)
	if err := readAt(f, fixed[:n], 0); err != nil {
		return nil, err
	}
	be := binary.BigEndian
	h := &Header{
		Magic:                 be.Uint32(fixed[offMagic:]),
		Version:               be.Uint32(fixed[offVersion:]),
		BackingFileOffset:     be.Uint64(fixed[offBackingFileOffset:]),
		BackingFileSize:       be.Uint32(fixed[offBackingFileSize:]),
		ClusterBits:           be.Uint32(fixed[offClusterBits:]),
		Size:                  be.Uint64(fixed[offSize:]),
		CryptMethod:           be.Uint32(fixed[offCryptMethod:]),
		L1Size:                be.Uint32(fixed[offL1Size:]),
		L1TableOffset:         be.Uint64(fixed[offL1TableOffset:]),
		RefcountTableOffset:   be.Uint64(fixed[offRefcountTableOffset:]),
		RefcountTableClusters: be.Uint32(fixed[offRefcountTableClusters:]),
		NbSnapshots:           be.Uint32(fixed[offNbSnapshots:]),
		SnapshotsOffset:       be.Uint64(fixed[offSnapshotsOffset:]),
		RefcountOrder:         4,
		HeaderLength:          v2HeaderLength,
	}
	if h.Magic != magic {
		return nil, formatErr(offMagic, "bad magic %#08x, want %#08x (\"QFI\\xfb\")", h.Magic, magic)
	}
	if h.Version != 2 && h.Version != 3 {
		return nil, &disk.UnsupportedFormatError{Format: formatName, Version: strconv.FormatUint(uint64(h.Version), 10)}
	}
	if h.ClusterBits < minClusterBits || h.ClusterBits > maxClusterBits {
		return nil, formatErr(offClusterBits, "cluster_bits %d out of range %d..%d", h.ClusterBits, minClusterBits, maxClusterBits)
	}
	clusterSize := h.ClusterSize()
	if h.Version == 3 {
		if fileSize < v3MinHeaderLength {
			return nil, formatErr(0, "file of %d bytes is too small for a version 3 header (%d bytes)", fileSize, v3MinHeaderLength)
		}
		h.IncompatibleFeatures = be.Uint64(fixed[offIncompatibleFeatures:])
		h.CompatibleFeatures = be.Uint64(fixed[offCompatibleFeatures:])
		h.AutoclearFeatures = be.Uint64(fixed[offAutoclearFeatures:])
		h.RefcountOrder = be.Uint32(fixed[offRefcountOrder:])
		h.HeaderLength = be.Uint32(fixed[offHeaderLength:])
		switch {
		case h.HeaderLength < v3MinHeaderLength:
			return nil, formatErr(offHeaderLength, "header_length %d is shorter than the %d bytes of a version 3 header", h.HeaderLength, v3MinHeaderLength)
		case h.HeaderLength%8 != 0:
			return nil, formatErr(offHeaderLength, "header_length %d is not a multiple of 8", h.HeaderLength)
		case int64(h.HeaderLength) > clusterSize:
			return nil, formatErr(offHeaderLength, "header_length %d exceeds the cluster size %d", h.HeaderLength, clusterSize)
		}
	}

	// The whole first cluster holds the header, its extensions and the
	// backing file name; it is at most 2 MiB.
	first := make([]byte, min(clusterSize, fileSize))
	if err := readAt(f, first, 0); err != nil {
		return nil, err
	}
	if int64(h.HeaderLength) > int64(len(first)) {
		return nil, formatErr(offHeaderLength, "header_length %d reaches past the end of the file (%d bytes)", h.HeaderLength, fileSize)
	}
	if h.HeaderLength > compressionTypeOffset {
		h.CompressionType = first[compressionTypeOffset]
	}

	if err := h.checkBackingName(first, fileSize); err != nil {
		return nil, err
	}
	extEnd := clusterSize
	if h.BackingFileOffset != 0 {
		extEnd = int64(h.BackingFileOffset)
	}
	if err := h.readExtensions(first, extEnd, fileSize); err != nil {
		return nil, err
	}
	if err := h.checkFeatures(); err != nil {
		return nil, err
	}
	if err := h.checkTables(fileSize, toCheck); err != nil {
		return nil, err
	}
	if err := h.readBitmaps(f, fileSize); err != nil {
		return nil, err
	}
	return h, nil
}

// checkBackingName validates backing_file_offset and backing_file_size and
// reads the name from first, the first cluster (or the whole file when it
// is shorter).
func (h *Header) checkBackingName(first []byte, fileSize int64) error {
	if h.BackingFileOffset == 0 {
		return nil
	}
	cs := uint64(h.ClusterSize())
	if h.BackingFileOffset > cs {
		return formatErr(offBackingFileOffset, "backing_file_offset %#x lies outside the first cluster (%d bytes)", h.BackingFileOffset, cs)
	}
	if h.BackingFileSize > maxBackingFileSize {
		return formatErr(offBackingFileSize, "backing_file_size %d exceeds the limit of %d bytes", h.BackingFileSize, maxBackingFileSize)
	}
	if uint64(h.BackingFileSize) > cs-h.BackingFileOffset {
		return formatErr(offBackingFileSize, "backing file name (%d bytes at %#x) runs past the first cluster (%d bytes)", h.BackingFileSize, h.BackingFileOffset, cs)
	}
	end := h.BackingFileOffset + uint64(h.BackingFileSize)
	if end > uint64(len(first)) {
		return formatErr(int64(h.BackingFileOffset), "backing file name (%d bytes at %#x) runs past the end of the file (%d bytes)", h.BackingFileSize, h.BackingFileOffset, fileSize)
	}
	h.BackingFile = string(first[h.BackingFileOffset:end])
	return nil
}

// checkFeatures validates the feature bits, the encryption method and the
// compression type.
func (h *Header) checkFeatures() error {
	if unknown := h.IncompatibleFeatures &^ knownIncompatible; unknown != 0 {
		return &disk.UnsupportedError{Format: formatName, Feature: h.featureNames(featureIncompatible, unknown)}
	}
	switch h.CryptMethod {
	case 0:
		if h.CryptHeaderOffset != 0 || h.CryptHeaderLength != 0 || h.hasExtension(extCryptHeader) {
			return formatErr(h.extensionOffset(extCryptHeader), "full disk encryption header extension in an image without LUKS encryption")
		}
	case 1:
		return &disk.UnsupportedError{Format: formatName, Feature: "AES encryption (crypt_method 1)"}
	case 2:
		return &disk.UnsupportedError{Format: formatName, Feature: "LUKS encryption (crypt_method 2)"}
	default:
		return &disk.UnsupportedError{Format: formatName, Feature: fmt.Sprintf("encryption method %d", h.CryptMethod)}
	}
	if h.RefcountOrder > maxRefcountOrder {
		return formatErr(offRefcountOrder, "refcount_order %d exceeds %d (64-bit refcounts)", h.RefcountOrder, maxRefcountOrder)
	}
	if h.ExtendedL2() && h.ClusterBits < minExtendedL2ClusterBits {
		return formatErr(offClusterBits, "cluster_bits %d is below %d, the minimum with extended L2 entries", h.ClusterBits, minExtendedL2ClusterBits)
	}
	switch h.CompressionType {
	case compressionZlib, compressionZstd:
	default:
		return &disk.UnsupportedError{Format: formatName, Feature: fmt.Sprintf("compression type %d", h.CompressionType)}
	}
	bit := h.IncompatibleFeatures&IncompatCompression != 0
	if bit && h.CompressionType == compressionZlib {
		if h.HeaderLength <= compressionTypeOffset {
			return formatErr(offIncompatibleFeatures, "compression type feature bit set but header_length %d leaves out compression_type", h.HeaderLength)
		}
		return formatErr(compressionTypeOffset, "compression type feature bit set with compression_type 0 (zlib)")
	}
	if !bit && h.CompressionType != compressionZlib {
		return formatErr(compressionTypeOffset, "compression_type %d without the compression type feature bit", h.CompressionType)
	}
	if h.DataFileRaw() && !h.HasDataFile() {
		return formatErr(offAutoclearFeatures, "data-file-raw autoclear bit set without an external data file")
	}
	if h.DataFileRaw() && h.BackingFile != "" {
		return formatErr(offBackingFileOffset, "backing file %q conflicts with a raw external data file", h.BackingFile)
	}
	// A data file name without the feature bit is ignored, as QEMU does.
	return nil
}

// checkTables validates where the L1, refcount and snapshot tables lie and
// that the L1 table covers the virtual disk. With toCheck, only what
// QEMU's qcow2_do_open checks under BDRV_O_CHECK (qcow2_validate_table:
// the size limits, alignment, offsets that overflow) is refused.
func (h *Header) checkTables(fileSize int64, toCheck bool) error {
	cs := uint64(h.ClusterSize())
	// Virtual size: the L1 table must map all of it, within QEMU's limit.
	if h.L1Size > maxL1Entries {
		return formatErr(offL1Size, "l1_size %d exceeds the limit of %d entries (32 MiB)", h.L1Size, maxL1Entries)
	}
	if need := h.l1EntriesFor(h.Size); need > uint64(h.L1Size) {
		return formatErr(offL1Size, "l1_size %d is too small for the virtual size %d (needs %d entries)", h.L1Size, h.Size, need)
	}
	check := checkTable
	if toCheck {
		check = checkTableAsQEMU
	}
	if err := check("active L1 table", offL1TableOffset, h.L1TableOffset, uint64(h.L1Size)*8, cs, fileSize); err != nil {
		return err
	}
	if h.RefcountTableClusters == 0 && !toCheck {
		return formatErr(offRefcountTableClusters, "refcount_table_clusters is 0: the image has no refcount table")
	}
	if maxClusters := uint64(maxRefcountTableBytes) / cs; uint64(h.RefcountTableClusters) > maxClusters {
		return formatErr(offRefcountTableClusters, "refcount_table_clusters %d exceeds the limit of %d clusters (8 MiB)", h.RefcountTableClusters, maxClusters)
	}
	if err := check("refcount table", offRefcountTableOffset, h.RefcountTableOffset, uint64(h.RefcountTableClusters)*cs, cs, fileSize); err != nil {
		return err
	}
	if h.NbSnapshots > maxSnapshots {
		return formatErr(offNbSnapshots, "nb_snapshots %d exceeds the limit of %d", h.NbSnapshots, maxSnapshots)
	}
	// Each snapshot entry takes at least its fixed part; readSnapshots
	// checks the exact extent.
	return checkTable("snapshot table", offSnapshotsOffset, h.SnapshotsOffset, uint64(h.NbSnapshots)*snapshotHeaderSize, cs, fileSize)
}

// checkTableAsQEMU checks what qcow2_validate_table checks of a table of n
// bytes at off: cluster aligned, and an end that fits an int64.
func checkTableAsQEMU(name string, field int64, off, n, clusterSize uint64, _ int64) error {
	if off%clusterSize != 0 {
		return formatErr(field, "%s offset %#x is not aligned to the cluster size %d", name, off, clusterSize)
	}
	if off > math.MaxInt64-n {
		return formatErr(field, "%s (%d bytes at %#x) ends past the largest file offset", name, n, off)
	}
	return nil
}

// l1EntriesFor returns how many L1 entries map size bytes of guest disk,
// without overflow.
func (h *Header) l1EntriesFor(size uint64) uint64 {
	shift := h.ClusterBits + h.l2Bits()
	n := size >> shift
	if size&(1<<shift-1) != 0 {
		n++
	}
	return n
}

// l2Bits returns log2 of the number of entries in an L2 table.
func (h *Header) l2Bits() uint32 {
	if h.ExtendedL2() {
		return h.ClusterBits - 4
	}
	return h.ClusterBits - 3
}

// checkTable checks a table of n bytes at off, whose offset field is at
// field in the header: cluster aligned and, when not empty, after the
// header cluster and inside the file (QEMU would read zeros past the end of
// the file; such an image is refused here).
func checkTable(name string, field int64, off, n, clusterSize uint64, fileSize int64) error {
	if off%clusterSize != 0 {
		return formatErr(field, "%s offset %#x is not aligned to the cluster size %d", name, off, clusterSize)
	}
	if n == 0 {
		return nil
	}
	if off == 0 {
		return formatErr(field, "%s at offset 0 overlaps the header", name)
	}
	if off > uint64(fileSize) || n > uint64(fileSize)-off {
		return formatErr(field, "%s (%d bytes at %#x) extends past the end of the file (%d bytes)", name, n, off, fileSize)
	}
	return nil
}

// ClusterSize returns the cluster size in bytes.
func (h *Header) ClusterSize() int64 { return 1 << h.ClusterBits }

// L2Entries returns the number of entries in an L2 table: cluster size / 8,
// or / 16 with extended L2 entries.
func (h *Header) L2Entries() int64 { return 1 << h.l2Bits() }

// formatErr returns a *disk.FormatError for qcow2 at a file offset.
func formatErr(off int64, format string, args ...any) error {
	return &disk.FormatError{Format: formatName, Offset: off, What: fmt.Sprintf(format, args...)}
}

// readAt fills p from f at off; reaching the end of the file first is an
// error (io.ErrUnexpectedEOF), wrapped with the offset.
func readAt(f io.ReaderAt, p []byte, off int64) error {
	n, err := f.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("qcow2: reading %d bytes at %#x: %w", len(p), off, err)
}

// Field is one named header value, for display (`imgloop info --header`).
type Field struct {
	Name, Value string
}

// Fields returns the header fields in on-disk order, with the spec's names:
// sizes and counts in decimal, the magic, offsets and feature masks in
// hexadecimal. Version 2 images show the assumed values of the version 3
// fields; compression_type is shown for version 3. One line per decoded
// extension follows (backing format, data file, bitmaps, encryption
// header, unknown extensions), then one per bitmap, one per feature name
// table entry, and the backing file name.
func (h *Header) Fields() []Field {
	hex := func(v uint64) string { return fmt.Sprintf("%#x", v) }
	dec := func(v uint64) string { return fmt.Sprintf("%d", v) }
	fs := []Field{
		{"magic", hex(uint64(h.Magic))},
		{"version", dec(uint64(h.Version))},
		{"backing_file_offset", hex(h.BackingFileOffset)},
		{"backing_file_size", dec(uint64(h.BackingFileSize))},
		{"cluster_bits", dec(uint64(h.ClusterBits))},
		{"size", dec(h.Size)},
		{"crypt_method", dec(uint64(h.CryptMethod))},
		{"l1_size", dec(uint64(h.L1Size))},
		{"l1_table_offset", hex(h.L1TableOffset)},
		{"refcount_table_offset", hex(h.RefcountTableOffset)},
		{"refcount_table_clusters", dec(uint64(h.RefcountTableClusters))},
		{"nb_snapshots", dec(uint64(h.NbSnapshots))},
		{"snapshots_offset", hex(h.SnapshotsOffset)},
		{"incompatible_features", hex(h.IncompatibleFeatures)},
		{"compatible_features", hex(h.CompatibleFeatures)},
		{"autoclear_features", hex(h.AutoclearFeatures)},
		{"refcount_order", dec(uint64(h.RefcountOrder))},
		{"header_length", dec(uint64(h.HeaderLength))},
	}
	if h.Version >= 3 {
		fs = append(fs, Field{"compression_type", fmt.Sprintf("%d (%s)", h.CompressionType, h.CompressionTypeName())})
	}
	for _, e := range h.Extensions {
		switch e.Type {
		case extBackingFormat:
			fs = append(fs, Field{"backing_format", fmt.Sprintf("%q", h.BackingFormat)})
		case extDataFile:
			fs = append(fs, Field{"data_file", fmt.Sprintf("%q", h.DataFile)})
		case extBitmaps:
			fs = append(fs, Field{"bitmaps", fmt.Sprintf("nb_bitmaps %d, directory %d bytes at %#x", h.NbBitmaps, h.BitmapDirectorySize, h.BitmapDirectoryOffset)})
		case extCryptHeader:
			fs = append(fs, Field{"crypt_header", fmt.Sprintf("%d bytes at %#x", h.CryptHeaderLength, h.CryptHeaderOffset)})
		case extFeatureTable:
			// Listed below, one line per entry.
		default:
			fs = append(fs, Field{"extension", fmt.Sprintf("type %#08x, %d bytes at %#x", e.Type, e.Length, e.Offset)})
		}
	}
	for _, bm := range h.Bitmaps {
		fs = append(fs, Field{"bitmap", fmt.Sprintf("%q: granularity %d, flags %#x, table of %d entries at %#x",
			bm.Name, uint64(1)<<bm.GranularityBits, bm.Flags, bm.TableSize, bm.TableOffset)})
	}
	kinds := [...]string{"incompatible", "compatible", "autoclear"}
	for _, fn := range h.FeatureNames {
		kind := fmt.Sprintf("type %d", fn.Type)
		if int(fn.Type) < len(kinds) {
			kind = kinds[fn.Type]
		}
		fs = append(fs, Field{"feature_name", fmt.Sprintf("%s bit %d: %q", kind, fn.Bit, fn.Name)})
	}
	if h.BackingFileOffset != 0 {
		fs = append(fs, Field{"backing_file", fmt.Sprintf("%q", h.BackingFile)})
	}
	return fs
}
