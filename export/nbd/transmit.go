package nbd

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/export/nbd/internal/wire"
	"github.com/imgloop/imgloop/internal/bufpool"
)

// request is one transmission request as read from the socket.
type request struct {
	wire.Request
	effect  uint64   // the effect length (Length, or a block status payload's)
	payload []byte   // a write's data, from bufpool
	ids     []uint32 // block status: the contexts asked for (nil: all)
	cost    int64    // what it holds of the byte caps
	// reserved: cost came from the connection's reserve, not the total.
	reserved bool
}

// Flags each command accepts (FUA is valid on every command).
var allowedFlags = map[uint16]uint16{
	wire.CmdRead:        wire.CmdFlagFUA | wire.CmdFlagDF,
	wire.CmdWrite:       wire.CmdFlagFUA | wire.CmdFlagPayloadLen,
	wire.CmdDisc:        wire.CmdFlagFUA,
	wire.CmdFlush:       wire.CmdFlagFUA,
	wire.CmdTrim:        wire.CmdFlagFUA,
	wire.CmdCache:       wire.CmdFlagFUA,
	wire.CmdWriteZeroes: wire.CmdFlagFUA | wire.CmdFlagNoHole | wire.CmdFlagFastZero,
	wire.CmdBlockStatus: wire.CmdFlagFUA | wire.CmdFlagReqOne | wire.CmdFlagPayloadLen,
}

// errDisconnect ends the transmission phase without a reply: the client
// broke the protocol in a way that leaves the stream unreadable.
var errDisconnect = errors.New("nbd: hard disconnect")

// transmit serves requests until the client disconnects, the connection
// fails or the server stops. Each request runs on a worker and is
// answered when done, so replies leave out of order.
func (c *conn) transmit() {
	ctx := c.ctx // cancelled by fail, by a forced shutdown and below
	hdrLen := wire.RequestSize
	if c.extended {
		hdrLen = wire.ExtendedRequestSize
	}
	hdr := make([]byte, hdrLen)
	c.queue = make(chan pending, 4*maxInFlightPerConn)
	c.written = make(chan struct{})
	go c.writeLoop()
	// Requests run on workers that stay for the connection, so that their
	// stacks, grown once, are not grown again for every request; there are
	// never more than the requests in flight at once.
	work := make(chan *request)
	graceful := false // DISC or shutdown: finish what is in flight
	for {
		if _, err := io.ReadFull(c.br, hdr); err != nil {
			select {
			case <-c.stopping:
				graceful = true
			default:
				if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) && !errors.Is(err, io.ErrUnexpectedEOF) {
					c.logf("reading a request: %v", err)
				}
			}
			break
		}
		r, err := wire.DecodeRequest(hdr, c.extended)
		if err != nil {
			c.logf("%v", err)
			break
		}
		if r.Type == wire.CmdDisc {
			graceful = true
			break
		}
		req, err := c.readRequest(ctx, r)
		if err != nil {
			if !errors.Is(err, io.EOF) && !errors.Is(err, context.Canceled) {
				c.logf("%v", err)
			}
			break
		}
		if req == nil {
			continue // answered already
		}
		c.inflight.Add(1)
		select {
		case work <- req: // an idle worker takes it
		default:
			go c.worker(ctx, req, work)
		}
	}
	if !graceful {
		// The client is gone or broke the protocol: long work in
		// flight stops; writes already handed to the image complete.
		c.cancel()
	}
	c.inflight.Wait()
	close(work)
	close(c.queue)
	<-c.written
}

// worker serves req, then the requests it receives from work until work
// is closed.
func (c *conn) worker(ctx context.Context, req *request, work <-chan *request) {
	for ok := true; ok; req, ok = <-work {
		c.serveRequest(ctx, req)
	}
}

// serveRequest serves req and releases what it holds once its reply has
// left: until then it counts against the caps.
func (c *conn) serveRequest(ctx context.Context, req *request) {
	defer c.inflight.Done()
	c.handle(ctx, req)
	c.after(func() { c.release(req) })
}

