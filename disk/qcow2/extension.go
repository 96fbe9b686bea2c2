package qcow2

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"

	"github.com/imgloop/imgloop/disk"
)

// Header extension types (docs/interop/qcow2.txt, "Header extensions").
const (
	extEnd           = 0x00000000
	extBackingFormat = 0xe2792aca
	extFeatureTable  = 0x6803f857
	extBitmaps       = 0x23852875
	extCryptHeader   = 0x0537be77
	extDataFile      = 0x44415441
)

// Sizes of fixed-layout extension data.
const (
	featureNameEntrySize = 48
	bitmapsExtSize       = 24
	cryptHeaderExtSize   = 16
)

// extensionName returns a readable name for an extension type.
func extensionName(typ uint32) string {
	switch typ {
	case extBackingFormat:
		return "backing format"
	case extFeatureTable:
		return "feature name table"
	case extBitmaps:
		return "bitmaps"
	case extCryptHeader:
		return "full disk encryption header pointer"
	case extDataFile:
		return "external data file name"
	}
	return fmt.Sprintf("unknown extension %#08x", typ)
}

// readExtensions decodes the header extensions between header_length and
// end (the backing file name's offset, or the end of the first cluster).
// first holds the first cluster, or the whole file when it is shorter.
// Every extension must fit before end; unknown ones are recorded in
// Extensions and otherwise skipped.
func (h *Header) readExtensions(first []byte, end, fileSize int64) error {
	be := binary.BigEndian
	off := int64(h.HeaderLength)
	seen := map[uint32]bool{} // known types met so far
	for off < end {
		if end-off < 8 {
			return formatErr(off, "header extension at %#x: %d bytes left before %#x, too few for its type and length", off, end-off, end)
		}
		if off+8 > int64(len(first)) {
			return formatErr(off, "header extension at %#x reaches past the end of the file (%d bytes)", off, fileSize)
		}
		typ := be.Uint32(first[off:])
		length := be.Uint32(first[off+4:])
		if typ == extEnd {
			return nil
		}
		data := off + 8
		if int64(length) > end-data {
			return formatErr(off+4, "%s extension length %d at %#x runs past the end of the extension area (%#x)", extensionName(typ), length, data, end)
		}
		if data+int64(length) > int64(len(first)) {
			return formatErr(off+4, "%s extension (%d bytes at %#x) runs past the end of the file (%d bytes)", extensionName(typ), length, data, fileSize)
		}
		switch typ {
		case extBackingFormat, extBitmaps, extCryptHeader, extDataFile:
			// Each may appear once; unknown types are not checked (a
			// cluster can hold many of them: no quadratic scan here).
			if seen[typ] {
				return formatErr(off, "%s extension appears twice", extensionName(typ))
			}
			seen[typ] = true
		}
		h.Extensions = append(h.Extensions, Extension{Type: typ, Offset: data, Length: length})
		if err := h.decodeExtension(typ, first[data:data+int64(length)], data); err != nil {
			return err
		}
		// The data is padded to a multiple of 8 bytes.
		off = data + (int64(length)+7)&^7
	}
	return nil
}

