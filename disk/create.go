package disk

import (
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// ErrInvalidOption is matched by every error about a bad creation option:
// an unknown name, a malformed value, or a combination the format refuses.
var ErrInvalidOption = errors.New("invalid option")

// SizeFromBacking is the size to pass to Create to take the virtual size
// from the backing file (qemu-img create without SIZE).
const SizeFromBacking = -1

// MaxCreateSize is the largest virtual size Create accepts: the largest
// multiple of 512 an int64 holds (QEMU's limit).
const MaxCreateSize = math.MaxInt64 &^ 511

// CreateOptions tune Create.
type CreateOptions struct {
	// Options are the format's creation options (qemu-img create -o),
	// name to value as typed, with qemu-img's names: "cluster_size",
	// "compat", "backing_file", "backing_fmt", "preallocation", ... A
	// driver refuses names it does not know. "size" is handled by Create.
	Options map[string]string
	// Announce, if not nil, receives the one-line description qemu-img
	// prints before creating ("Formatting 'x.qcow2', fmt=qcow2 ..."),
	// once the options have been parsed and before they are checked
	// against each other.
	Announce func(line string)
	// Unsafe skips opening the backing file (qemu-img create -u): the
	// backing format and the size must then be given.
	Unsafe bool
}

// Creator is implemented by drivers that can create images. Create makes
// a new image of size bytes (SizeFromBacking: the backing file's size) at
// path, replacing any file there. It writes through the host file layer,
// syncs before returning and removes what it wrote on error. Errors about
// the options match ErrInvalidOption.
type Creator interface {
	Create(path string, size int64, opts CreateOptions) error
}

// Create creates an image of format at path with the registered driver
// (see Creator). A "size" entry in opts.Options gives the size when size
// is SizeFromBacking; giving both is an error.
func Create(format, path string, size int64, opts CreateOptions) error {
	d, err := Lookup(format)
	if err != nil {
		return err
	}
	c, ok := d.(Creator)
	if !ok {
		return &UnsupportedError{Format: format, Feature: "image creation"}
	}
	if size < 0 && size != SizeFromBacking {
		return fmt.Errorf("%w: negative image size %d", ErrInvalidOption, size)
	}
	if s, ok := opts.Options["size"]; ok {
		if size != SizeFromBacking {
			return fmt.Errorf("%w: the image size must be specified only once (size option and SIZE argument)", ErrInvalidOption)
		}
		n, err := ParseSize(s)
		if err != nil {
			return fmt.Errorf("%w: size: %v", ErrInvalidOption, err)
		}
		size = n
		m := make(map[string]string, len(opts.Options))
		for k, v := range opts.Options {
			if k != "size" {
				m[k] = v
			}
		}
		opts.Options = m
	}
	return c.Create(path, size, opts)
}

// ParseSize parses a size as qemu-img does: a decimal number, optionally
// with a fraction, and an optional suffix b, k, M, G, T, P or E (case
// insensitive, powers of 1024): "512", "64k", "1.5G". A fraction needs a
// suffix other than b; fractional bytes are dropped.
func ParseSize(s string) (int64, error) {
	num := strings.TrimSpace(s)
	mult := float64(1)
	if num != "" {
		if i := strings.IndexByte("bkmgtpe", lower(num[len(num)-1])); i >= 0 {
			mult = math.Pow(1024, float64(i))
			num = num[:len(num)-1]
		}
	}
	if num == "" || strings.IndexFunc(num, func(r rune) bool { return (r < '0' || r > '9') && r != '.' }) >= 0 {
		return 0, fmt.Errorf("invalid size %q (use a number with an optional k, M, G, T, P or E suffix)", s)
	}
	if strings.Contains(num, ".") {
		if mult == 1 {
			return 0, fmt.Errorf("invalid size %q: a fractional size needs a k, M, G, T, P or E suffix", s)
		}
		f, err := strconv.ParseFloat(num, 64)
		if err != nil {
			return 0, fmt.Errorf("invalid size %q", s)
		}
		v := f * mult
		if v >= math.MaxInt64 {
			return 0, fmt.Errorf("size %q is too large", s)
		}
		return int64(v), nil
	}
	n, err := strconv.ParseUint(num, 10, 64)
	if err != nil || float64(n)*mult >= math.MaxInt64 {
		return 0, fmt.Errorf("size %q is too large", s)
	}
	return int64(n) * int64(mult), nil
}

func lower(c byte) byte {
	if c >= 'A' && c <= 'Z' {
		return c + 'a' - 'A'
	}
	return c
}

// ParseBool parses an on/off option value as qemu-img does: on, yes,
// true or y; off, no, false or n.
func ParseBool(s string) (bool, error) {
	switch s {
	case "on", "yes", "true", "y":
		return true, nil
	case "off", "no", "false", "n":
		return false, nil
	}
	return false, fmt.Errorf("invalid value %q (want on or off)", s)
}

// Preallocation modes of the preallocation creation option.
const (
	PreallocOff      = "off"
	PreallocMetadata = "metadata"
	PreallocFalloc   = "falloc"
	PreallocFull     = "full"
)

// Allocate makes [off, off+n) of f allocated on the host: with full set
// by writing zeros, else with fallocate(2) (falling back to writing zeros
// where the host file or file system cannot). The file grows if the range
// ends past its end.
func Allocate(f File, off, n int64, full bool) error {
	if n <= 0 {
		return nil
	}
	if !full {
		if of, ok := f.(interface{ File() *os.File }); ok {
			err := unix.Fallocate(int(of.File().Fd()), 0, off, n)
			for err == unix.EINTR {
				err = unix.Fallocate(int(of.File().Fd()), 0, off, n)
			}
			if err == nil {
				return nil
			}
			if err != unix.EOPNOTSUPP && err != unix.ENOSYS {
				return &os.PathError{Op: "fallocate", Path: f.Name(), Err: err}
			}
		}
	}
	buf := make([]byte, min(n, 1<<20))
	for n > 0 {
		k := min(n, int64(len(buf)))
		if _, err := f.WriteAt(buf[:k], off); err != nil {
			return err
		}
		off += k
		n -= k
	}
	return nil
}

// ResolveName returns where a file name stored in an image at imagePath
// (a backing file or data file name) lies: an absolute name as is, a
// relative one in the image's folder.
func ResolveName(imagePath, name string) string {
	if filepath.IsAbs(name) {
		return name
	}
	return filepath.Join(filepath.Dir(imagePath), name)
}
