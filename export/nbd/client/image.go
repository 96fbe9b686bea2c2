package client

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/export/nbd/internal/wire"
)

// Conn implements disk.Image and the optional interfaces the exports use.
var (
	_ disk.Image      = (*Conn)(nil)
	_ disk.Limiter    = (*Conn)(nil)
	_ disk.Capabler   = (*Conn)(nil)
	_ disk.FUAWriter  = (*Conn)(nil)
	_ disk.Discarder  = (*Conn)(nil)
	_ disk.ZeroWriter = (*Conn)(nil)
	_ disk.Mapper     = (*Conn)(nil)
)

// BlockSize is the export's size constraints (NBD_INFO_BLOCK_SIZE; the
// spec's defaults when the server sent none).
type BlockSize struct {
	Minimum   uint32 // every request's offset and length are multiples of it
	Preferred uint32 // requests of multiples of it avoid read-modify-write
	Maximum   uint32 // the largest payload the server accepts
}

// Name returns the export's name (NBD_INFO_NAME, or the name asked for).
func (c *Conn) Name() string { return c.name }

// Description returns the export's description (NBD_INFO_DESCRIPTION),
// "" if none.
func (c *Conn) Description() string { return c.description }

// TransmissionFlags returns the export's transmission flags
// (NBD_FLAG_READ_ONLY, NBD_FLAG_SEND_FLUSH, ...: wire.Flag*).
func (c *Conn) TransmissionFlags() uint16 { return c.flags }

// BlockSize returns the export's size constraints.
func (c *Conn) BlockSize() BlockSize {
	return BlockSize{c.block.Minimum, c.block.Preferred, c.block.Maximum}
}

// StructuredReplies reports whether structured replies (or extended
// headers) were negotiated.
func (c *Conn) StructuredReplies() bool { return c.structured }

// ExtendedHeaders reports whether extended headers were negotiated.
func (c *Conn) ExtendedHeaders() bool { return c.extended }

// MetaContexts returns the metadata contexts the server selected, by
// name, with their IDs.
func (c *Conn) MetaContexts() map[string]uint32 {
	m := make(map[string]uint32, len(c.contexts))
	for id, name := range c.contexts {
		m[name] = id
	}
	return m
}

// hasContext reports whether the named context was selected.
func (c *Conn) hasContext(name string) bool {
	for _, n := range c.contexts {
		if n == name {
			return true
		}
	}
	return false
}

// Size returns the export's size in bytes.
func (c *Conn) Size() int64 { return int64(c.size) }

// SectorSize returns 512, or the minimum block size when larger.
func (c *Conn) SectorSize() int { return max(512, int(c.block.Minimum)) }

func (c *Conn) readOnly() bool { return c.flags&wire.FlagReadOnly != 0 }

// Limits returns the block limits (disk.Limiter) from the export's size
// constraints: MinTransfer the minimum block size, PreferredTransfer
// (and the discard and zero alignments) the preferred one, MaxTransfer
// the maximum payload rounded down to a power of two, at most 32 MiB.
func (c *Conn) Limits() disk.Limits {
	maxT := int64(1)
	for maxT*2 <= c.maxPayload {
		maxT *= 2
	}
	pref := int64(c.block.Preferred)
	return disk.Limits{
		MinTransfer:       int64(c.block.Minimum),
		PreferredTransfer: min(pref, maxT),
		MaxTransfer:       maxT,
		DiscardAlignment:  min(pref, maxT),
		ZeroAlignment:     min(pref, maxT),
	}
}