// readRequest validates r, waits for room under the byte caps and reads
// its payload. It returns nil when it has answered r itself (an invalid
// request whose payload could be skipped), and an error when the
// connection must end.
func (c *conn) readRequest(ctx context.Context, r wire.Request) (*request, error) {
	req := &request{Request: r, effect: r.Length}
	limit := uint64(c.s.opts.MaxPayload)
	hasPayload := r.Type == wire.CmdWrite
	if c.extended {
		hasPayload = r.Flags&wire.CmdFlagPayloadLen != 0
		if hasPayload && r.Length > limit {
			return nil, fmt.Errorf("%w: %s with a payload of %d bytes, over the maximum %d", errDisconnect,
				cmdName(r.Type), r.Length, limit)
		}
	}
	var payloadLen uint64
	if hasPayload {
		payloadLen = r.Length
	}
	// Validate before reading the payload, so that an invalid request's
	// payload is skipped rather than buffered.
	if rerr := c.validate(req, payloadLen); rerr != nil {
		if err := c.skip(payloadLen); err != nil {
			return nil, err
		}
		c.replyError(req, rerr)
		return nil, nil
	}
	req.cost = minRequestCost
	switch r.Type {
	case wire.CmdRead:
		req.cost = max(req.cost, int64(r.Length))
	case wire.CmdBlockStatus:
		req.cost = max(req.cost, maxStatusReply(c.extended))
	}
	req.cost = max(req.cost, int64(payloadLen))
	if err := c.acquire(ctx, req); err != nil {
		return nil, err
	}
	if payloadLen == 0 {
		return req, nil
	}
	buf := bufpool.Get(int(payloadLen))
	if _, err := io.ReadFull(c.br, buf); err != nil {
		bufpool.Put(buf)
		c.releaseCost(req)
		return nil, err
	}
	if r.Type == wire.CmdWrite {
		req.payload = buf
		return req, nil
	}
	// The block status payload: an effect length and context IDs.
	defer bufpool.Put(buf)
	if rerr := c.parseStatusPayload(req, buf); rerr != nil {
		c.releaseCost(req)
		c.replyError(req, rerr)
		return nil, nil
	}
	return req, nil
}

// maxStatusReply bounds the reply to one block status request: two
// chunks of maxExtents descriptors.
func maxStatusReply(extended bool) int64 {
	return 2 * int64(wire.BlockStatusLen(maxExtents, extended))
}

// validate checks a request's flags, range and mode before its payload
// is read.
func (c *conn) validate(req *request, payloadLen uint64) *reqError {
	x := c.exp
	allowed, known := allowedFlags[req.Type]
	if !known {
		return invalid(fmt.Sprintf("unknown command %d", req.Type))
	}
	if !c.extended {
		allowed &^= wire.CmdFlagPayloadLen
	}
	if req.Type == wire.CmdRead && !c.structured {
		allowed &^= wire.CmdFlagDF
	}
	if req.Type == wire.CmdBlockStatus && !c.payloadForm() {
		allowed &^= wire.CmdFlagPayloadLen
	}
	if f := req.Flags &^ allowed; f != 0 {
		return invalid(fmt.Sprintf("%s: flags %#x are not valid", cmdName(req.Type), f))
	}
	limit := uint64(c.s.opts.MaxPayload)
	switch req.Type {
	case wire.CmdWrite:
		if c.extended && payloadLen == 0 {
			return invalid("NBD_CMD_WRITE without NBD_CMD_FLAG_PAYLOAD_LEN")
		}
		if req.Length > limit {
			return invalid(fmt.Sprintf("NBD_CMD_WRITE of %d bytes, over the maximum %d", req.Length, limit))
		}
	case wire.CmdRead:
		if req.Length > limit {
			if c.structured {
				return &reqError{wire.EOVERFLOW, fmt.Sprintf("NBD_CMD_READ of %d bytes, over the maximum %d", req.Length, limit)}
			}
			return invalid(fmt.Sprintf("NBD_CMD_READ of %d bytes, over the maximum %d", req.Length, limit))
		}
	case wire.CmdBlockStatus:
		if c.ctxAlloc == 0 && c.ctxDepth == 0 {
			return invalid("NBD_CMD_BLOCK_STATUS without a metadata context")
		}
		if payloadLen != 0 {
			// Checked when the payload is read.
			return nil
		}
	}
	if req.Type == wire.CmdFlush || req.Type == wire.CmdDisc {
		return nil
	}
	write := req.Type == wire.CmdWrite || req.Type == wire.CmdWriteZeroes || req.Type == wire.CmdTrim
	if write && x.caps.ReadOnly {
		return &reqError{wire.EPERM, "the export is read-only"}
	}
	return c.checkRange(req)
}

