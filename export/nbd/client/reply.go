package client

import (
	"encoding/binary"
	"fmt"
	"io"
	"sort"

	"github.com/imgloop/imgloop/export/nbd/internal/wire"
	"github.com/imgloop/imgloop/internal/bufpool"
)

// Bounds on the replies of the transmission phase.
const (
	// maxErrorChunk bounds an error chunk's payload: the error, a
	// message of at most wire.MaxStringLen bytes, an offset, and room
	// for the fields of error types the spec may add.
	maxErrorChunk = wire.ErrorHeaderLen + wire.MaxStringLen + 64
	// maxRawRead bounds the length of a read RawRequest sends: its
	// reply is buffered whole.
	maxRawRead = 256 << 20
)

// StatusChunk is one metadata context's part of a block status reply.
type StatusChunk struct {
	Context     string // the context's name, e.g. "base:allocation"
	ID          uint32 // the ID the server gave it
	Descriptors []Descriptor
}

// Descriptor is a block status descriptor: the length of an extent and
// its status flags (for base:allocation, wire.StateHole and
// wire.StateZero; for qemu:allocation-depth, the depth).
type Descriptor = wire.Descriptor

// chunk handles one structured or extended reply chunk for cl.
func (c *Conn) chunk(cl *call, ch wire.Chunk) error {
	cmd := wire.CmdName(cl.req.Type)
	if c.extended && ch.Offset != cl.req.Offset {
		return protocolError("%s at %d: reply chunk for offset %d", cmd, cl.req.Offset, ch.Offset)
	}
	done := ch.Flags&wire.ReplyFlagDone != 0
	if f := ch.Flags &^ wire.ReplyFlagDone; f != 0 {
		return protocolError("%s: reply chunk with unknown flags %#x", cmd, f)
	}
	var err error
	switch {
	case ch.Type == wire.ReplyTypeNone:
		if ch.Length != 0 || !done {
			return protocolError("%s: NBD_REPLY_TYPE_NONE with %d bytes, done=%v", cmd, ch.Length, done)
		}
	case ch.Type&wire.ReplyTypeFlagError != 0:
		err = c.errorChunk(cl, ch)
	case ch.Type == wire.ReplyTypeOffsetData || ch.Type == wire.ReplyTypeOffsetHole:
		err = c.contentChunk(cl, ch)
	case ch.Type == wire.ReplyTypeBlockStatus || ch.Type == wire.ReplyTypeBlockStatusExt:
		err = c.statusChunk(cl, ch)
	default:
		return protocolError("%s: unknown reply chunk type %d", cmd, ch.Type)
	}
	if err != nil {
		return err
	}
	if !done {
		return nil
	}
	if cl.nbdErr == nil {
		switch cl.req.Type {
		case wire.CmdRead:
			if cl.req.Length > 0 && (len(cl.covered) != 1 || cl.covered[0] != span{cl.req.Offset, cl.req.Offset + cl.req.Length}) {
				return protocolError("%s at %d+%d: reply done, but its chunks cover only %s", cmd, cl.req.Offset, cl.req.Length, spans(cl.covered))
			}
		case wire.CmdBlockStatus:
			if len(cl.status) == 0 {
				return protocolError("%s: reply done without a status chunk", cmd)
			}
		}
	}
	c.complete(cl)
	return nil
}

// spans formats covered ranges for messages.
func spans(s []span) string {
	if len(s) == 0 {
		return "nothing"
	}
	out := ""
	for i, r := range s {
		if i == 8 {
			return out + fmt.Sprintf(" and %d more", len(s)-8)
		}
		if i > 0 {
			out += ", "
		}
		out += fmt.Sprintf("[%d, %d)", r.off, r.end)
	}
	return out
}

// payload reads a chunk payload of n bytes, which the caller bounded.
func (c *Conn) payload(n uint64) ([]byte, error) {
	p := make([]byte, n)
	if _, err := io.ReadFull(c.br, p); err != nil {
		return nil, fmt.Errorf("reading a reply chunk: %w", err)
	}
	return p, nil
}

