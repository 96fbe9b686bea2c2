package disk

// Info describes an open image the way `qemu-img info --output=json` does;
// the JSON tags are qemu-img's key names.
type Info struct {
	Format      string `json:"format"`
	VirtualSize int64  `json:"virtual-size"`
	// ClusterSize is 0 for formats without clusters.
	ClusterSize int64 `json:"cluster-size,omitempty"`
	// BackingFilename is the name as stored in the image.
	BackingFilename string `json:"backing-filename,omitempty"`
	// FullBackingFilename is BackingFilename resolved against the image's
	// folder.
	FullBackingFilename string `json:"full-backing-filename,omitempty"`
	// BackingFormat is the backing file's format, as stored or probed.
	BackingFormat string `json:"backing-filename-format,omitempty"`
	// DirtyFlag is the format's dirty bit.
	DirtyFlag bool       `json:"dirty-flag"`
	Snapshots []Snapshot `json:"snapshots,omitempty"`
	// FormatSpecific carries the driver's own fields; it marshals as
	// qemu-img's "format-specific" object ({"type": ..., "data": ...}).
	FormatSpecific *FormatSpecific `json:"format-specific,omitempty"`
}

// FormatSpecific is qemu-img info's "format-specific" object.
type FormatSpecific struct {
	Type string `json:"type"`
	Data any    `json:"data"`
}

// Snapshot is an internal snapshot as qemu-img info lists it.
type Snapshot struct {
	ID          string `json:"id"`
	Name        string `json:"name"`
	VMStateSize uint64 `json:"vm-state-size"`
	DateSec     int64  `json:"date-sec"`
	DateNsec    int64  `json:"date-nsec"`
	VMClockSec  int64  `json:"vm-clock-sec"`
	VMClockNsec int64  `json:"vm-clock-nsec"`
	// ICount is the guest instruction count, nil when the image does not
	// store it.
	ICount *uint64 `json:"icount,omitempty"`
	// VirtualSize is the disk size when the snapshot was taken (0 if the
	// image does not record it).
	VirtualSize int64 `json:"-"`
}

// Describer is implemented by images that can describe themselves for
// `imgloop info`.
type Describer interface {
	Info() Info
}

// Backinger is implemented by images that have a backing file; Backing
// returns it (nil if none). The returned image is owned by its overlay.
type Backinger interface {
	Backing() Image
}