// checkRange checks that a request lies in the export and keeps its
// alignment.
func (c *conn) checkRange(req *request) *reqError {
	x := c.exp
	off, n := req.Offset, req.effect
	if off > uint64(x.size) || n > uint64(x.size)-off {
		msg := fmt.Sprintf("%s at %d+%d is past the end (%d)", cmdName(req.Type), off, n, x.size)
		if req.Type == wire.CmdWrite || req.Type == wire.CmdWriteZeroes {
			return &reqError{wire.ENOSPC, msg}
		}
		return invalid(msg)
	}
	if m := uint64(x.limits.MinTransfer); m > 1 && (off%m != 0 || n%m != 0) {
		return invalid(fmt.Sprintf("%s at %d+%d is not aligned to %d bytes", cmdName(req.Type), off, n, m))
	}
	if req.Type == wire.CmdBlockStatus && n == 0 {
		return invalid("NBD_CMD_BLOCK_STATUS of 0 bytes")
	}
	return nil
}

// payloadForm reports whether this connection may send block status
// payloads (NBD_FLAG_BLOCK_STATUS_PAYLOAD).
func (c *conn) payloadForm() bool {
	return c.extended && (c.ctxAlloc != 0 || c.ctxDepth != 0)
}

// parseStatusPayload parses a block status payload (an effect length
// and the context IDs to answer for) into req.
func (c *conn) parseStatusPayload(req *request, p []byte) *reqError {
	if len(p) < 12 || len(p)%4 != 0 {
		return invalid(fmt.Sprintf("block status payload of %d bytes", len(p)))
	}
	req.effect = binary.BigEndian.Uint64(p)
	var seen [3]bool
	for p = p[8:]; len(p) > 0; p = p[4:] {
		id := binary.BigEndian.Uint32(p)
		if id == 0 || id > 2 || (id == idAllocation && c.ctxAlloc == 0) || (id == idDepth && c.ctxDepth == 0) {
			return invalid(fmt.Sprintf("block status payload: context %d was not selected", id))
		}
		if seen[id] {
			return invalid(fmt.Sprintf("block status payload: context %d given twice", id))
		}
		seen[id] = true
		req.ids = append(req.ids, id)
	}
	return c.checkRange(req)
}

// skip reads and drops n payload bytes of a request that failed.
func (c *conn) skip(n uint64) error {
	if n == 0 {
		return nil
	}
	_, err := io.CopyN(io.Discard, c.br, int64(n))
	return err
}

// acquire takes room for req's cost and one request under the caps: the
// connection's first, then the server's, so that one connection cannot
// hold all of the server's. A request that fits in what is left of the
// connection's reserve (connReserve) does not count against the server's
// total, so that clients which hold their share of the total (readers
// that never read their replies, until WriteTimeout) cannot stop the
// others. It blocks (the connection stops reading requests:
// backpressure) until there is room or ctx is done.
func (c *conn) acquire(ctx context.Context, req *request) error {
	select {
	case c.slots <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	}
	if err := c.budget.Acquire(ctx, req.cost); err != nil {
		<-c.slots
		return err
	}
	if c.reserve.TryAcquire(req.cost) {
		req.reserved = true
		return nil
	}
	if err := c.s.total.Acquire(ctx, req.cost); err != nil {
		c.budget.Release(req.cost)
		<-c.slots
		return err
	}
	return nil
}

// releaseCost gives back what acquire took.
func (c *conn) releaseCost(req *request) {
	if req.reserved {
		c.reserve.Release(req.cost)
	} else {
		c.s.total.Release(req.cost)
	}
	c.budget.Release(req.cost)
	<-c.slots
}

// release frees what a served request held.
func (c *conn) release(req *request) {
	if req.payload != nil {
		bufpool.Put(req.payload)
		req.payload = nil
	}
	c.releaseCost(req)
}

// handle serves one request and sends its reply.
func (c *conn) handle(ctx context.Context, req *request) {
	x := c.exp
	img := x.Image
	off, n := int64(req.Offset), int64(req.effect)
	fua := req.Flags&wire.CmdFlagFUA != 0
	var err error
	switch req.Type {
	case wire.CmdRead:
		c.read(ctx, req)
		return
	case wire.CmdBlockStatus:
		c.blockStatus(ctx, req)
		return
	case wire.CmdWrite:
		var flags disk.WriteFlags
		if fua {
			flags |= disk.WriteFUA
		}
		_, err = disk.WriteAtFlags(img, req.payload, off, flags)
	case wire.CmdFlush:
		if x.caps.Flush {
			err = disk.FlushContext(ctx, img)
		}
	case wire.CmdTrim:
		if x.caps.Discard {
			err = disk.DiscardContext(ctx, img, off, n)
		}
		if err == nil && fua && x.caps.Flush {
			err = disk.FlushContext(ctx, img)
		}
	case wire.CmdWriteZeroes:
		err = c.writeZeroes(ctx, req)
	case wire.CmdCache:
		// Nothing to do: the host's page cache and the drivers' metadata
		// caches fill on the first read anyway.
	}
	write := req.Type == wire.CmdWrite || req.Type == wire.CmdWriteZeroes
	if err != nil {
		c.replyError(req, failWith(err, write))
		return
	}
	c.replyOK(req)
}

