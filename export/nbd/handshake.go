package nbd

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"time"

	"golang.org/x/sync/semaphore"

	"github.com/imgloop/imgloop/export/nbd/internal/wire"
)

// conn is one client connection.
type conn struct {
	s  *Server
	nc net.Conn // the socket, or the TLS connection over it
	br *bufio.Reader

	// Negotiated during the handshake.
	noZeroes   bool
	tlsDone    bool
	structured bool
	extended   bool
	metaExport string // the export the meta contexts were set for
	ctxAlloc   uint32 // base:allocation's context ID, 0 if not selected
	ctxDepth   uint32 // qemu:allocation-depth's, 0 if not selected
	exp        *export

	// Transmission.
	ctx      context.Context // the requests' context
	cancel   context.CancelFunc
	bw       *replyWriter
	scratch  []byte              // reply headers, used by the writer only
	queue    chan pending        // replies and their completions, to the writer
	written  chan struct{}       // closed when the writer is done
	slots    chan struct{}       // one per request in flight
	budget   *semaphore.Weighted // MaxConnBytes
	reserve  *semaphore.Weighted // connReserve, outside MaxTotalBytes
	inflight sync.WaitGroup
	stopOnce sync.Once
	stopping chan struct{} // closed by stop (server shutdown)
	failed   chan struct{} // closed when a reply could not be sent
	failOnce sync.Once
}

func newConn(s *Server, nc net.Conn) *conn {
	ctx, cancel := context.WithCancel(context.Background())
	return &conn{s: s, nc: nc, br: bufio.NewReaderSize(nc, 64<<10), bw: newReplyWriter(nc),
		ctx: ctx, cancel: cancel, scratch: make([]byte, 0, 8<<10), slots: make(chan struct{}, maxInFlightPerConn),
		budget: semaphore.NewWeighted(s.opts.MaxConnBytes), reserve: semaphore.NewWeighted(connReserve), stopping: make(chan struct{}), failed: make(chan struct{})}
}

// stop asks the connection to end (Shutdown): a handshake ends at
// once, a transmission after the requests in flight.
func (c *conn) stop() {
	c.stopOnce.Do(func() {
		close(c.stopping)
		// Wake the reader: a handshake ends, a transmission stops
		// taking requests.
		c.nc.SetReadDeadline(time.Now())
	})
}

// fail ends the connection after a reply could not be sent.
func (c *conn) fail() {
	c.failOnce.Do(func() {
		close(c.failed)
		c.cancel()
		c.nc.Close()
	})
}

func (c *conn) logf(format string, args ...any) {
	c.s.logf("%s: %s", c.nc.RemoteAddr(), fmt.Sprintf(format, args...))
}

// serve runs the handshake and then the transmission phase.
func (c *conn) serve() {
	defer c.nc.Close()
	c.nc.SetDeadline(time.Now().Add(c.s.opts.HandshakeTimeout))
	select {
	case <-c.stopping: // stopped before the deadline above was set
		return
	default:
	}
	ok, err := c.handshake()
	if err != nil {
		if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
			c.logf("handshake: %v", err)
		}
		return
	}
	if !ok {
		return // the client aborted
	}
	c.nc.SetDeadline(time.Time{})
	select {
	case <-c.stopping:
		return
	default:
	}
	c.transmit()
	if c.s.opts.OnConnClose != nil {
		c.s.opts.OnConnClose()
	}
}

// errAbort ends a handshake the client aborted.
var errAbort = errors.New("nbd: client aborted")

