package disk

// Streaming creation: a new image written front to back in one pass, as
// `imgloop convert -O FMT` writes its destination.

// StreamCreator is implemented by drivers that can write a new image in
// one pass, one cluster at a time in increasing order (imgloop convert).
type StreamCreator interface {
	// CheckStream reports the error NewStream would return for an image
	// of size bytes with the creation options opts (qemu-img's names, as
	// CreateOptions.Options), without a file: callers check the options
	// before they create (and truncate) the destination.
	CheckStream(size int64, opts map[string]string) error
	// NewStream starts a new image of size bytes in f, which must be
	// empty (new or truncated). The image is complete once the writer is
	// closed; f is not closed.
	NewStream(f File, size int64, opts map[string]string) (StreamWriter, error)
}

// StreamWriter writes a new image one cluster at a time, in increasing
// guest order: clusters never written read as zeros, or through the
// image's backing file if it has one. It is the destination of
// convert.Clusters (a convert.ClusterWriter), and may implement
// convert.SubclusterWriter too. It is not safe for concurrent use, except
// Compress.
type StreamWriter interface {
	// ClusterSize returns the size of a cluster, a power of two.
	ClusterSize() int
	// WriteCluster stores guest cluster index (data: one cluster).
	WriteCluster(index int64, data []byte) error
	// WriteCompressed stores guest cluster index compressed: compressed
	// is the output of Compress.
	WriteCompressed(index int64, compressed []byte) error
	// WriteZero makes guest cluster index read as zeros without storing
	// data; an error matching ErrNotSupported means the image cannot.
	WriteZero(index int64) error
	// Compress appends data (one cluster) compressed to dst, or reports
	// false when compressing does not pay. It is safe for concurrent use.
	Compress(dst, data []byte) ([]byte, bool)
	// Close writes the image's metadata; the image is complete when it
	// returns nil.
	Close() error
}
