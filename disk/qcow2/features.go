package qcow2

import (
	"fmt"
	"strings"

	"github.com/imgloop/imgloop/disk"
)

// Feature bits of the version 3 header (docs/interop/qcow2.txt, "Header").
const (
	// IncompatDirty (incompatible bit 0): refcounts may be inconsistent.
	IncompatDirty uint64 = 1 << 0
	// IncompatCorrupt (incompatible bit 1): metadata may be corrupt.
	IncompatCorrupt uint64 = 1 << 1
	// IncompatDataFile (incompatible bit 2): guest clusters live in an
	// external data file.
	IncompatDataFile uint64 = 1 << 2
	// IncompatCompression (incompatible bit 3): compression_type is not
	// zlib.
	IncompatCompression uint64 = 1 << 3
	// IncompatExtendedL2 (incompatible bit 4): L2 entries are 128 bits with
	// a subcluster bitmap.
	IncompatExtendedL2 uint64 = 1 << 4

	// CompatLazyRefcounts (compatible bit 0): lazy refcount updates.
	CompatLazyRefcounts uint64 = 1 << 0

	// AutoclearBitmaps (autoclear bit 0): the bitmaps extension is
	// consistent.
	AutoclearBitmaps uint64 = 1 << 0
	// AutoclearDataFileRaw (autoclear bit 1): the external data file is a
	// consistent raw image by itself.
	AutoclearDataFileRaw uint64 = 1 << 1
)

// knownIncompatible is every incompatible feature bit this package
// implements; an image with any other bit set is refused.
const knownIncompatible = IncompatDirty | IncompatCorrupt | IncompatDataFile | IncompatCompression | IncompatExtendedL2

// Feature types of the feature name table.
const (
	featureIncompatible = 0
	featureCompatible   = 1
	featureAutoclear    = 2
)

// ExtendedL2 reports whether L2 entries are extended (incompatible bit 4).
func (h *Header) ExtendedL2() bool { return h.IncompatibleFeatures&IncompatExtendedL2 != 0 }

// HasDataFile reports whether guest clusters live in an external data file
// (incompatible bit 2). DataFile holds its name when the image records it.
func (h *Header) HasDataFile() bool { return h.IncompatibleFeatures&IncompatDataFile != 0 }

// DataFileRaw reports whether the external data file is a valid raw image
// by itself (autoclear bit 1).
func (h *Header) DataFileRaw() bool { return h.AutoclearFeatures&AutoclearDataFileRaw != 0 }

// Dirty reports whether the dirty bit (incompatible bit 0) is set.
func (h *Header) Dirty() bool { return h.IncompatibleFeatures&IncompatDirty != 0 }

// Corrupt reports whether the corrupt bit (incompatible bit 1) is set.
func (h *Header) Corrupt() bool { return h.IncompatibleFeatures&IncompatCorrupt != 0 }

// LazyRefcounts reports whether the lazy refcounts bit (compatible bit 0)
// is set.
func (h *Header) LazyRefcounts() bool { return h.CompatibleFeatures&CompatLazyRefcounts != 0 }

// CompressionTypeName returns the compression type as qemu-img names it:
// "zlib" or "zstd" (readHeader refuses other types).
func (h *Header) CompressionTypeName() string {
	switch h.CompressionType {
	case compressionZlib:
		return "zlib"
	case compressionZstd:
		return "zstd"
	}
	return fmt.Sprintf("unknown (%d)", h.CompressionType)
}

// RefcountBits returns the width of a refcount entry in bits.
func (h *Header) RefcountBits() int { return 1 << h.RefcountOrder }

// featureNames names the bits of mask of feature type typ, from the
// image's feature name table where it has an entry, as "name (bit N)".
func (h *Header) featureNames(typ uint8, mask uint64) string {
	kind := [...]string{"incompatible", "compatible", "autoclear"}[typ]
	var names []string
	for bit := uint8(0); bit < 64; bit++ {
		if mask&(1<<bit) == 0 {
			continue
		}
		name := ""
		for _, fn := range h.FeatureNames {
			if fn.Type == typ && fn.Bit == bit && fn.Name != "" {
				name = fn.Name
				break
			}
		}
		if name != "" {
			names = append(names, fmt.Sprintf("%q (%s feature bit %d)", name, kind, bit))
		} else {
			names = append(names, fmt.Sprintf("unknown %s feature bit %d", kind, bit))
		}
	}
	return strings.Join(names, ", ")
}

// SpecificInfo is the qcow2 "format-specific" data of `qemu-img info`, with
// qemu-img's key names and order. The pointer fields are absent for
// version 2 images (and data-file-raw without an external data file), as
// in qemu-img's output.
type SpecificInfo struct {
	Compat          string       `json:"compat"`
	CompressionType string       `json:"compression-type"`
	LazyRefcounts   *bool        `json:"lazy-refcounts,omitempty"`
	Bitmaps         []BitmapInfo `json:"bitmaps,omitempty"`
	RefcountBits    int          `json:"refcount-bits"`
	DataFile        string       `json:"data-file,omitempty"`
	DataFileRaw     *bool        `json:"data-file-raw,omitempty"`
	Corrupt         *bool        `json:"corrupt,omitempty"`
	ExtendedL2      *bool        `json:"extended-l2,omitempty"`
}

// BitmapInfo is a persistent dirty bitmap as `qemu-img info` lists it.
type BitmapInfo struct {
	Flags       []string `json:"flags"` // "in-use", "auto"
	Name        string   `json:"name"`
	Granularity uint64   `json:"granularity"`
}

// FormatSpecific returns qemu-img info's "format-specific" object for the
// image: type "qcow2" with a *SpecificInfo.
func (h *Header) FormatSpecific() *disk.FormatSpecific {
	b := func(v bool) *bool { return &v }
	s := &SpecificInfo{
		Compat:          "0.10",
		CompressionType: h.CompressionTypeName(),
		RefcountBits:    h.RefcountBits(),
	}
	if h.Version >= 3 {
		s.Compat = "1.1"
		s.LazyRefcounts = b(h.LazyRefcounts())
		s.DataFile = h.DataFile
		if h.HasDataFile() {
			s.DataFileRaw = b(h.DataFileRaw())
		}
		s.Corrupt = b(h.Corrupt())
		s.ExtendedL2 = b(h.ExtendedL2())
	}
	for _, bm := range h.Bitmaps {
		flags := []string{}
		if bm.Flags&bitmapInUse != 0 {
			flags = append(flags, "in-use")
		}
		if bm.Flags&bitmapAuto != 0 {
			flags = append(flags, "auto")
		}
		s.Bitmaps = append(s.Bitmaps, BitmapInfo{Flags: flags, Name: bm.Name, Granularity: 1 << bm.GranularityBits})
	}
	return &disk.FormatSpecific{Type: formatName, Data: s}
}