// Capabilities returns what the export does (disk.Capabler), from the
// transmission flags: ReadOnly from NBD_FLAG_READ_ONLY; for a writable
// export Flush from NBD_FLAG_SEND_FLUSH, FUA from NBD_FLAG_SEND_FUA,
// Discard from NBD_FLAG_SEND_TRIM, Zero from NBD_FLAG_SEND_WRITE_ZEROES
// with NBD_FLAG_SEND_FAST_ZERO; Extents when base:allocation and Depth
// when qemu:allocation-depth were selected.
func (c *Conn) Capabilities() disk.Capabilities {
	caps := disk.Capabilities{
		ReadOnly: c.readOnly(),
		Extents:  c.hasContext(wire.ContextBaseAllocation),
	}
	caps.Depth = caps.Extents && c.hasContext(wire.ContextAllocationDepth)
	if caps.ReadOnly {
		return caps
	}
	f := c.flags
	caps.Flush = f&wire.FlagSendFlush != 0
	caps.FUA = f&wire.FlagSendFUA != 0
	caps.Discard = f&wire.FlagSendTrim != 0
	caps.Zero = f&wire.FlagSendWriteZeroes != 0 && f&wire.FlagSendFastZero != 0
	return caps
}

// enter starts a public call, failing with disk.ErrClosed after Close.
func (c *Conn) enter() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return fmt.Errorf("nbd client: %w", disk.ErrClosed)
	}
	c.active.Add(1)
	return nil
}

func (c *Conn) leave() { c.active.Done() }

// errReadOnly is the error of a write to a read-only export.
func errReadOnly(op string) error {
	return fmt.Errorf("nbd client: %s: %w (NBD_FLAG_READ_ONLY)", op, disk.ErrReadOnly)
}

// maxEffect is the largest effect length of one request (trim, zero,
// cache, block status): 2 GiB with compact requests' 32-bit lengths (a
// multiple of every alignment), unbounded with extended headers.
func (c *Conn) maxEffect() int64 {
	if c.extended {
		return 1 << 62
	}
	return 1 << 31
}

// ReadAt reads len(p) bytes at off (io.ReaderAt), failing whole with
// disk.ErrOutOfRange past the end.
func (c *Conn) ReadAt(p []byte, off int64) (int, error) {
	return c.ReadAtContext(context.Background(), p, off)
}

// ReadAtContext is ReadAt with a context: when ctx is done first it
// returns ctx's error (p may then hold part of the data). Reads larger
// than the maximum payload are split, up to readAhead pieces in flight;
// reads unaligned to the minimum block size read the enclosing blocks.
// Errors: disk.ErrClosed, disk.ErrOutOfRange, an *Error, or the
// connection's (ErrDisconnected).
func (c *Conn) ReadAtContext(ctx context.Context, p []byte, off int64) (int, error) {
	if err := c.enter(); err != nil {
		return 0, err
	}
	defer c.leave()
	if err := disk.CheckRange(off, int64(len(p)), c.Size()); err != nil {
		return 0, fmt.Errorf("nbd client: read: %w", err)
	}
	if len(p) == 0 {
		return 0, nil
	}
	if err := c.readAligned(ctx, p, off); err != nil {
		return 0, err
	}
	return len(p), nil
}

// readAhead bounds the pieces of one split read in flight.
const readAhead = 8

// readAligned reads p at off, through the enclosing aligned range when
// off or len(p) is not a multiple of the minimum block size.
func (c *Conn) readAligned(ctx context.Context, p []byte, off int64) error {
	a, b := c.alignOut(off, int64(len(p)))
	if a == off && b == off+int64(len(p)) {
		return c.read(ctx, p, off)
	}
	buf := make([]byte, b-a)
	if err := c.read(ctx, buf, a); err != nil {
		return err
	}
	copy(p, buf[off-a:])
	return nil
}

// alignOut returns the range of whole minimum blocks around [off,
// off+n), cut at the export's end.
func (c *Conn) alignOut(off, n int64) (a, b int64) {
	m := int64(c.block.Minimum)
	a = off - off%m
	b = off + n
	if r := b % m; r != 0 {
		b += m - r
	}
	return a, min(b, c.Size())
}

