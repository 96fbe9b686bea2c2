package disk

import (
	"context"
	"errors"
	"fmt"
	"sync"
)

// The export API: what a server (NBD, FUSE, the loop device) needs to
// know of an open image beyond reading and writing it, and context-aware
// forms of the long operations.
//
// How an NBD server maps its commands onto it (export/nbd):
//
//	NBD_INFO_BLOCK_SIZE          Limits: MinTransfer, PreferredTransfer, MaxTransfer
//	NBD_FLAG_READ_ONLY           Capabilities.ReadOnly
//	NBD_FLAG_SEND_FLUSH          Capabilities.Flush; NBD_CMD_FLUSH: FlushContext
//	NBD_FLAG_SEND_FUA            always (WriteAtFlags falls back to a Flush)
//	NBD_FLAG_SEND_TRIM           Capabilities.Discard; NBD_CMD_TRIM: DiscardContext (+FUA: then FlushContext)
//	NBD_FLAG_SEND_WRITE_ZEROES   Capabilities.Zero (else the server writes zero bytes itself)
//	NBD_FLAG_SEND_FAST_ZERO      Capabilities.Zero; NBD_CMD_FLAG_FAST_ZERO: ZeroFast, ErrSlowZero -> NBD_ENOTSUP
//	NBD_CMD_WRITE (+FUA)         WriteAtFlags(..., WriteFUA)
//	NBD_CMD_WRITE_ZEROES         ZeroContext; NO_HOLE: ZeroNoUnmap; FUA: ZeroFUA; FAST_ZERO: ZeroFast
//	NBD_CMD_BLOCK_STATUS         ExtentsContext (base:allocation from Status, qemu:allocation-depth from Depth)
//	NBD_CMD_CACHE                ReadAt into a scratch buffer (or nothing)
//	resize (extension)           ResizeNotifier
//
// Errors map to NBD codes in one place in the server: ErrReadOnly ->
// NBD_EPERM, ErrOutOfRange -> NBD_EINVAL (NBD_ENOSPC for writes past the
// end), ErrSlowZero and ErrNotSupported -> NBD_ENOTSUP, anything else ->
// NBD_EIO.

// Limits are an open image's block limits: the request sizes and
// alignments it serves best and accepts (NBD_INFO_BLOCK_SIZE, FUSE
// max_write, the loop device's queue limits). Every size is in bytes; the
// transfer sizes and alignments are powers of two.
type Limits struct {
	// MinTransfer is the smallest request size and alignment the image
	// accepts for reads and writes (1: any byte range).
	MinTransfer int64
	// PreferredTransfer is the smallest size at which aligned requests
	// avoid a read-modify-write or a copy on write (a qcow2 cluster or
	// subcluster, a file system block).
	PreferredTransfer int64
	// MaxTransfer is the largest read or write the image serves in one
	// call without splitting it worse than the caller would.
	MaxTransfer int64
	// DiscardAlignment is the unit Discard deallocates: the parts of a
	// discarded range that do not cover a whole aligned unit are left as
	// they are.
	DiscardAlignment int64
	// DiscardMax is the largest range one Discard call should cover
	// (0: no limit; DiscardContext splits longer ranges anyway).
	DiscardMax int64
	// ZeroAlignment is the unit WriteZeroes zeroes without writing zero
	// bytes; unaligned heads and tails are written (or, with ZeroFast,
	// refused unless they read as zeros already).
	ZeroAlignment int64
	// ZeroMax is the largest range one WriteZeroes call should cover
	// (0: no limit).
	ZeroMax int64
}

// DefaultMaxTransfer is the MaxTransfer LimitsOf reports for an image that
// states none: NBD's 32 MiB, the largest payload every client and server
// must accept.
const DefaultMaxTransfer = 32 << 20

// Limiter is implemented by images that state their block limits.
type Limiter interface {
	Limits() Limits
}

// LimitsOf returns img's block limits, with NBD's defaults (minimum 1,
// preferred 4096, maximum DefaultMaxTransfer) for what it does not state,
// and discard and zero alignments defaulting to the preferred size.
func LimitsOf(img Image) Limits {
	var l Limits
	if li, ok := img.(Limiter); ok {
		l = li.Limits()
	}
	if l.MinTransfer <= 0 {
		l.MinTransfer = 1
	}
	if l.MaxTransfer <= 0 {
		l.MaxTransfer = DefaultMaxTransfer
	}
	if l.PreferredTransfer <= 0 {
		l.PreferredTransfer = max(min(4096, l.MaxTransfer), l.MinTransfer)
	}
	if l.DiscardAlignment <= 0 {
		l.DiscardAlignment = l.PreferredTransfer
	}
	if l.ZeroAlignment <= 0 {
		l.ZeroAlignment = l.PreferredTransfer
	}
	return l
}

