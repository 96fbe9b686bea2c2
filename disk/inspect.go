package disk

// Inspection: what the seed's debugfs files "header" and "offset" showed,
// for `imgloop info --header` and `imgloop map --offset`.

// Field is one named header value, for display.
type Field struct {
	Name, Value string
}

// HeaderFielder is implemented by images whose format has a header to
// show (the seed's debugfs "header" file, `imgloop info --header`).
type HeaderFielder interface {
	// HeaderFields returns the header's fields in on-disk order, with
	// the format specification's names.
	HeaderFields() []Field
}

// Location is where one byte of the virtual disk is stored, for
// `imgloop map --offset`.
type Location struct {
	Offset int64 // the guest offset asked about
	// ClusterType is "unallocated", "zero", "normal" or "compressed" in
	// the layer that serves the offset (for a layer of another format:
	// "normal" for data, "zero" or "unallocated" otherwise).
	ClusterType string
	// HostClusterOffset is the host offset of the cluster (for compressed
	// clusters: of the compressed data), -1 if none.
	HostClusterOffset int64
	// OffsetInCluster is the offset's position in its guest cluster.
	OffsetInCluster int64
	// CompressedLength is how many bytes the compressed descriptor spans
	// (0 unless compressed).
	CompressedLength int64
	// Depth is the layer of the backing chain that serves the offset (0:
	// this image); for an offset no layer defines, the depth of the last
	// layer, or of the layer whose backing file ends before the offset.
	Depth int
	// File names the host file holding the data ("" if none).
	File string
}

// Locator is implemented by images that can tell where one byte of the
// virtual disk is stored, cluster by cluster (the seed's debugfs "offset"
// file, `imgloop map --offset`). Images without it are described by the
// extent that holds the byte (Map).
type Locator interface {
	// Locate returns where the byte at guest offset off is stored,
	// following the backing chain to the layer that defines it. Errors
	// match ErrOutOfRange for an offset outside the disk, ErrClosed
	// after Close.
	Locate(off int64) (Location, error)
}