// decodeExtension decodes one known extension's data p, found at file
// offset at.
func (h *Header) decodeExtension(typ uint32, p []byte, at int64) error {
	be := binary.BigEndian
	switch typ {
	case extBackingFormat:
		if len(p) > maxBackingFormatSize {
			return formatErr(at, "backing format name of %d bytes exceeds the limit of %d", len(p), maxBackingFormatSize)
		}
		h.BackingFormat = string(p)
	case extFeatureTable:
		// QEMU writes one table; entries of several are merged.
		for i := 0; i+featureNameEntrySize <= len(p); i += featureNameEntrySize {
			e := p[i : i+featureNameEntrySize]
			name := e[2:]
			if j := bytes.IndexByte(name, 0); j >= 0 {
				name = name[:j]
			}
			h.FeatureNames = append(h.FeatureNames, FeatureName{Type: e[0], Bit: e[1], Name: string(name)})
		}
	case extBitmaps:
		if len(p) != bitmapsExtSize {
			return formatErr(at, "bitmaps extension is %d bytes, want %d", len(p), bitmapsExtSize)
		}
		h.HasBitmaps = true
		h.NbBitmaps = be.Uint32(p)
		h.BitmapDirectorySize = be.Uint64(p[8:])
		h.BitmapDirectoryOffset = be.Uint64(p[16:])
		if h.AutoclearFeatures&AutoclearBitmaps == 0 {
			// A program without bitmap support wrote the image: the
			// bitmaps are inconsistent and ignored, as QEMU does.
			break
		}
		switch {
		case be.Uint32(p[4:]) != 0:
			return formatErr(at+4, "bitmaps extension: reserved field is not zero")
		case h.NbBitmaps == 0:
			return formatErr(at, "bitmaps extension with zero bitmaps")
		case h.NbBitmaps > maxBitmaps:
			return formatErr(at, "bitmaps extension: %d bitmaps exceed the limit of %d", h.NbBitmaps, maxBitmaps)
		case h.BitmapDirectorySize == 0 || h.BitmapDirectorySize > maxBitmapDirectorySize:
			return formatErr(at+8, "bitmap directory size %d out of range 1..%d", h.BitmapDirectorySize, maxBitmapDirectorySize)
		case h.BitmapDirectoryOffset%uint64(h.ClusterSize()) != 0 || h.BitmapDirectoryOffset == 0:
			return formatErr(at+16, "bitmap directory offset %#x is not a cluster aligned offset past the header", h.BitmapDirectoryOffset)
		}
	case extCryptHeader:
		if len(p) != cryptHeaderExtSize {
			return formatErr(at, "full disk encryption header pointer is %d bytes, want %d", len(p), cryptHeaderExtSize)
		}
		h.CryptHeaderOffset = be.Uint64(p)
		h.CryptHeaderLength = be.Uint64(p[8:])
	case extDataFile:
		h.DataFile = string(p)
	}
	return nil
}

// hasExtension reports whether an extension of type typ was found.
func (h *Header) hasExtension(typ uint32) bool {
	for _, e := range h.Extensions {
		if e.Type == typ {
			return true
		}
	}
	return false
}

// extensionOffset returns the file offset of the first extension of type
// typ, or -1.
func (h *Header) extensionOffset(typ uint32) int64 {
	for _, e := range h.Extensions {
		if e.Type == typ {
			return e.Offset
		}
	}
	return -1
}

// Bitmap limits: QEMU's (block/qcow2.h, qcow2-bitmap.c).
const (
	// maxBitmaps is QCOW2_MAX_BITMAPS.
	maxBitmaps = 65535
	// maxBitmapDirectorySize is QCOW2_MAX_BITMAP_DIRECTORY_SIZE.
	maxBitmapDirectorySize = 1024 * maxBitmaps
	// bitmapEntrySize is the fixed part of a bitmap directory entry.
	bitmapEntrySize = 24
	// maxBitmapNameSize is BME_MAX_NAME_SIZE.
	maxBitmapNameSize = 1023
	// Granularity bounds QEMU supports (BME_MIN/MAX_GRANULARITY_BITS).
	minBitmapGranularityBits = 9
	maxBitmapGranularityBits = 31
)

// Bitmap directory entry flags.
const (
	bitmapInUse           = 1 << 0
	bitmapAuto            = 1 << 1
	bitmapExtraDataCompat = 1 << 2
	bitmapReservedFlags   = ^uint32(bitmapInUse | bitmapAuto | bitmapExtraDataCompat)
)