// read reads p at off in pieces of at most the maximum payload.
func (c *Conn) read(ctx context.Context, p []byte, off int64) error {
	type piece struct {
		cl  *call
		buf []byte
	}
	var queue []piece
	var firstErr error
	collect := func(pc piece) {
		left, err := c.wait(ctx, pc.cl)
		if err == nil {
			copy(pc.buf, pc.cl.data)
		}
		if !left {
			pc.cl.release()
		}
		if err != nil && firstErr == nil {
			firstErr = err
		}
	}
	for done := 0; done < len(p) && firstErr == nil; {
		n := min(len(p)-done, int(c.maxPayload))
		var flags uint16
		cl, err := c.begin(ctx, wire.Request{Type: wire.CmdRead, Flags: flags, Offset: uint64(off) + uint64(done), Length: uint64(n)}, nil)
		if err != nil {
			firstErr = err
			break
		}
		queue = append(queue, piece{cl, p[done : done+n]})
		done += n
		if len(queue) >= readAhead {
			collect(queue[0])
			queue = queue[1:]
		}
	}
	for _, pc := range queue {
		collect(pc)
	}
	return firstErr
}

// WriteAt writes p at off (io.WriterAt), failing whole with
// disk.ErrOutOfRange past the end and disk.ErrReadOnly on a read-only
// export.
func (c *Conn) WriteAt(p []byte, off int64) (int, error) {
	return c.WriteAtContext(context.Background(), p, off, 0)
}

// WriteAtFUA is WriteAt with NBD_CMD_FLAG_FUA (disk.FUAWriter): the data
// is durable when it returns (through a flush when the server lacks
// NBD_FLAG_SEND_FUA).
func (c *Conn) WriteAtFUA(p []byte, off int64) (int, error) {
	return c.WriteAtContext(context.Background(), p, off, disk.WriteFUA)
}

// WriteAtContext writes p at off, with NBD_CMD_FLAG_FUA for
// disk.WriteFUA. Writes larger than the maximum payload are split and
// sent in order; writes unaligned to the minimum block size read the
// blocks at their ends first (serialized with other such writes). When
// ctx is done first it returns ctx's error, and the write may or may not
// have happened. Errors: disk.ErrClosed, disk.ErrReadOnly,
// disk.ErrOutOfRange, an *Error, or the connection's.
func (c *Conn) WriteAtContext(ctx context.Context, p []byte, off int64, flags disk.WriteFlags) (int, error) {
	if err := c.enter(); err != nil {
		return 0, err
	}
	defer c.leave()
	if c.readOnly() {
		return 0, errReadOnly("write")
	}
	if err := disk.CheckRange(off, int64(len(p)), c.Size()); err != nil {
		return 0, fmt.Errorf("nbd client: write: %w", err)
	}
	if len(p) == 0 {
		return 0, nil
	}
	if err := c.writeAligned(ctx, p, off, flags&disk.WriteFUA != 0); err != nil {
		return 0, err
	}
	return len(p), nil
}

// writeAligned writes p at off, as a read-modify-write of the enclosing
// minimum blocks when it is not aligned.
func (c *Conn) writeAligned(ctx context.Context, p []byte, off int64, fua bool) error {
	a, b := c.alignOut(off, int64(len(p)))
	if a == off && b == off+int64(len(p)) {
		return c.write(ctx, p, off, fua)
	}
	c.unaligned.Lock()
	defer c.unaligned.Unlock()
	buf := make([]byte, b-a)
	m := int64(c.block.Minimum)
	if a < off {
		if err := c.read(ctx, buf[:min(m, b-a)], a); err != nil {
			return err
		}
	}
	if end := off + int64(len(p)); end < b {
		t := max(a, b-m)
		t -= t % m
		if err := c.read(ctx, buf[t-a:], t); err != nil {
			return err
		}
	}
	copy(buf[off-a:], p)
	return c.write(ctx, buf, a, fua)
}

// write writes p at off in pieces of at most the maximum payload.
func (c *Conn) write(ctx context.Context, p []byte, off int64, fua bool) error {
	var flags uint16
	emulateFUA := false
	if fua {
		if c.flags&wire.FlagSendFUA != 0 {
			flags |= wire.CmdFlagFUA
		} else {
			emulateFUA = true
		}
	}
	if c.extended {
		flags |= wire.CmdFlagPayloadLen
	}
	for done := 0; done < len(p); {
		n := min(len(p)-done, int(c.maxPayload))
		cl, err := c.do(ctx, wire.Request{Type: wire.CmdWrite, Flags: flags, Offset: uint64(off) + uint64(done), Length: uint64(n)}, p[done:done+n])
		if err != nil {
			return err
		}
		cl.release()
		done += n
	}
	if emulateFUA {
		return c.flush(ctx)
	}
	return nil
}

