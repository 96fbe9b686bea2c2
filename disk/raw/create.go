package raw

import (
	"fmt"
	"os"
	"strconv"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/disk/hostfile"
)

// Create makes a raw image of size bytes (rounded up to 512) at path, as
// qemu-img create -f raw does. The one option is preallocation: off (a
// sparse file, the default), falloc (fallocate(2)) or full (zeros
// written). Backing files are refused. It implements disk.Creator.
func (Driver) Create(path string, size int64, opts disk.CreateOptions) error {
	prealloc := ""
	for k, v := range opts.Options {
		switch k {
		case "preallocation":
			prealloc = v
		case "backing_file", "backing_fmt":
			return fmt.Errorf("raw: %w: backing file not supported for file format 'raw'", disk.ErrInvalidOption)
		default:
			return fmt.Errorf("raw: %w: unknown parameter %q", disk.ErrInvalidOption, k)
		}
	}
	if size == disk.SizeFromBacking {
		return fmt.Errorf("raw: %w: image creation needs a size", disk.ErrInvalidOption)
	}
	if size < 0 || size > disk.MaxCreateSize {
		return fmt.Errorf("raw: %w: image size %d out of range", disk.ErrInvalidOption, size)
	}
	if opts.Announce != nil {
		line := fmt.Sprintf("Formatting '%s', fmt=raw size=%d", path, size)
		if prealloc != "" {
			line += " preallocation=" + prealloc
		}
		opts.Announce(line)
	}
	switch prealloc {
	case "", disk.PreallocOff, disk.PreallocFalloc, disk.PreallocFull:
	default:
		return fmt.Errorf("raw: %w: unsupported preallocation mode %s (want off, falloc or full)", disk.ErrInvalidOption, strconv.Quote(prealloc))
	}
	size = (size + sectorSize - 1) &^ (sectorSize - 1)
	f, err := hostfile.Create(path)
	if err != nil {
		return err
	}
	err = fill(f, size, prealloc)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(path)
		return fmt.Errorf("raw: creating %s: %w", path, err)
	}
	return nil
}

// fill sizes the new file and preallocates it.
func fill(f disk.File, size int64, prealloc string) error {
	if err := f.Truncate(size); err != nil {
		return err
	}
	if prealloc == disk.PreallocFalloc || prealloc == disk.PreallocFull {
		if err := disk.Allocate(f, 0, size, prealloc == disk.PreallocFull); err != nil {
			return err
		}
	}
	return f.Sync()
}