// errorChunk handles an error chunk.
func (c *Conn) errorChunk(cl *call, ch wire.Chunk) error {
	cmd := wire.CmdName(cl.req.Type)
	if ch.Length < wire.ErrorHeaderLen || ch.Length > maxErrorChunk {
		return protocolError("%s: error chunk of %d bytes", cmd, ch.Length)
	}
	p, err := c.payload(ch.Length)
	if err != nil {
		return err
	}
	errno, msg, rest, err := wire.DecodeErrorPayload(p)
	if err != nil {
		return fmt.Errorf("%s: %w", cmd, err)
	}
	e := c.newError(cl, errno, printable([]byte(msg)))
	switch ch.Type {
	case wire.ReplyTypeError:
		if len(rest) != 0 {
			return protocolError("%s: NBD_REPLY_TYPE_ERROR with %d bytes after the message", cmd, len(rest))
		}
	case wire.ReplyTypeErrorOffset:
		if len(rest) != 8 {
			return protocolError("%s: NBD_REPLY_TYPE_ERROR_OFFSET with %d bytes after the message, want 8", cmd, len(rest))
		}
		off := binary.BigEndian.Uint64(rest)
		if off < cl.req.Offset || off-cl.req.Offset >= max(cl.req.Length, 1) {
			return protocolError("%s at %d+%d: error at offset %d, outside the request", cmd, cl.req.Offset, cl.req.Length, off)
		}
		e.ErrorOffset = int64(off)
	}
	// Unknown error types count as errors; their extra fields are ignored.
	if cl.nbdErr == nil {
		cl.nbdErr = e
	}
	return nil
}

// contentChunk handles NBD_REPLY_TYPE_OFFSET_DATA and OFFSET_HOLE.
func (c *Conn) contentChunk(cl *call, ch wire.Chunk) error {
	cmd := wire.CmdName(cl.req.Type)
	if cl.req.Type != wire.CmdRead {
		return protocolError("%s: content chunk (type %d) in the reply", cmd, ch.Type)
	}
	var off, n uint64
	hole := ch.Type == wire.ReplyTypeOffsetHole
	if hole {
		if ch.Length != wire.OffsetHoleLen {
			return protocolError("%s: NBD_REPLY_TYPE_OFFSET_HOLE of %d bytes, want %d", cmd, ch.Length, wire.OffsetHoleLen)
		}
		p, err := c.payload(wire.OffsetHoleLen)
		if err != nil {
			return err
		}
		off, n = binary.BigEndian.Uint64(p), uint64(binary.BigEndian.Uint32(p[8:]))
		if n == 0 {
			return protocolError("%s: NBD_REPLY_TYPE_OFFSET_HOLE of 0 bytes", cmd)
		}
	} else {
		if ch.Length <= wire.OffsetDataHeaderLen || ch.Length-wire.OffsetDataHeaderLen > cl.req.Length ||
			ch.Length-wire.OffsetDataHeaderLen > uint64(max(c.maxPayload, maxRawRead)) {
			return protocolError("%s at %d+%d: NBD_REPLY_TYPE_OFFSET_DATA of %d bytes", cmd, cl.req.Offset, cl.req.Length, ch.Length)
		}
		p, err := c.payload(wire.OffsetDataHeaderLen)
		if err != nil {
			return err
		}
		off, n = binary.BigEndian.Uint64(p), ch.Length-wire.OffsetDataHeaderLen
	}
	if err := cl.cover(off, n); err != nil {
		return fmt.Errorf("%s: %w", cmd, err)
	}
	if cl.data == nil {
		cl.data = bufpool.Get(int(cl.req.Length))
	}
	b := cl.data[off-cl.req.Offset : off-cl.req.Offset+n]
	if hole {
		clear(b)
		return nil
	}
	if _, err := io.ReadFull(c.br, b); err != nil {
		return fmt.Errorf("reading a read's data: %w", err)
	}
	return nil
}