// Flush makes every completed write durable (NBD_CMD_FLUSH). On a
// read-only export, or one without NBD_FLAG_SEND_FLUSH, it does nothing.
func (c *Conn) Flush() error { return c.FlushContext(context.Background()) }

// FlushContext is Flush with a context. Errors: disk.ErrClosed, an
// *Error, the connection's, or ctx's.
func (c *Conn) FlushContext(ctx context.Context) error {
	if err := c.enter(); err != nil {
		return err
	}
	defer c.leave()
	return c.flush(ctx)
}

func (c *Conn) flush(ctx context.Context) error {
	if c.readOnly() || c.flags&wire.FlagSendFlush == 0 {
		return nil
	}
	_, err := c.do(ctx, wire.Request{Type: wire.CmdFlush}, nil)
	return err
}

// ranged sends requests of type typ over [off, off+n) in pieces of at
// most maxEffect bytes.
func (c *Conn) ranged(ctx context.Context, typ, flags uint16, off, n int64) error {
	for n > 0 {
		k := min(n, c.maxEffect())
		if _, err := c.do(ctx, wire.Request{Type: typ, Flags: flags, Offset: uint64(off), Length: uint64(k)}, nil); err != nil {
			return err
		}
		off, n = off+k, n-k
	}
	return nil
}

// Discard sends NBD_CMD_TRIM for [off, off+n) (disk.Discarder): the
// server may deallocate it. The range is cut inwards to whole minimum
// blocks. Errors: disk.ErrClosed, disk.ErrReadOnly, disk.ErrOutOfRange,
// disk.ErrNotSupported (no NBD_FLAG_SEND_TRIM), an *Error, the
// connection's.
func (c *Conn) Discard(off, n int64) error { return c.Trim(context.Background(), off, n, false) }

// Trim is Discard with a context and, with fua, NBD_CMD_FLAG_FUA.
func (c *Conn) Trim(ctx context.Context, off, n int64, fua bool) error {
	if err := c.enter(); err != nil {
		return err
	}
	defer c.leave()
	if c.readOnly() {
		return errReadOnly("trim")
	}
	if err := disk.CheckRange(off, n, c.Size()); err != nil {
		return fmt.Errorf("nbd client: trim: %w", err)
	}
	if c.flags&wire.FlagSendTrim == 0 {
		return fmt.Errorf("nbd client: trim: %w (no NBD_FLAG_SEND_TRIM)", disk.ErrNotSupported)
	}
	m := int64(c.block.Minimum)
	a, b := off+(m-off%m)%m, off+n
	if b != c.Size() {
		b -= b % m
	}
	if b <= a {
		return nil
	}
	var flags uint16
	if fua && c.flags&wire.FlagSendFUA != 0 {
		flags |= wire.CmdFlagFUA
	}
	if err := c.ranged(ctx, wire.CmdTrim, flags, a, b-a); err != nil {
		return err
	}
	if fua && flags == 0 {
		return c.flush(ctx)
	}
	return nil
}

// WriteZeroes makes [off, off+n) read as zeros with NBD_CMD_WRITE_ZEROES
// (disk.ZeroWriter): disk.ZeroNoUnmap is NBD_CMD_FLAG_NO_HOLE,
// disk.ZeroFast NBD_CMD_FLAG_FAST_ZERO and disk.ZeroFUA
// NBD_CMD_FLAG_FUA. Unaligned ends (minimum block size > 1) are written
// as zero bytes, or with ZeroFast refused. Errors: disk.ErrClosed,
// disk.ErrReadOnly, disk.ErrOutOfRange, disk.ErrNotSupported (no
// NBD_FLAG_SEND_WRITE_ZEROES), disk.ErrSlowZero (ZeroFast: the server
// refused, or lacks NBD_FLAG_SEND_FAST_ZERO), an *Error, the
// connection's.
func (c *Conn) WriteZeroes(off, n int64, flags disk.ZeroFlags) error {
	return c.Zero(context.Background(), off, n, flags)
}