// handshake runs the fixed newstyle negotiation. It reports whether
// transmission should start (false: the client aborted).
func (c *conn) handshake() (bool, error) {
	var hello []byte
	hello = binary.BigEndian.AppendUint64(hello, wire.MagicNBD)
	hello = binary.BigEndian.AppendUint64(hello, wire.MagicIHaveOpt)
	hello = binary.BigEndian.AppendUint16(hello, wire.FlagFixedNewstyle|wire.FlagNoZeroes)
	if _, err := c.nc.Write(hello); err != nil {
		return false, err
	}
	var cf [4]byte
	if _, err := io.ReadFull(c.br, cf[:]); err != nil {
		return false, err
	}
	flags := binary.BigEndian.Uint32(cf[:])
	if flags&^wire.KnownClientFlags != 0 {
		return false, fmt.Errorf("unknown client flags %#x", flags)
	}
	if flags&wire.FlagCFixedNewstyle == 0 {
		// Only NBD_OPT_EXPORT_NAME could follow; this server needs the
		// fixed form to report errors.
		return false, errors.New("client does not speak fixed newstyle")
	}
	c.noZeroes = flags&wire.FlagCNoZeroes != 0
	for {
		select {
		case <-c.stopping:
			return false, errors.New("server shutting down")
		default:
		}
		opt, err := wire.ReadOption(c.br)
		if err != nil {
			return false, err
		}
		if opt.Length > wire.MaxOptionLen {
			// Nothing valid is that long: a denial of service.
			return false, fmt.Errorf("option %d with %d bytes of data", opt.Option, opt.Length)
		}
		data := make([]byte, opt.Length)
		if _, err := io.ReadFull(c.br, data); err != nil {
			return false, err
		}
		done, err := c.option(opt.Option, data)
		if errors.Is(err, errAbort) {
			return false, nil
		}
		if err != nil {
			return false, err
		}
		if done {
			return true, nil
		}
	}
}

// reply sends an option reply.
func (c *conn) reply(opt, typ uint32, data []byte) error {
	_, err := c.nc.Write(wire.AppendOptReply(nil, opt, typ, data))
	return err
}

// replyErr sends an error reply with a message.
func (c *conn) replyErr(opt, typ uint32, format string, args ...any) error {
	msg := fmt.Sprintf(format, args...)
	if len(msg) > wire.MaxStringLen {
		msg = msg[:wire.MaxStringLen]
	}
	return c.reply(opt, typ, []byte(msg))
}