// Capabilities say what an open image really does, whatever interfaces
// its type implements: a driver's type implements Discarder even when
// the image at hand was opened read-only. Exports advertise features from
// these, never from type assertions.
type Capabilities struct {
	// ReadOnly: WriteAt, Discard, WriteZeroes and Resize fail with
	// ErrReadOnly.
	ReadOnly bool
	// Flush: Flush does work (a writable image); a read-only image's
	// Flush succeeds without doing anything.
	Flush bool
	// Discard: Discard deallocates whole units of
	// Limits.DiscardAlignment.
	Discard bool
	// Zero: WriteZeroes zeroes aligned ranges without writing zero bytes,
	// and honours ZeroFast.
	Zero bool
	// FUA: WriteAtFlags with WriteFUA costs less than a write and a full
	// Flush (the driver makes just that write durable).
	FUA bool
	// Resize: Resize can change the virtual size of this image, and
	// ResizeNotifier reports it.
	Resize bool
	// Extents: Map reports real allocation (data, zeros, holes); without
	// it every range maps as data.
	Extents bool
	// Depth: Map reports which layer of a backing chain defines a range
	// (Extent.Depth, NBD's qemu:allocation-depth).
	Depth bool
}

// Capabler is implemented by images that state their capabilities.
type Capabler interface {
	Capabilities() Capabilities
}

// CapabilitiesOf returns img's capabilities. An image that does not state
// them is taken to be writable, with Discard and Zero where it implements
// Discarder and ZeroWriter, FUA where it implements FUAWriter, Resize
// where it implements Resizer and ResizeNotifier, and Extents where it
// implements Mapper. A read-only image never has Flush, Discard, Zero,
// FUA or Resize.
func CapabilitiesOf(img Image) Capabilities {
	var c Capabilities
	if cp, ok := img.(Capabler); ok {
		c = cp.Capabilities()
	} else {
		_, c.Discard = img.(Discarder)
		_, c.Zero = img.(ZeroWriter)
		_, c.FUA = img.(FUAWriter)
		_, r := img.(Resizer)
		_, n := img.(ResizeNotifier)
		c.Resize = r && n
		_, c.Extents = img.(Mapper)
		c.Flush = true
	}
	if c.ReadOnly {
		c.Flush, c.Discard, c.Zero, c.FUA, c.Resize = false, false, false, false, false
	}
	return c
}

// ErrSlowZero is returned by WriteZeroes with ZeroFast when zeroing the
// range would need zero bytes written (NBD_CMD_FLAG_FAST_ZERO's
// NBD_ENOTSUP). The image is unchanged. It does not match
// ErrNotSupported: a caller that would fall back to writing zeros on
// ErrNotSupported asked not to.
var ErrSlowZero = errors.New("zeroing would be no faster than writing zeros")

// WriteFlags modify WriteAtFlags.
type WriteFlags uint32

const (
	// WriteFUA makes the write durable before the call returns (forced
	// unit access, NBD_CMD_FLAG_FUA), as if Flush had followed it.
	WriteFUA WriteFlags = 1 << iota
)

// FUAWriter is implemented by images that can make one write durable
// more cheaply than by a full Flush.
type FUAWriter interface {
	// WriteAtFUA is WriteAt whose data is durable when it returns.
	WriteAtFUA(p []byte, off int64) (int, error)
}

// WriteAtFlags writes p at off as WriteAt does; with WriteFUA the data is
// durable when it returns: through img's WriteAtFUA, or WriteAt then
// Flush.
func WriteAtFlags(img Image, p []byte, off int64, flags WriteFlags) (int, error) {
	if flags&WriteFUA == 0 {
		return img.WriteAt(p, off)
	}
	if f, ok := img.(FUAWriter); ok {
		return f.WriteAtFUA(p, off)
	}
	n, err := img.WriteAt(p, off)
	if err != nil {
		return n, err
	}
	return n, img.Flush()
}