// cover records that a content chunk covered [off, off+n), checking
// that it lies in the request and overlaps no earlier chunk.
func (cl *call) cover(off, n uint64) error {
	lo, hi := cl.req.Offset, cl.req.Offset+cl.req.Length
	if off < lo || off > hi || n > hi-off {
		return protocolError("content chunk [%d, +%d) outside the request [%d, %d)", off, n, lo, hi)
	}
	if cl.df && cl.content > 0 {
		return protocolError("a second content chunk despite NBD_CMD_FLAG_DF")
	}
	cl.content++
	end := off + n
	i := sort.Search(len(cl.covered), func(i int) bool { return cl.covered[i].end > off })
	if i < len(cl.covered) && cl.covered[i].off < end {
		return protocolError("content chunk [%d, %d) overlaps an earlier one, [%d, %d)", off, end, cl.covered[i].off, cl.covered[i].end)
	}
	joinLeft := i > 0 && cl.covered[i-1].end == off
	joinRight := i < len(cl.covered) && cl.covered[i].off == end
	switch {
	case joinLeft && joinRight:
		cl.covered[i-1].end = cl.covered[i].end
		cl.covered = append(cl.covered[:i], cl.covered[i+1:]...)
	case joinLeft:
		cl.covered[i-1].end = end
	case joinRight:
		cl.covered[i].off = off
	default:
		cl.covered = append(cl.covered, span{})
		copy(cl.covered[i+1:], cl.covered[i:])
		cl.covered[i] = span{off, end}
	}
	return nil
}

// statusChunk handles NBD_REPLY_TYPE_BLOCK_STATUS and _EXT.
func (c *Conn) statusChunk(cl *call, ch wire.Chunk) error {
	cmd := wire.CmdName(cl.req.Type)
	if cl.req.Type != wire.CmdBlockStatus {
		return protocolError("%s: block status chunk in the reply", cmd)
	}
	if ext := ch.Type == wire.ReplyTypeBlockStatusExt; ext != c.extended {
		return protocolError("%s: block status chunk type %d, but extended headers are %v", cmd, ch.Type, c.extended)
	}
	if _, err := wire.BlockStatusCount(ch.Length, c.extended); err != nil {
		return fmt.Errorf("%s: %w", cmd, err)
	}
	p, err := c.payload(ch.Length)
	if err != nil {
		return err
	}
	id, ds, err := wire.DecodeBlockStatus(p, c.extended)
	if err != nil {
		return fmt.Errorf("%s: %w", cmd, err)
	}
	name, ok := c.contexts[id]
	if !ok {
		return protocolError("%s: block status for context ID %d, which was not selected", cmd, id)
	}
	for _, s := range cl.status {
		if s.ID == id {
			return protocolError("%s: two block status chunks for context %q", cmd, name)
		}
	}
	effect := cl.req.Length
	if cl.req.Flags&wire.CmdFlagPayloadLen != 0 {
		effect = cl.effect
	}
	if cl.req.Flags&wire.CmdFlagReqOne != 0 {
		if len(ds) != 1 || ds[0].Length > effect {
			return protocolError("%s with NBD_CMD_FLAG_REQ_ONE of %d bytes: %d descriptors, the first of %d bytes",
				cmd, effect, len(ds), ds[0].Length)
		}
	}
	var sum uint64
	for i, d := range ds[:len(ds)-1] {
		sum += d.Length
		if sum >= effect || sum < d.Length {
			return protocolError("%s of %d bytes: descriptors past the request before the last (descriptor %d)", cmd, effect, i)
		}
	}
	if !c.extended {
		// Compact lengths are 32-bit; nothing to check.
	} else if last := ds[len(ds)-1].Length; sum+last < sum {
		return protocolError("%s: descriptor lengths overflow", cmd)
	}
	cl.status = append(cl.status, StatusChunk{Context: name, ID: id, Descriptors: ds})
	return nil
}