// Bitmap is one entry of the bitmap directory (docs/interop/qcow2.txt,
// "Bitmap directory"). The bitmap's data is not read.
type Bitmap struct {
	Name            string
	TableOffset     uint64 // bitmap_table_offset
	TableSize       uint32 // bitmap_table_size, in entries
	Flags           uint32 // bit 0 in_use, bit 1 auto
	Type            uint8  // 1: dirty tracking bitmap
	GranularityBits uint8
}

// readBitmaps reads the bitmap directory into h.Bitmaps when the bitmaps
// extension is present and consistent (autoclear bit 0 set). The
// directory must lie inside the file and hold exactly nb_bitmaps entries
// that QEMU would accept.
func (h *Header) readBitmaps(f io.ReaderAt, fileSize int64) error {
	if !h.HasBitmaps || h.AutoclearFeatures&AutoclearBitmaps == 0 {
		return nil
	}
	at := h.extensionOffset(extBitmaps)
	off, size := h.BitmapDirectoryOffset, h.BitmapDirectorySize
	if off > uint64(fileSize) || size > uint64(fileSize)-off {
		return formatErr(at+16, "bitmap directory (%d bytes at %#x) extends past the end of the file (%d bytes)", size, off, fileSize)
	}
	// Read in chunks: size is bounded (64 MiB) but need not be allocated.
	r := &tableReader{f: f, name: "bitmap directory", limit: int64(off + size), fileSize: fileSize}
	be := binary.BigEndian
	for p := int64(off); p < int64(off+size); {
		if len(h.Bitmaps) == int(h.NbBitmaps) {
			return formatErr(p, "bitmap directory holds more than the %d bitmaps of the header extension", h.NbBitmaps)
		}
		e, err := r.bytes(p, bitmapEntrySize)
		if err != nil {
			return &disk.FormatError{Format: formatName, Offset: p, What: fmt.Sprintf("bitmap directory entry %d", len(h.Bitmaps)), Err: err}
		}
		b := Bitmap{
			TableOffset:     be.Uint64(e[0:]),
			TableSize:       be.Uint32(e[8:]),
			Flags:           be.Uint32(e[12:]),
			Type:            e[16],
			GranularityBits: e[17],
		}
		nameSize := int64(be.Uint16(e[18:]))
		if be.Uint32(e[20:]) != 0 {
			return formatErr(p+20, "bitmap %d: extra data is not supported", len(h.Bitmaps))
		}
		if nameSize == 0 || nameSize > maxBitmapNameSize {
			return formatErr(p+18, "bitmap %d: name size %d out of range 1..%d", len(h.Bitmaps), nameSize, maxBitmapNameSize)
		}
		// The entry, padded to 8 bytes, must end inside the directory.
		n := (bitmapEntrySize + nameSize + 7) &^ 7
		name, err := r.bytes(p+bitmapEntrySize, n-bitmapEntrySize)
		if err != nil {
			return &disk.FormatError{Format: formatName, Offset: p, What: fmt.Sprintf("bitmap directory entry %d", len(h.Bitmaps)), Err: err}
		}
		b.Name = string(name[:nameSize])
		switch {
		case b.Type != 1:
			return formatErr(p+16, "bitmap %q: type %d is not a dirty tracking bitmap", b.Name, b.Type)
		case b.GranularityBits < minBitmapGranularityBits || b.GranularityBits > maxBitmapGranularityBits:
			return formatErr(p+17, "bitmap %q: granularity_bits %d out of range %d..%d", b.Name, b.GranularityBits, minBitmapGranularityBits, maxBitmapGranularityBits)
		case b.Flags&bitmapReservedFlags != 0:
			return formatErr(p+12, "bitmap %q: reserved flags %#x set", b.Name, b.Flags&bitmapReservedFlags)
		}
		h.Bitmaps = append(h.Bitmaps, b)
		p += n
	}
	if len(h.Bitmaps) != int(h.NbBitmaps) {
		return formatErr(at, "bitmap directory holds %d bitmaps, the header extension says %d", len(h.Bitmaps), h.NbBitmaps)
	}
	return nil
}
