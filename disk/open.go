package disk

import (
	"errors"
	"fmt"
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
	// Format names the driver; "" probes the image (Probe).
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
	// ShareWrite lets other processes write to and resize the image
	// while this read-only open reads it, as far as the format allows:
	// a qcow2 file still refuses to be shared for writing (its metadata
	// would change under the driver), a raw file is shared as it is. It
	// is how qemu-img info, map and check open (a BlockBackend sharing
	// every permission); without it a read-only open refuses others'
	// writes, as qemu-img convert's source. Only for read-only opens.
	ShareWrite bool
	// ForceShare takes the image without refusing anything to others
	// (qemu-img -U, QEMU's force-share=on): other processes may write to
	// it, and what this open reads may then be inconsistent. The open
	// still takes the consistent-read permission, as QEMU does, so that
	// it conflicts only with a process that refuses to share even that.
	// It applies to the backing chain too. Only for read-only opens.
	ForceShare bool
	// Parents lists the absolute paths of the overlays that opened this
	// image as their backing file, outermost first. Drivers that open
	// backing files pass it on, with their own path appended, so that Open
	// can refuse loops and chains deeper than MaxChainDepth. nil for a
	// top-level open.
	Parents []string
}

// Open opens the image at path with the driver opts.Format names, or the
// one Probe picks, and locks its host files as QEMU does (see
// OpenOptions.Access and lock.go): the image file, the backing files
// (read-only, shared with other readers) and an external data file. The
// locks are released when the image is closed.
//
// Errors: ErrUnknownFormat, *FormatError (ErrFormat), *UnsupportedError
// and *UnsupportedFormatError (ErrNotSupported), *LockError (ErrLocked)
// when another process uses the
// image in a way that conflicts, an error for ForceShare or ShareWrite
// with a read-write open, and the *fs.PathError of the host file.
func Open(path string, opts OpenOptions) (Image, error) {
	if _, err := opts.Access(); err != nil {
		return nil, err
	}
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
// owns f; on error the caller still does. When f is a host file that locks
// (a *hostfile.OSFile) OpenFile takes its locks as Open does, and releases
// them again on error; other files (in-memory test files, a caller's own
// wrapper) are not locked: locking them is left to the caller.
func OpenFile(f File, opts OpenOptions) (Image, error) {
	d, err := driverFor(f, &opts)
	if err != nil {
		return nil, err
	}
	unlock, err := lockImageFile(f, d, opts)
	if err != nil {
		return nil, err
	}
	img, err := d.Open(f, opts)
	if err != nil {
		unlock()
		return nil, nameFile(err, f.Name())
	}
	return img, nil
}

// nameFile gives an *UnsupportedFormatError in err the file's name when
// it has none: a driver refusing a version of its format ("unsupported
// qcow2 version 4") does not know it. It returns err.
func nameFile(err error, name string) error {
	var ufe *UnsupportedFormatError
	if errors.As(err, &ufe) && ufe.Path == "" {
		ufe.Path = name
	}
	return err
}

// driverFor returns the driver opts.Format names, or the one that
// detects f (setting opts.Probed).
func driverFor(f File, opts *OpenOptions) (Driver, error) {
	var d Driver
	var err error
	if opts.Format != "" {
		d, err = Lookup(opts.Format)
	} else {
		d, err = Probe(f)
		opts.Probed = true
	}
	if err != nil {
		return nil, err
	}
	return d, nil
}