// writeZeroes serves NBD_CMD_WRITE_ZEROES.
func (c *conn) writeZeroes(ctx context.Context, req *request) error {
	x := c.exp
	off, n := int64(req.Offset), int64(req.effect)
	var flags disk.ZeroFlags
	if req.Flags&wire.CmdFlagNoHole != 0 {
		flags |= disk.ZeroNoUnmap
	}
	if req.Flags&wire.CmdFlagFUA != 0 {
		flags |= disk.ZeroFUA
	}
	if req.Flags&wire.CmdFlagFastZero != 0 {
		if !x.caps.Zero {
			return disk.ErrSlowZero
		}
		flags |= disk.ZeroFast
	}
	if x.caps.Zero {
		err := disk.ZeroContext(ctx, x.Image, off, n, flags)
		if !errors.Is(err, disk.ErrNotSupported) {
			return err
		}
		if flags&disk.ZeroFast != 0 {
			return disk.ErrSlowZero
		}
	}
	// The image cannot zero: write zero bytes.
	for n > 0 {
		if err := ctx.Err(); err != nil {
			return err
		}
		k := min(n, int64(len(zeros)))
		if _, err := x.Image.WriteAt(zeros[:k], off); err != nil {
			return err
		}
		off, n = off+k, n-k
	}
	if flags&disk.ZeroFUA != 0 {
		return disk.FlushContext(ctx, x.Image)
	}
	return nil
}

// zeros is what writeZeroes writes when the image cannot zero (never
// written to).
var zeros = make([]byte, 1<<20)

// sparseReadMin is the smallest structured read that is served from the
// image's allocation status, with NBD_REPLY_TYPE_OFFSET_HOLE chunks for
// the ranges that read as zeros; holeMin is the smallest such range sent
// as a hole rather than as data.
const (
	sparseReadMin = 64 << 10
	holeMin       = 32 << 10
)

// segment is a part of a read: data or a hole.
type segment struct {
	off, n int64
	hole   bool
}

// read serves NBD_CMD_READ.
func (c *conn) read(ctx context.Context, req *request) {
	x := c.exp
	off, n := int64(req.Offset), int64(req.Length)
	if n == 0 {
		c.replyOK(req)
		return
	}
	segs := []segment{{off, n, false}}
	if c.structured && req.Flags&wire.CmdFlagDF == 0 && n >= sparseReadMin && x.caps.Extents {
		segs = c.segments(ctx, off, n)
	}
	buf := bufpool.Get(int(n))
	defer c.after(func() { bufpool.Put(buf) })
	for _, s := range segs {
		if s.hole {
			continue
		}
		if _, err := x.Image.ReadAt(buf[s.off-off:s.off-off+s.n], s.off); err != nil {
			c.replyError(req, failWith(err, false))
			return
		}
	}
	if !c.structured {
		c.send(func(b []byte) []byte {
			return wire.AppendSimpleReply(b, 0, req.Cookie)
		}, buf)
		return
	}
	c.sendChunks(req, segs, buf, off)
}

// segments splits [off, off+n) into data and holes from the image's
// allocation status; holes shorter than holeMin join their neighbours
// as data. On error (the status is only a hint) it returns one data
// segment.
func (c *conn) segments(ctx context.Context, off, n int64) []segment {
	var segs []segment
	add := func(s segment) {
		if s.hole && s.n < holeMin {
			s.hole = false
		}
		if k := len(segs); k > 0 && segs[k-1].hole == s.hole {
			segs[k-1].n += s.n
			return
		}
		segs = append(segs, s)
	}
	err := disk.ExtentsContext(ctx, c.exp.Image, off, n, func(e disk.Extent) error {
		add(segment{e.Offset, e.Length, e.Status&disk.StatusZero != 0})
		return nil
	})
	if err != nil || len(segs) == 0 {
		return []segment{{off, n, false}}
	}
	// A short hole merged into data may have left two data segments
	// side by side; merge them.
	out := segs[:1]
	for _, s := range segs[1:] {
		if last := &out[len(out)-1]; last.hole == s.hole {
			last.n += s.n
			continue
		}
		out = append(out, s)
	}
	return out
}