// option handles one option; done reports that transmission starts.
func (c *conn) option(opt uint32, data []byte) (done bool, err error) {
	if c.s.opts.TLSRequired && !c.tlsDone {
		switch opt {
		case wire.OptStartTLS, wire.OptAbort:
		case wire.OptExportName:
			return false, errors.New("NBD_OPT_EXPORT_NAME before TLS, which is required")
		default:
			return false, c.replyErr(opt, wire.RepErrTLSReqd, "TLS is required")
		}
	}
	switch opt {
	case wire.OptAbort:
		c.reply(opt, wire.RepAck, nil)
		return false, errAbort
	case wire.OptExportName:
		if c.extended {
			return false, errors.New("NBD_OPT_EXPORT_NAME after extended headers")
		}
		x, ok := c.s.exports[string(data)]
		if !ok {
			return false, fmt.Errorf("NBD_OPT_EXPORT_NAME: no export %q", data)
		}
		c.exp = x
		if c.metaExport != x.Name {
			c.ctxAlloc, c.ctxDepth = 0, 0
		}
		var b []byte
		b = binary.BigEndian.AppendUint64(b, uint64(x.size))
		b = binary.BigEndian.AppendUint16(b, c.transmissionFlags(x))
		if !c.noZeroes {
			b = append(b, make([]byte, wire.HandshakeZeroPadLen)...)
		}
		_, err := c.nc.Write(b)
		return err == nil, err
	case wire.OptList:
		if len(data) != 0 {
			return false, c.replyErr(opt, wire.RepErrInvalid, "NBD_OPT_LIST takes no data")
		}
		for _, name := range c.s.order {
			x := c.s.exports[name]
			b := wire.AppendString(nil, x.Name)
			b = append(b, x.Description...)
			if err := c.reply(opt, wire.RepServer, b); err != nil {
				return false, err
			}
		}
		return false, c.reply(opt, wire.RepAck, nil)
	case wire.OptStartTLS:
		return false, c.startTLS(data)
	case wire.OptInfo, wire.OptGo:
		return c.info(opt, data)
	case wire.OptStructuredReply:
		switch {
		case len(data) != 0:
			return false, c.replyErr(opt, wire.RepErrInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data")
		case c.extended:
			return false, c.replyErr(opt, wire.RepErrExtHeaderReqd, "extended headers are already on")
		}
		c.structured = true
		return false, c.reply(opt, wire.RepAck, nil)
	case wire.OptExtendedHeaders:
		if len(data) != 0 {
			return false, c.replyErr(opt, wire.RepErrInvalid, "NBD_OPT_EXTENDED_HEADERS takes no data")
		}
		c.extended, c.structured = true, true
		return false, c.reply(opt, wire.RepAck, nil)
	case wire.OptListMetaContext, wire.OptSetMetaContext:
		return false, c.metaContext(opt, data)
	}
	return false, c.replyErr(opt, wire.RepErrUnsup, "option %d is not supported", opt)
}

// startTLS upgrades the connection.
func (c *conn) startTLS(data []byte) error {
	opt := wire.OptStartTLS
	switch {
	case len(data) != 0:
		return c.replyErr(opt, wire.RepErrInvalid, "NBD_OPT_STARTTLS takes no data")
	case c.s.opts.TLS == nil:
		return c.replyErr(opt, wire.RepErrPolicy, "this server has no TLS")
	case c.tlsDone:
		return c.replyErr(opt, wire.RepErrInvalid, "TLS is already on")
	}
	if err := c.reply(opt, wire.RepAck, nil); err != nil {
		return err
	}
	if c.br.Buffered() > 0 {
		return errors.New("client sent data before the TLS handshake")
	}
	tc := tls.Server(c.nc, c.s.opts.TLS)
	if err := tc.Handshake(); err != nil {
		return fmt.Errorf("TLS handshake: %w", err)
	}
	c.nc, c.tlsDone = tc, true
	c.br.Reset(tc)
	c.bw.Reset(tc)
	// Nothing negotiated before TLS survives it.
	c.structured, c.extended = false, false
	c.metaExport, c.ctxAlloc, c.ctxDepth = "", 0, 0
	return nil
}

// transmissionFlags returns the flags of x for this connection.
func (c *conn) transmissionFlags(x *export) uint16 {
	f := x.flags
	if c.structured {
		f |= wire.FlagSendDF
	}
	if c.extended && c.metaExport == x.Name && (c.ctxAlloc != 0 || c.ctxDepth != 0) {
		f |= wire.FlagBlockStatusPayload
	}
	return f
}

// info answers NBD_OPT_INFO and NBD_OPT_GO.
func (c *conn) info(opt uint32, data []byte) (bool, error) {
	name, rest, err := wire.ReadString(data)
	if err != nil || len(rest) < 2 {
		return false, c.replyErr(opt, wire.RepErrInvalid, "malformed request")
	}
	n := int(binary.BigEndian.Uint16(rest))
	rest = rest[2:]
	if len(rest) != 2*n {
		return false, c.replyErr(opt, wire.RepErrInvalid, "%d information requests in %d bytes", n, len(rest))
	}
	want := map[uint16]bool{}
	for i := range n {
		want[binary.BigEndian.Uint16(rest[2*i:])] = true
	}
	x, ok := c.s.exports[name]
	if !ok {
		return false, c.replyErr(opt, wire.RepErrUnknown, "no export named %q", name)
	}
	var b []byte
	b = binary.BigEndian.AppendUint16(b, wire.InfoExport)
	b = binary.BigEndian.AppendUint64(b, uint64(x.size))
	b = binary.BigEndian.AppendUint16(b, c.transmissionFlags(x))
	if err := c.reply(opt, wire.RepInfo, b); err != nil {
		return false, err
	}
	if want[wire.InfoName] {
		if err := c.reply(opt, wire.RepInfo, append(binary.BigEndian.AppendUint16(nil, wire.InfoName), x.Name...)); err != nil {
			return false, err
		}
	}
	if want[wire.InfoDescription] && x.Description != "" {
		if err := c.reply(opt, wire.RepInfo, append(binary.BigEndian.AppendUint16(nil, wire.InfoDescription), x.Description...)); err != nil {
			return false, err
		}
	}
	// The block sizes are sent unasked too: clients that do not
	// understand them ignore them, and the defaults of the spec hold
	// for every image (minimum 1) anyway.
	b = binary.BigEndian.AppendUint16(b[:0], wire.InfoBlockSize)
	b = binary.BigEndian.AppendUint32(b, uint32(x.limits.MinTransfer))
	b = binary.BigEndian.AppendUint32(b, uint32(x.limits.PreferredTransfer))
	b = binary.BigEndian.AppendUint32(b, uint32(x.limits.MaxTransfer))
	if err := c.reply(opt, wire.RepInfo, b); err != nil {
		return false, err
	}
	if err := c.reply(opt, wire.RepAck, nil); err != nil {
		return false, err
	}
	if opt == wire.OptInfo {
		return false, nil
	}
	c.exp = x
	if c.metaExport != x.Name {
		c.ctxAlloc, c.ctxDepth = 0, 0
	}
	return true, nil
}

// Metadata context IDs.
const (
	idAllocation = 1
	idDepth      = 2
)

// metaContext answers NBD_OPT_LIST_META_CONTEXT and
// NBD_OPT_SET_META_CONTEXT.
func (c *conn) metaContext(opt uint32, data []byte) error {
	if !c.structured {
		return c.replyErr(opt, wire.RepErrInvalid, "metadata contexts need structured replies")
	}
	set := opt == wire.OptSetMetaContext
	if set {
		// Replaced, even if the request fails.
		c.metaExport, c.ctxAlloc, c.ctxDepth = "", 0, 0
	}
	name, rest, err := wire.ReadString(data)
	if err != nil || len(rest) < 4 {
		return c.replyErr(opt, wire.RepErrInvalid, "malformed request")
	}
	n := binary.BigEndian.Uint32(rest)
	rest = rest[4:]
	if uint64(n)*4 > uint64(len(rest)) {
		return c.replyErr(opt, wire.RepErrInvalid, "%d queries in %d bytes", n, len(rest))
	}
	queries := make([]string, 0, n)
	for range n {
		var q string
		if q, rest, err = wire.ReadString(rest); err != nil {
			return c.replyErr(opt, wire.RepErrInvalid, "malformed query")
		}
		queries = append(queries, q)
	}
	if len(rest) != 0 {
		return c.replyErr(opt, wire.RepErrInvalid, "%d bytes after the queries", len(rest))
	}
	if _, ok := c.s.exports[name]; !ok {
		return c.replyErr(opt, wire.RepErrUnknown, "no export named %q", name)
	}
	all := []struct {
		id   uint32
		name string
	}{{idAllocation, wire.ContextBaseAllocation}, {idDepth, wire.ContextAllocationDepth}}
	var alloc, depth bool
	for _, q := range queries {
		ns, leaf, ok := strings.Cut(q, ":")
		if !ok {
			continue // no namespace: ignored, as unknown ones are
		}
		for _, ctx := range all {
			cns, cleaf, _ := strings.Cut(ctx.name, ":")
			if ns != cns || (leaf != cleaf && !(leaf == "" && !set)) {
				continue
			}
			if ctx.id == idAllocation {
				alloc = true
			} else {
				depth = true
			}
		}
	}
	if len(queries) == 0 && !set {
		alloc, depth = true, true
	}
	for _, ctx := range all {
		if (ctx.id == idAllocation && !alloc) || (ctx.id == idDepth && !depth) {
			continue
		}
		id := ctx.id
		if !set {
			id = 0 // reserved in lists
		}
		if err := c.reply(opt, wire.RepMetaContext, append(binary.BigEndian.AppendUint32(nil, id), ctx.name...)); err != nil {
			return err
		}
	}
	if set {
		c.metaExport = name
		if alloc {
			c.ctxAlloc = idAllocation
		}
		if depth {
			c.ctxDepth = idDepth
		}
	}
	return c.reply(opt, wire.RepAck, nil)
}
