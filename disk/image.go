package disk

import (
	"context"
	"fmt"
	"io"
)

// Image is an open disk image: the virtual disk it presents, whatever the
// format on the host. ReadAt and WriteAt follow io.ReaderAt and io.WriterAt,
// except that a request reaching past Size is refused whole with
// ErrOutOfRange rather than served short (the virtual disk has a fixed
// size). An Image never keeps a caller's buffer.
//
// All methods are safe for concurrent use. Close waits for the calls in
// flight to finish; calls that start after it return ErrClosed.
type Image interface {
	io.ReaderAt
	io.WriterAt
	// Size is the virtual disk size in bytes.
	Size() int64
	// SectorSize is the logical sector size in bytes (512 for raw and qcow2).
	SectorSize() int
	// Flush makes every completed write durable on the host.
	Flush() error
	// Close flushes and releases the image and its host files.
	Close() error
}

// Discarder is implemented by images that can drop the data of a range
// (the seed's discard, NBD_CMD_TRIM). Discard deallocates the whole units
// of Limits.DiscardAlignment inside [off, off+n), which then read as zeros
// or as the backing file's data, as the format defines; the unaligned head
// and tail are left as they are. A discard never allocates data clusters
// and never writes zero bytes: callers that need the range to read as
// zeros use WriteZeroes.
type Discarder interface {
	Discard(off, n int64) error
}

// ZeroFlags modify WriteZeroes.
type ZeroFlags uint32

const (
	// ZeroNoUnmap forbids deallocating the range: it must stay allocated
	// (NBD's NBD_CMD_FLAG_NO_HOLE).
	ZeroNoUnmap ZeroFlags = 1 << iota
	// ZeroFast fails the call with ErrSlowZero, before changing anything,
	// when some part of the range would have to be written with zero
	// bytes (NBD_CMD_FLAG_FAST_ZERO).
	ZeroFast
	// ZeroFUA makes the zeroing durable before the call returns (forced
	// unit access, NBD_CMD_FLAG_FUA).
	ZeroFUA
)

// ZeroWriter is implemented by images that can make a range read as zeros
// more cheaply than by writing zero bytes. WriteZeroes honours every
// ZeroFlags flag.
type ZeroWriter interface {
	WriteZeroes(off, n int64, flags ZeroFlags) error
}

// Status flags describe an extent of the virtual disk.
type Status uint8

const (
	// StatusData: the range is backed by stored data (not a hole). Clear
	// for holes and for ranges that only read as zeros.
	StatusData Status = 1 << iota
	// StatusZero: the range is known to read as zeros.
	StatusZero
	// StatusAllocated: some layer of the image (this file or one in its
	// backing chain) defines the range; clear when it falls through every
	// layer ("present" in qemu-img map).
	StatusAllocated
)

// Extent is the allocation status of a run of the virtual disk (qemu-img
// map's schema).
type Extent struct {
	Offset int64  // start in the virtual disk
	Length int64  // bytes, > 0
	Status Status // what the range holds
	// Depth is the layer of the backing chain that defines the range:
	// 0 for the image itself, 1 for its backing file, and so on; the chain
	// length when no layer does.
	Depth int
	// HostOffset is where the data starts in the host file of that layer
	// (or its external data file), -1 when there is no single host offset
	// (holes, compressed clusters, zeros).
	HostOffset int64
	// HostFile names the host file that HostOffset refers to, "" if none.
	HostFile string
}

// Mapper is implemented by images that know their allocation status.
// Map returns the extent that starts at off, covering at most n bytes;
// off and n must lie within the disk.
type Mapper interface {
	Map(off, n int64) (Extent, error)
}

// Discard calls img's Discard, or returns ErrNotSupported.
func Discard(img Image, off, n int64) error {
	if d, ok := img.(Discarder); ok {
		return d.Discard(off, n)
	}
	return fmt.Errorf("discard: %w", ErrNotSupported)
}

// WriteZeroes calls img's WriteZeroes, or returns ErrNotSupported (callers
// may then fall back to writing zero bytes), or ErrSlowZero with
// ZeroFast.
func WriteZeroes(img Image, off, n int64, flags ZeroFlags) error {
	if z, ok := img.(ZeroWriter); ok {
		return z.WriteZeroes(off, n, flags)
	}
	if flags&ZeroFast != 0 {
		return fmt.Errorf("write zeroes: %w", ErrSlowZero)
	}
	return fmt.Errorf("write zeroes: %w", ErrNotSupported)
}

// Map returns img's extent at off (see Mapper). For images that are not
// Mappers it reports the whole range as allocated data at depth 0.
func Map(img Image, off, n int64) (Extent, error) {
	if m, ok := img.(Mapper); ok {
		return m.Map(off, n)
	}
	if err := CheckRange(off, n, img.Size()); err != nil {
		return Extent{}, err
	}
	return Extent{Offset: off, Length: n, Status: StatusData | StatusAllocated, HostOffset: -1}, nil
}

// Extents calls fn for each extent of img in [off, off+n), in order,
// merging adjacent extents that fn could not tell apart.
func Extents(img Image, off, n int64, fn func(Extent) error) error {
	return extents(context.Background(), img, off, n, fn)
}

// extents implements Extents and ExtentsContext.
func extents(ctx context.Context, img Image, off, n int64, fn func(Extent) error) error {
	var pending Extent
	end := off + n
	for off < end {
		if err := ctx.Err(); err != nil {
			return mapContextErr(off, err)
		}
		e, err := Map(img, off, end-off)
		if err != nil {
			return err
		}
		if e.Length <= 0 || e.Offset != off {
			return fmt.Errorf("disk: driver mapped offset %d to extent %+v", off, e)
		}
		off += e.Length
		if pending.Length > 0 && mergeable(pending, e) {
			pending.Length += e.Length
			continue
		}
		if pending.Length > 0 {
			if err := fn(pending); err != nil {
				return err
			}
		}
		pending = e
	}
	if pending.Length > 0 {
		return fn(pending)
	}
	return nil
}

func mergeable(a, b Extent) bool {
	if a.Status != b.Status || a.Depth != b.Depth || a.HostFile != b.HostFile {
		return false
	}
	if a.HostOffset < 0 || b.HostOffset < 0 {
		return a.HostOffset < 0 && b.HostOffset < 0
	}
	return a.HostOffset+a.Length == b.HostOffset
}