// Zero is WriteZeroes with a context. Ranges over maxEffect bytes are
// split, so that with ZeroFast a refusal may come after earlier pieces
// were zeroed.
func (c *Conn) Zero(ctx context.Context, off, n int64, flags disk.ZeroFlags) error {
	if err := c.enter(); err != nil {
		return err
	}
	defer c.leave()
	if c.readOnly() {
		return errReadOnly("write zeroes")
	}
	if err := disk.CheckRange(off, n, c.Size()); err != nil {
		return fmt.Errorf("nbd client: write zeroes: %w", err)
	}
	fast := flags&disk.ZeroFast != 0
	switch {
	case c.flags&wire.FlagSendWriteZeroes == 0 && fast:
		return fmt.Errorf("nbd client: write zeroes: %w (no NBD_FLAG_SEND_WRITE_ZEROES)", disk.ErrSlowZero)
	case c.flags&wire.FlagSendWriteZeroes == 0:
		return fmt.Errorf("nbd client: write zeroes: %w (no NBD_FLAG_SEND_WRITE_ZEROES)", disk.ErrNotSupported)
	case fast && c.flags&wire.FlagSendFastZero == 0:
		return fmt.Errorf("nbd client: write zeroes: %w (no NBD_FLAG_SEND_FAST_ZERO)", disk.ErrSlowZero)
	}
	if n == 0 {
		return nil
	}
	var f uint16
	if flags&disk.ZeroNoUnmap != 0 {
		f |= wire.CmdFlagNoHole
	}
	if fast {
		f |= wire.CmdFlagFastZero
	}
	fua := flags&disk.ZeroFUA != 0
	if fua && c.flags&wire.FlagSendFUA != 0 {
		f |= wire.CmdFlagFUA
	}
	m := int64(c.block.Minimum)
	a, b := off+(m-off%m)%m, off+n
	if b != c.Size() {
		b -= b % m
	}
	if b <= a {
		a, b = off, off
	}
	if a > off || b < off+n {
		if fast {
			return fmt.Errorf("nbd client: write zeroes at %d+%d: %w (not aligned to the minimum block size %d)", off, n, disk.ErrSlowZero, m)
		}
		for _, r := range [][2]int64{{off, a - off}, {b, off + n - b}} {
			if r[1] > 0 {
				if err := c.writeAligned(ctx, make([]byte, r[1]), r[0], false); err != nil {
					return err
				}
			}
		}
	}
	if b > a {
		if err := c.ranged(ctx, wire.CmdWriteZeroes, f, a, b-a); err != nil {
			return err
		}
	}
	if fua && f&wire.CmdFlagFUA == 0 || fua && a == b {
		return c.flush(ctx)
	}
	return nil
}

// Cache sends NBD_CMD_CACHE for [off, off+n): a hint that the range will
// be read. Errors: disk.ErrClosed, disk.ErrOutOfRange,
// disk.ErrNotSupported (no NBD_FLAG_SEND_CACHE), an *Error, the
// connection's.
func (c *Conn) Cache(ctx context.Context, off, n int64) error {
	if err := c.enter(); err != nil {
		return err
	}
	defer c.leave()
	if err := disk.CheckRange(off, n, c.Size()); err != nil {
		return fmt.Errorf("nbd client: cache: %w", err)
	}
	if c.flags&wire.FlagSendCache == 0 {
		return fmt.Errorf("nbd client: cache: %w (no NBD_FLAG_SEND_CACHE)", disk.ErrNotSupported)
	}
	return c.ranged(ctx, wire.CmdCache, 0, off, n)
}