// sendChunks sends a structured read reply: one chunk per segment, the
// last flagged done.
func (c *conn) sendChunks(req *request, segs []segment, buf []byte, off int64) {
	c.sendLocked(func() error {
		for i, s := range segs {
			ch := wire.Chunk{Cookie: req.Cookie, Offset: req.Offset}
			if i == len(segs)-1 {
				ch.Flags = wire.ReplyFlagDone
			}
			var err error
			if s.hole {
				ch.Type, ch.Length = wire.ReplyTypeOffsetHole, 12
				b := wire.AppendChunk(c.scratch[:0], ch, c.extended)
				b = wire.AppendOffsetHole(b, uint64(s.off), uint32(s.n))
				_, err = c.bw.Write(b)
			} else {
				ch.Type, ch.Length = wire.ReplyTypeOffsetData, 8+uint64(s.n)
				b := wire.AppendChunk(c.scratch[:0], ch, c.extended)
				b = binary.BigEndian.AppendUint64(b, uint64(s.off))
				if _, err = c.bw.Write(b); err == nil {
					_, err = c.bw.Write(buf[s.off-off : s.off-off+s.n])
				}
			}
			if err != nil {
				return err
			}
		}
		return nil
	})
}

// replyOK sends a successful reply without payload.
func (c *conn) replyOK(req *request) {
	if !c.structured {
		c.send(func(b []byte) []byte { return wire.AppendSimpleReply(b, 0, req.Cookie) }, nil)
		return
	}
	c.send(func(b []byte) []byte {
		return wire.AppendChunk(b, wire.Chunk{Flags: wire.ReplyFlagDone, Type: wire.ReplyTypeNone,
			Cookie: req.Cookie, Offset: req.Offset}, c.extended)
	}, nil)
}

// replyError sends a failed reply: a simple reply with the error, or an
// error chunk with its message.
func (c *conn) replyError(req *request, e *reqError) {
	if !c.structured {
		c.send(func(b []byte) []byte { return wire.AppendSimpleReply(b, e.errno, req.Cookie) }, nil)
		return
	}
	msg := e.msg
	if len(msg) > wire.MaxStringLen {
		msg = msg[:wire.MaxStringLen]
	}
	c.send(func(b []byte) []byte {
		b = wire.AppendChunk(b, wire.Chunk{Flags: wire.ReplyFlagDone, Type: wire.ReplyTypeError,
			Cookie: req.Cookie, Offset: req.Offset, Length: uint64(wire.ErrorHeaderLen + len(msg))}, c.extended)
		return wire.AppendErrorPayload(b, e.errno, msg)
	}, nil)
}

// send sends one reply: the header head appends, then payload.
func (c *conn) send(head func([]byte) []byte, payload []byte) {
	c.sendLocked(func() error {
		if _, err := c.bw.Write(head(c.scratch[:0])); err != nil {
			return err
		}
		if len(payload) > 0 {
			_, err := c.bw.Write(payload)
			return err
		}
		return nil
	})
}

// pending is a reply for the writer: write writes it to c.bw (nil: none),
// then done runs (nil: nothing), in the order they were queued.
type pending struct {
	write func() error
	done  func()
}

// sendLocked queues write, which writes one whole reply to c.bw, for the
// connection's writer, and returns at once: what the reply's closure
// uses must stay valid until a later after's function runs.
func (c *conn) sendLocked(write func() error) {
	c.queue <- pending{write: write}
}

// after runs fn on the writer once every reply queued before has been
// written (or dropped on a failed connection).
func (c *conn) after(fn func()) {
	c.queue <- pending{done: fn}
}

// writeLoop is the connection's writer: it writes the queued replies in
// order, flushing whenever no more are queued, so that replies that
// finish together leave in one system call, and no request waits for
// another's reply to be sent. A reply that cannot be sent within
// WriteTimeout fails the connection; the replies after it are dropped,
// their completions still run. It ends when the queue is closed.
func (c *conn) writeLoop() {
	defer close(c.written)
	ok := true     // the connection can still be written to
	dirty := false // c.bw holds unflushed replies
	check := func(err error) {
		if err != nil {
			c.logf("sending a reply: %v", err)
			c.fail()
			ok = false
		}
	}
	for p := range c.queue {
		if p.write != nil && ok {
			select {
			case <-c.failed: // a forced shutdown
				ok = false
			default:
				c.nc.SetWriteDeadline(time.Now().Add(c.s.opts.WriteTimeout))
				check(p.write())
				dirty = true
			}
		}
		if p.done != nil {
			p.done()
		}
		if dirty && ok && len(c.queue) == 0 {
			check(c.bw.Flush())
			dirty = false
		}
	}
	if dirty && ok {
		check(c.bw.Flush())
	}
}

