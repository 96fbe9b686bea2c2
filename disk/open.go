package disk

import (
	"errors"
	"fmt"
	"io"
	"path/filepath"

	"github.com/imgloop/imgloop/disk/hostfile"
)

// MaxChainDepth bounds a backing chain. QEMU sets no fixed bound; 256
// layers is far beyond real use and keeps a hostile chain from exhausting
// file descriptors or stack.
const MaxChainDepth = 256

// OpenOptions tune Open. The zero value opens read-write with the format
// probed and default cache sizes.
type OpenOptions struct {
	// Format names the driver; "" probes the image (Detect).
	Format string
	// ReadOnly opens the image (and so its host file) read-only.
	ReadOnly bool
	// Snapshot selects an internal snapshot by ID or name (qcow2); the
	// image is then opened read-only on that snapshot's view.
	Snapshot string
	// CacheSize bounds the driver's metadata cache in bytes (qcow2: the L2
	// slice cache); 0 picks the driver's default.
	CacheSize int64
	// NoBacking leaves the backing file unopened: ranges the image does
	// not define read as zeros and map as unallocated at depth 0. For
	// describing an image whose backing file is missing (qemu's
	// BDRV_O_NO_BACKING, as qemu-img info uses).
	NoBacking bool
	// Probed records that the format was detected rather than named. Open
	// sets it; drivers read it (raw refuses first-sector writes that would
	// change the probed format).
	Probed bool
	// Parents lists the absolute paths of the overlays that opened this
	// image as their backing file, outermost first. Drivers that open
	// backing files pass it on, with their own path appended, so that Open
	// can refuse loops and chains deeper than MaxChainDepth. nil for a
	// top-level open.
	Parents []string
}

// Open opens the image at path with the driver opts.Format names, or the
// one Detect picks. Errors: ErrUnknownFormat, *FormatError (ErrFormat),
// *UnsupportedError (ErrNotSupported), and the *fs.PathError of the host
// file.
func Open(path string, opts OpenOptions) (Image, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, err
	}
	if real, err := filepath.EvalSymlinks(abs); err == nil {
		abs = real
	}
	for _, p := range opts.Parents {
		if p == abs {
			return nil, &FormatError{Format: opts.Format, Offset: -1, What: fmt.Sprintf("backing chain loops back to %s", path)}
		}
	}
	if len(opts.Parents) > MaxChainDepth {
		return nil, &FormatError{Format: opts.Format, Offset: -1, What: fmt.Sprintf("backing chain deeper than %d", MaxChainDepth)}
	}
	f, err := hostfile.Open(path, opts.ReadOnly)
	if err != nil {
		return nil, err
	}
	img, err := OpenFile(f, opts)
	if err != nil {
		f.Close()
		return nil, err
	}
	return img, nil
}

// OpenFile opens the image held in f, as Open does. On success the image
// owns f; on error the caller still does.
func OpenFile(f File, opts OpenOptions) (Image, error) {
	var d Driver
	var err error
	if opts.Format != "" {
		d, err = Lookup(opts.Format)
	} else {
		var hdr [ProbeSize]byte
		n, rerr := f.ReadAt(hdr[:], 0)
		if rerr != nil && !errors.Is(rerr, io.EOF) {
			return nil, fmt.Errorf("disk: reading %s: %w", f.Name(), rerr)
		}
		d, err = Detect(hdr[:n])
		opts.Probed = true
	}
	if err != nil {
		return nil, err
	}
	return d.Open(f, opts)
}