// BlockStatus sends one NBD_CMD_BLOCK_STATUS for [off, off+n) (n is cut
// to 2 GiB without extended headers) and returns a chunk per selected
// metadata context; with reqOne (NBD_CMD_FLAG_REQ_ONE) each has one
// descriptor. The descriptors start at off and may cover less than n
// (the last may reach past it). Errors: disk.ErrClosed,
// disk.ErrOutOfRange, disk.ErrNotSupported (no metadata context
// selected), an *Error, the connection's.
func (c *Conn) BlockStatus(ctx context.Context, off, n int64, reqOne bool) ([]StatusChunk, error) {
	if err := c.enter(); err != nil {
		return nil, err
	}
	defer c.leave()
	return c.blockStatus(ctx, off, n, reqOne)
}

func (c *Conn) blockStatus(ctx context.Context, off, n int64, reqOne bool) ([]StatusChunk, error) {
	if err := disk.CheckRange(off, n, c.Size()); err != nil || n == 0 {
		if err == nil {
			err = fmt.Errorf("%w: block status of 0 bytes", disk.ErrOutOfRange)
		}
		return nil, fmt.Errorf("nbd client: block status: %w", err)
	}
	if len(c.contexts) == 0 {
		return nil, fmt.Errorf("nbd client: block status: %w (no metadata context selected)", disk.ErrNotSupported)
	}
	var flags uint16
	if reqOne {
		flags |= wire.CmdFlagReqOne
	}
	cl, err := c.do(ctx, wire.Request{Type: wire.CmdBlockStatus, Flags: flags, Offset: uint64(off), Length: uint64(min(n, c.maxEffect()))}, nil)
	if err != nil {
		return nil, err
	}
	if len(cl.status) != len(c.contexts) {
		return nil, fmt.Errorf("nbd client: block status: %w", protocolError("%d status chunks for %d contexts", len(cl.status), len(c.contexts)))
	}
	return cl.status, nil
}

// Map returns the extent at off (disk.Mapper), covering at most n bytes,
// from one NBD_CMD_BLOCK_STATUS with NBD_CMD_FLAG_REQ_ONE:
// base:allocation gives StatusData (not NBD_STATE_HOLE) and StatusZero
// (NBD_STATE_ZERO), qemu:allocation-depth, when selected,
// StatusAllocated and Depth (else data counts as allocated, at depth
// 0). Without base:allocation the whole range maps as data. Errors:
// disk.ErrClosed, disk.ErrOutOfRange, an *Error, the connection's.
func (c *Conn) Map(off, n int64) (disk.Extent, error) {
	return c.MapContext(context.Background(), off, n)
}

// MapContext is Map with a context.
func (c *Conn) MapContext(ctx context.Context, off, n int64) (disk.Extent, error) {
	if err := c.enter(); err != nil {
		return disk.Extent{}, err
	}
	defer c.leave()
	if err := disk.CheckRange(off, n, c.Size()); err != nil || n == 0 {
		if err == nil {
			err = fmt.Errorf("%w: map of 0 bytes", disk.ErrOutOfRange)
		}
		return disk.Extent{}, fmt.Errorf("nbd client: map: %w", err)
	}
	e := disk.Extent{Offset: off, Length: n, Status: disk.StatusData | disk.StatusAllocated, HostOffset: -1}
	if !c.hasContext(wire.ContextBaseAllocation) {
		return e, nil
	}
	chunks, err := c.blockStatus(ctx, off, n, true)
	if err != nil {
		return disk.Extent{}, err
	}
	e.Status = 0
	for _, ch := range chunks {
		d := ch.Descriptors[0]
		e.Length = min(e.Length, int64(d.Length))
		switch ch.Context {
		case wire.ContextBaseAllocation:
			if d.Status&uint64(wire.StateHole) == 0 {
				e.Status |= disk.StatusData
			}
			if d.Status&uint64(wire.StateZero) != 0 {
				e.Status |= disk.StatusZero
			}
		case wire.ContextAllocationDepth:
			if d.Status > 0 {
				e.Status |= disk.StatusAllocated
				e.Depth = int(min(d.Status-1, 1<<20))
			}
		}
	}
	if !c.hasContext(wire.ContextAllocationDepth) && e.Status&disk.StatusData != 0 {
		e.Status |= disk.StatusAllocated
	}
	if e.Status&disk.StatusData != 0 {
		// Data is defined by some layer, whatever the depth context said.
		e.Status |= disk.StatusAllocated
	}
	return e, nil
}