// ResizeNotifier is implemented by images that report changes of their
// virtual size, so that an export's device follows a resize made through
// another path (`imgloop resize` reaching an attached image's server).
type ResizeNotifier interface {
	// NotifyResize calls fn with the new size after each successful
	// Resize, from the goroutine that resized, once the new size is in
	// effect. stop removes fn; fn must not call back into stop.
	NotifyResize(fn func(size int64)) (stop func())
}

// SizeWatchers is a set of resize callbacks, for drivers that implement
// ResizeNotifier. The zero value is ready to use; it is safe for
// concurrent use.
type SizeWatchers struct {
	mu   sync.Mutex
	next int
	fns  map[int]func(int64)
}

// Add registers fn and returns the function that removes it (see
// ResizeNotifier).
func (w *SizeWatchers) Add(fn func(int64)) (stop func()) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.fns == nil {
		w.fns = map[int]func(int64){}
	}
	id := w.next
	w.next++
	w.fns[id] = fn
	return func() {
		w.mu.Lock()
		defer w.mu.Unlock()
		delete(w.fns, id)
	}
}

// Notify calls every registered function with size.
func (w *SizeWatchers) Notify(size int64) {
	w.mu.Lock()
	fns := make([]func(int64), 0, len(w.fns))
	for _, fn := range w.fns {
		fns = append(fns, fn)
	}
	w.mu.Unlock()
	for _, fn := range fns {
		fn(size)
	}
}

// opChunk is how much of a long zero or discard request ZeroContext and
// DiscardContext hand to the driver at once between checks of the
// context: large enough that the split costs nothing, small enough that a
// cancelled request stops within a fraction of a second.
const opChunk = 1 << 30

// ZeroContext is WriteZeroes for servers: it zeroes [off, off+n) in pieces
// of at most a GiB (and Limits.ZeroMax), aligned to Limits.ZeroAlignment,
// and stops with ctx's error between pieces when ctx is done. Only whole
// pieces are zeroed then. With ZeroFast the range is handed over in one
// call, so that a slow part fails it before anything changed; with
// ZeroFUA one Flush follows the last piece.
func ZeroContext(ctx context.Context, img Image, off, n int64, flags ZeroFlags) error {
	if flags&ZeroFast != 0 {
		if err := ctx.Err(); err != nil {
			return err
		}
		return WriteZeroes(img, off, n, flags)
	}
	l := LimitsOf(img)
	err := chunked(ctx, off, n, l.ZeroAlignment, l.ZeroMax, func(off, n int64) error {
		return WriteZeroes(img, off, n, flags&^ZeroFUA)
	})
	if err != nil || flags&ZeroFUA == 0 {
		return err
	}
	return FlushContext(ctx, img)
}

// DiscardContext is Discard for servers: it discards [off, off+n) in
// pieces as ZeroContext does, aligned to Limits.DiscardAlignment, and
// stops with ctx's error between pieces.
func DiscardContext(ctx context.Context, img Image, off, n int64) error {
	l := LimitsOf(img)
	return chunked(ctx, off, n, l.DiscardAlignment, l.DiscardMax, func(off, n int64) error {
		return Discard(img, off, n)
	})
}

// chunked calls fn on [off, off+n) in pieces of at most opChunk and limit
// (when > 0) bytes, cut at multiples of align, checking ctx before each.
func chunked(ctx context.Context, off, n, align, limit int64, fn func(off, n int64) error) error {
	step := int64(opChunk)
	if limit > 0 {
		step = min(step, limit)
	}
	if align > 0 && step > align {
		step -= step % align
	}
	end := off + n
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		next := end
		if end-off > step {
			next = off + step
			if align > 0 && next%align != 0 && next-next%align > off {
				next -= next % align
			}
		}
		if err := fn(off, next-off); err != nil {
			return err
		}
		if next == end {
			return nil
		}
		off = next
	}
}

// FlushContext is Flush for servers: it returns ctx's error as soon as
// ctx is done, leaving the flush to finish in the background (a flush
// cannot be stopped half way; Close waits for it).
func FlushContext(ctx context.Context, img Image) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if ctx.Done() == nil {
		return img.Flush()
	}
	done := make(chan error, 1)
	go func() { done <- img.Flush() }()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// ExtentsContext is Extents for servers: it stops with ctx's error when
// ctx is done, checking it before each Map call.
func ExtentsContext(ctx context.Context, img Image, off, n int64, fn func(Extent) error) error {
	return extents(ctx, img, off, n, fn)
}

// mapContextErr wraps a context error met while walking extents.
func mapContextErr(off int64, err error) error {
	return fmt.Errorf("disk: extents at %d: %w", off, err)
}