// cmdName names a command for messages.
func cmdName(t uint16) string { return wire.CmdName(t) }

// maxExtents bounds the descriptors of one block status chunk (the spec
// asks for at most 2^20; fewer keep a reply near a MiB, and a client
// asks again from where it ended).
const maxExtents = 1 << 16

// errEnough stops an extent walk that has all it needs.
var errEnough = errors.New("enough extents")

// statusContext builds one context's descriptors.
type statusContext struct {
	id     uint32
	status func(disk.Extent) uint64
	ds     []wire.Descriptor
}

// add appends an extent, merging it into the last descriptor when the
// status is the same.
func (s *statusContext) add(e disk.Extent) {
	st := s.status(e)
	if k := len(s.ds); k > 0 && s.ds[k-1].Status == st {
		s.ds[k-1].Length += uint64(e.Length)
		return
	}
	s.ds = append(s.ds, wire.Descriptor{Length: uint64(e.Length), Status: st})
}

// allocationStatus is base:allocation's status of an extent.
func allocationStatus(e disk.Extent) uint64 {
	var st uint32
	if e.Status&disk.StatusData == 0 {
		st |= wire.StateHole
	}
	if e.Status&disk.StatusZero != 0 {
		st |= wire.StateZero
	}
	return uint64(st)
}

// depthStatus is qemu:allocation-depth's status of an extent: 1 for the
// image itself, 2 for its backing file, ..., 0 when no layer defines it.
func depthStatus(e disk.Extent) uint64 {
	if e.Status&disk.StatusAllocated == 0 {
		return 0
	}
	return uint64(e.Depth) + 1
}

// blockStatus serves NBD_CMD_BLOCK_STATUS: one chunk per selected (or
// asked for) context, walking the image's extents once.
func (c *conn) blockStatus(ctx context.Context, req *request) {
	var cs []*statusContext
	want := func(id uint32) bool {
		if req.ids == nil {
			return true
		}
		for _, w := range req.ids {
			if w == id {
				return true
			}
		}
		return false
	}
	if c.ctxAlloc != 0 && want(idAllocation) {
		cs = append(cs, &statusContext{id: idAllocation, status: allocationStatus})
	}
	if c.ctxDepth != 0 && want(idDepth) {
		cs = append(cs, &statusContext{id: idDepth, status: depthStatus})
	}
	one := req.Flags&wire.CmdFlagReqOne != 0
	off, n := int64(req.Offset), int64(req.effect)
	if !c.extended {
		// Compact descriptors have 32-bit lengths.
		n = min(n, 1<<32-int64(max(c.exp.limits.MinTransfer, 512)))
	}
	err := disk.ExtentsContext(ctx, c.exp.Image, off, n, func(e disk.Extent) error {
		done := true
		for _, s := range cs {
			if (one && len(s.ds) >= 2) || len(s.ds) > maxExtents {
				continue // this one has what it needs
			}
			s.add(e)
			done = false
		}
		if done {
			return errEnough
		}
		return nil
	})
	if err != nil && !errors.Is(err, errEnough) {
		c.replyError(req, failWith(err, false))
		return
	}
	for _, s := range cs {
		if one {
			s.ds = s.ds[:1]
		} else if len(s.ds) > maxExtents {
			s.ds = s.ds[:maxExtents]
		}
	}
	typ := wire.ReplyTypeBlockStatus
	if c.extended {
		typ = wire.ReplyTypeBlockStatusExt
	}
	c.sendLocked(func() error {
		for i, s := range cs {
			ch := wire.Chunk{Type: typ, Cookie: req.Cookie, Offset: req.Offset,
				Length: wire.BlockStatusLen(len(s.ds), c.extended)}
			if i == len(cs)-1 {
				ch.Flags = wire.ReplyFlagDone
			}
			b := wire.AppendChunk(c.scratch[:0], ch, c.extended)
			b = wire.AppendBlockStatus(b, s.id, s.ds, c.extended)
			c.scratch = b[:0]
			if _, err := c.bw.Write(b); err != nil {
				return err
			}
		}
		return nil
	})
}