// Request is a request RawRequest sends as given.
type Request struct {
	Type   uint16 // wire.CmdRead, ...
	Flags  uint16 // command flags, sent as given
	Offset uint64
	// Length is the header's length field: the effect length, or the
	// payload length (NBD_CMD_WRITE; NBD_CMD_FLAG_PAYLOAD_LEN).
	Length uint64
	// Payload is sent after the header, whatever Length says.
	Payload []byte
}

// Reply is the reply RawRequest received.
type Reply struct {
	Data   []byte        // NBD_CMD_READ: the data read
	Status []StatusChunk // NBD_CMD_BLOCK_STATUS: a chunk per context
}

// RawRequest sends r as given, without the checks of the other methods
// (flags the server did not advertise, ranges past the end, lengths over
// the maximum, payloads of any length), and returns the reply: for
// tests of servers. The reply is still checked against r (a read's
// chunks must cover r.Length bytes), and a read is refused over 256 MiB
// (its reply is buffered). NBD_CMD_DISC returns once sent. Errors: an
// *Error for an error reply, disk.ErrClosed, ctx's, the connection's.
func (c *Conn) RawRequest(ctx context.Context, r Request) (Reply, error) {
	if err := c.enter(); err != nil {
		return Reply{}, err
	}
	defer c.leave()
	if r.Type == wire.CmdRead && r.Length > maxRawRead {
		return Reply{}, fmt.Errorf("nbd client: raw read of %d bytes, over the limit of %d", r.Length, maxRawRead)
	}
	req := wire.Request{Type: r.Type, Flags: r.Flags, Offset: r.Offset, Length: r.Length}
	if r.Type == wire.CmdDisc {
		cl, err := c.begin(ctx, req, r.Payload)
		if err == nil {
			c.mu.Lock()
			delete(c.pending, cl.req.Cookie)
			c.mu.Unlock()
		}
		return Reply{}, err
	}
	cl, err := c.do(ctx, req, r.Payload)
	if err != nil {
		return Reply{}, err
	}
	var rep Reply
	if cl.data != nil {
		rep.Data = append([]byte(nil), cl.data[:r.Length]...)
		cl.release()
	} else if r.Type == wire.CmdRead && r.Length > 0 {
		rep.Data = make([]byte, r.Length)
	}
	rep.Status = cl.status
	return rep, nil
}

// closeFlushTimeout bounds the flush of Close: a server that does not
// answer it must not hang the caller.
const closeFlushTimeout = 30 * time.Second

// Close ends the connection (disk.Image): it waits for the calls in
// flight, flushes a writable export (for at most closeFlushTimeout), sends NBD_CMD_DISC and closes the
// socket once the server has (or after a second). Calls after Close,
// and Close again, return disk.ErrClosed. It returns the flush's error.
func (c *Conn) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return fmt.Errorf("nbd client: %w", disk.ErrClosed)
	}
	c.closed = true
	c.mu.Unlock()
	c.active.Wait()
	ctx, cancel := context.WithTimeout(context.Background(), closeFlushTimeout)
	defer cancel()
	err := c.flush(ctx)
	c.mu.Lock()
	live := c.err == nil
	if live {
		c.err = errClosing
	}
	c.mu.Unlock()
	if live {
		c.wsem <- struct{}{}
		c.nc.SetWriteDeadline(time.Now().Add(time.Second))
		c.nc.Write(wire.AppendRequest(nil, wire.Request{Type: wire.CmdDisc}, c.extended))
		<-c.wsem
		c.nc.SetReadDeadline(time.Now().Add(time.Second))
	}
	<-c.done
	c.nc.Close()
	if errors.Is(err, errClosing) {
		err = nil
	}
	return err
}
