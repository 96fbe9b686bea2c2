package client

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/imgloop/imgloop/export/nbd/internal/wire"
)

// Options tune a connection. The zero value connects to the default
// export ("") with simple replies and no TLS.
type Options struct {
	// ExportName is the export to connect to ("" is the default one).
	ExportName string
	// TLS, if set, upgrades the connection with NBD_OPT_STARTTLS before
	// anything else; a server refusing it fails the handshake with
	// ErrTLSRefused. ServerName defaults to Dial's host.
	TLS *tls.Config
	// StructuredReplies asks for NBD_OPT_STRUCTURED_REPLY (sparse reads,
	// error messages, block status); a server refusing it is used with
	// simple replies.
	StructuredReplies bool
	// ExtendedHeaders asks for NBD_OPT_EXTENDED_HEADERS (64-bit lengths);
	// a server refusing it is asked for structured replies instead.
	ExtendedHeaders bool
	// MetaContexts are the metadata contexts to select with
	// NBD_OPT_SET_META_CONTEXT ("base:allocation",
	// "qemu:allocation-depth", ...); they need structured replies (or
	// extended headers), and Conn.Map needs "base:allocation". The
	// server may select fewer: Conn.MetaContexts says which it did.
	MetaContexts []string
}

// Bounds on what a server may send during the handshake.
const (
	// maxOptReplies bounds the replies to one option (NBD_REP_SERVER
	// per export, NBD_REP_INFO, NBD_REP_META_CONTEXT): more is a server
	// flooding the client.
	maxOptReplies = 1 << 16
	// defaultHandshakeTimeout bounds a handshake whose context has no
	// deadline.
	defaultHandshakeTimeout = 30 * time.Second
)

// ExportInfo is an export a server lists (NBD_REP_SERVER).
type ExportInfo struct {
	Name        string
	Description string
}

// negotiator runs the option haggling of one connection.
type negotiator struct {
	nc       net.Conn
	br       *bufio.Reader
	noZeroes bool
}

// Dial connects to the NBD server at addr on network ("unix", "tcp", ...)
// and runs the handshake (see New). ctx bounds the dial and the
// handshake.
func Dial(ctx context.Context, network, addr string, opts Options) (*Conn, error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return nil, fmt.Errorf("nbd client: %w", err)
	}
	opts.TLS = tlsFor(opts.TLS, network, addr)
	return New(ctx, nc, opts)
}

// tlsFor returns cfg with ServerName set to addr's host when it has none.
func tlsFor(cfg *tls.Config, network, addr string) *tls.Config {
	if cfg == nil || cfg.ServerName != "" || network == "unix" {
		return cfg
	}
	if host, _, err := net.SplitHostPort(addr); err == nil {
		cfg = cfg.Clone()
		cfg.ServerName = host
	}
	return cfg
}

// New runs the fixed newstyle handshake on nc and returns the connection
// in the transmission phase; ctx bounds the handshake (30 s when it has
// no deadline). nc is the Conn's from then on, and is closed when New
// fails. It fails with an *OptionError for an option the server refused
// that the connection needs (NBD_OPT_GO, NBD_OPT_STARTTLS: ErrTLSRefused),
// an error matching ErrProtocol for a server breaking the protocol, and
// the connection's error when it fails.
func New(ctx context.Context, nc net.Conn, opts Options) (*Conn, error) {
	c, err := handshake(ctx, nc, opts)
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("nbd client: handshake: %w", err)
	}
	c.start()
	return c, nil
}

// List connects to the server at addr, asks for its exports with
// NBD_OPT_LIST (after NBD_OPT_STARTTLS when opts.TLS is set) and
// disconnects. Only opts.TLS is used.
func List(ctx context.Context, network, addr string, opts Options) ([]ExportInfo, error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return nil, fmt.Errorf("nbd client: %w", err)
	}
	defer nc.Close()
	stop := deadline(ctx, nc)
	defer stop()
	n, err := greet(nc)
	if err == nil {
		err = n.startTLS(tlsFor(opts.TLS, network, addr))
	}
	var list []ExportInfo
	if err == nil {
		list, err = n.list()
	}
	if err != nil {
		return nil, fmt.Errorf("nbd client: list: %w", err)
	}
	n.abort()
	return list, nil
}

// deadline bounds the handshake on nc by ctx (or the default timeout)
// and returns the function that lifts the bound.
func deadline(ctx context.Context, nc net.Conn) (stop func()) {
	d, ok := ctx.Deadline()
	if !ok {
		d = time.Now().Add(defaultHandshakeTimeout)
	}
	nc.SetDeadline(d)
	cancel := context.AfterFunc(ctx, func() { nc.SetDeadline(time.Unix(1, 0)) })
	return func() {
		cancel()
		nc.SetDeadline(time.Time{})
	}
}

// greet reads the server's greeting and sends the client flags.
func greet(nc net.Conn) (*negotiator, error) {
	n := &negotiator{nc: nc, br: bufio.NewReaderSize(nc, 64<<10)}
	var b [18]byte
	if _, err := io.ReadFull(n.br, b[:16]); err != nil {
		return nil, fmt.Errorf("reading the greeting: %w", err)
	}
	if m := binary.BigEndian.Uint64(b[:]); m != wire.MagicNBD {
		return nil, protocolError("greeting magic %#x, not NBDMAGIC", m)
	}
	switch m := binary.BigEndian.Uint64(b[8:]); m {
	case wire.MagicIHaveOpt:
	case wire.MagicOldstyleCliserv:
		return nil, protocolError("the server speaks the oldstyle handshake, which this client does not")
	default:
		return nil, protocolError("greeting magic %#x, not IHAVEOPT", m)
	}
	if _, err := io.ReadFull(n.br, b[16:18]); err != nil {
		return nil, fmt.Errorf("reading the handshake flags: %w", err)
	}
	flags := binary.BigEndian.Uint16(b[16:])
	if flags&wire.FlagFixedNewstyle == 0 {
		return nil, protocolError("the server does not speak fixed newstyle (handshake flags %#x)", flags)
	}
	cf := wire.FlagCFixedNewstyle
	if flags&wire.FlagNoZeroes != 0 {
		cf |= wire.FlagCNoZeroes
		n.noZeroes = true
	}
	if _, err := nc.Write(binary.BigEndian.AppendUint32(nil, cf)); err != nil {
		return nil, err
	}
	return n, nil
}

// optReply is one option reply with its data.
type optReply struct {
	typ  uint32
	data []byte
}

// send sends an option request.
func (n *negotiator) send(opt uint32, data []byte) error {
	_, err := n.nc.Write(wire.AppendOption(nil, opt, data))
	return err
}

// read reads one reply to opt, bounding its data.
func (n *negotiator) read(opt uint32) (optReply, error) {
	h, err := wire.ReadOptReply(n.br)
	if err != nil {
		return optReply{}, fmt.Errorf("%s: %w", wire.OptName(opt), err)
	}
	if h.Option != opt {
		return optReply{}, protocolError("reply to %s while waiting for one to %s", wire.OptName(h.Option), wire.OptName(opt))
	}
	if h.Length > wire.MaxOptReplyLen {
		return optReply{}, protocolError("%s: %s with %d bytes of data, over the limit of %d",
			wire.OptName(opt), wire.RepName(h.Type), h.Length, wire.MaxOptReplyLen)
	}
	data := make([]byte, h.Length)
	if _, err := io.ReadFull(n.br, data); err != nil {
		return optReply{}, fmt.Errorf("%s: %w", wire.OptName(opt), err)
	}
	return optReply{h.Type, data}, nil
}

// option sends opt and calls each for every reply before the final one
// (NBD_REP_ACK, returned as nil, or an error: an *OptionError). each
// may be nil when opt has no such replies.
func (n *negotiator) option(opt uint32, data []byte, each func(optReply) error) error {
	if err := n.send(opt, data); err != nil {
		return err
	}
	for i := 0; ; i++ {
		r, err := n.read(opt)
		if err != nil {
			return err
		}
		switch {
		case r.typ == wire.RepAck:
			if len(r.data) != 0 {
				return protocolError("%s: NBD_REP_ACK with %d bytes of data", wire.OptName(opt), len(r.data))
			}
			return nil
		case r.typ&wire.RepFlagError != 0:
			return &OptionError{Option: opt, Reply: r.typ, Message: printable(r.data)}
		case each == nil:
			return protocolError("%s: unexpected %s", wire.OptName(opt), wire.RepName(r.typ))
		case i >= maxOptReplies:
			return protocolError("%s: more than %d replies", wire.OptName(opt), maxOptReplies)
		}
		if err := each(r); err != nil {
			return err
		}
	}
}

// printable returns a server's message with control characters other
// than tabs replaced, for error strings.
func printable(b []byte) string {
	out := make([]rune, 0, len(b))
	for _, r := range string(b) {
		if (r < 0x20 && r != '\t') || r == 0x7f {
			r = '?'
		}
		out = append(out, r)
	}
	return string(out)
}

// startTLS upgrades the connection when cfg is set.
func (n *negotiator) startTLS(cfg *tls.Config) error {
	if cfg == nil {
		return nil
	}
	err := n.option(wire.OptStartTLS, nil, nil)
	var oe *OptionError
	if errors.As(err, &oe) {
		return fmt.Errorf("%w: %w", ErrTLSRefused, err)
	}
	if err != nil {
		return err
	}
	if n.br.Buffered() > 0 {
		return protocolError("data after the NBD_OPT_STARTTLS reply, before the TLS handshake")
	}
	tc := tls.Client(n.nc, cfg)
	if err := tc.Handshake(); err != nil {
		return fmt.Errorf("TLS handshake: %w", err)
	}
	n.nc = tc
	n.br.Reset(tc)
	return nil
}

// list runs NBD_OPT_LIST.
func (n *negotiator) list() ([]ExportInfo, error) {
	var list []ExportInfo
	err := n.option(wire.OptList, nil, func(r optReply) error {
		if r.typ != wire.RepServer {
			return protocolError("NBD_OPT_LIST: unexpected %s", wire.RepName(r.typ))
		}
		name, desc, err := wire.DecodeRepServer(r.data)
		if err != nil {
			return err
		}
		list = append(list, ExportInfo{name, desc})
		return nil
	})
	return list, err
}

// abort ends the handshake politely (NBD_OPT_ABORT), waiting briefly for
// the server's acknowledgement.
func (n *negotiator) abort() {
	if n.send(wire.OptAbort, nil) != nil {
		return
	}
	n.nc.SetReadDeadline(time.Now().Add(time.Second))
	n.read(wire.OptAbort)
}

// handshake runs the handshake for New.
func handshake(ctx context.Context, nc net.Conn, opts Options) (*Conn, error) {
	stop := deadline(ctx, nc)
	defer stop()
	n, err := greet(nc)
	if err != nil {
		return nil, err
	}
	if err := n.startTLS(opts.TLS); err != nil {
		return nil, err
	}
	c := &Conn{name: opts.ExportName}
	if opts.ExtendedHeaders {
		err := n.option(wire.OptExtendedHeaders, nil, nil)
		var oe *OptionError
		switch {
		case err == nil:
			c.extended, c.structured = true, true
		case errors.As(err, &oe) && oe.Reply == wire.RepErrTLSReqd:
			return nil, err
		case !errors.As(err, &oe):
			return nil, err
		}
	}
	if !c.structured && (opts.StructuredReplies || opts.ExtendedHeaders) {
		err := n.option(wire.OptStructuredReply, nil, nil)
		var oe *OptionError
		switch {
		case err == nil:
			c.structured = true
		case errors.As(err, &oe) && oe.Reply == wire.RepErrTLSReqd:
			return nil, err
		case !errors.As(err, &oe):
			return nil, err
		}
	}
	if c.structured && len(opts.MetaContexts) > 0 {
		if err := c.setMetaContexts(n, opts); err != nil {
			return nil, err
		}
	}
	if err := c.goExport(n, opts); err != nil {
		return nil, err
	}
	c.nc, c.br = n.nc, n.br
	return c, nil
}

// setMetaContexts runs NBD_OPT_SET_META_CONTEXT. A server that refuses
// the option leaves the connection without contexts.
func (c *Conn) setMetaContexts(n *negotiator, opts Options) error {
	for _, q := range opts.MetaContexts {
		if len(q) > wire.MaxStringLen {
			return fmt.Errorf("metadata context query of %d bytes, over the limit of %d", len(q), wire.MaxStringLen)
		}
	}
	if len(opts.ExportName) > wire.MaxStringLen {
		return fmt.Errorf("export name of %d bytes, over the limit of %d", len(opts.ExportName), wire.MaxStringLen)
	}
	ids := map[uint32]string{}
	err := n.option(wire.OptSetMetaContext, wire.AppendMetaContextRequest(nil, opts.ExportName, opts.MetaContexts), func(r optReply) error {
		if r.typ != wire.RepMetaContext {
			return protocolError("NBD_OPT_SET_META_CONTEXT: unexpected %s", wire.RepName(r.typ))
		}
		id, name, err := wire.DecodeRepMetaContext(r.data)
		if err != nil {
			return err
		}
		if _, dup := ids[id]; dup {
			return protocolError("NBD_OPT_SET_META_CONTEXT: context ID %d given twice", id)
		}
		ids[id] = name
		return nil
	})
	var oe *OptionError
	if errors.As(err, &oe) && oe.Reply != wire.RepErrTLSReqd {
		return nil
	}
	if err != nil {
		return err
	}
	c.contexts = ids
	return nil
}

// goExport enters transmission with NBD_OPT_GO, or NBD_OPT_EXPORT_NAME
// when the server does not know NBD_OPT_GO.
func (c *Conn) goExport(n *negotiator, opts Options) error {
	if len(opts.ExportName) > wire.MaxStringLen {
		return fmt.Errorf("export name of %d bytes, over the limit of %d", len(opts.ExportName), wire.MaxStringLen)
	}
	var gotExport, gotBlockSize bool
	req := wire.AppendInfoRequest(nil, opts.ExportName, []uint16{wire.InfoName, wire.InfoDescription, wire.InfoBlockSize})
	err := n.option(wire.OptGo, req, func(r optReply) error {
		if r.typ != wire.RepInfo {
			return protocolError("NBD_OPT_GO: unexpected %s", wire.RepName(r.typ))
		}
		info, err := wire.DecodeInfo(r.data)
		if err != nil {
			return err
		}
		switch info.Type {
		case wire.InfoExport:
			c.size, c.flags, gotExport = info.Size, info.Flags, true
		case wire.InfoName:
			c.name = info.Text
		case wire.InfoDescription:
			c.description = info.Text
		case wire.InfoBlockSize:
			if err := info.BlockSize.Check(); err != nil {
				return fmt.Errorf("NBD_INFO_BLOCK_SIZE: %w", err)
			}
			c.block, gotBlockSize = info.BlockSize, true
		}
		return nil
	})
	var oe *OptionError
	if errors.As(err, &oe) && oe.Reply == wire.RepErrUnsup && !c.extended {
		return c.exportName(n, opts)
	}
	if err != nil {
		return err
	}
	if !gotExport {
		return protocolError("NBD_OPT_GO: NBD_REP_ACK without NBD_INFO_EXPORT")
	}
	if !gotBlockSize {
		c.block = defaultBlockSize
	}
	return c.checkExport()
}

// defaultBlockSize is what the spec lets a client assume of a server
// that sends no NBD_INFO_BLOCK_SIZE: any alignment, 4 KiB preferred, the
// portable 32 MiB payload.
var defaultBlockSize = wire.BlockSize{Minimum: 1, Preferred: 4096, Maximum: wire.DefaultMaxPayload}

// exportName enters transmission with NBD_OPT_EXPORT_NAME.
func (c *Conn) exportName(n *negotiator, opts Options) error {
	if err := n.send(wire.OptExportName, []byte(opts.ExportName)); err != nil {
		return err
	}
	b := make([]byte, 10+wire.HandshakeZeroPadLen)
	if n.noZeroes {
		b = b[:10]
	}
	if _, err := io.ReadFull(n.br, b); err != nil {
		if errors.Is(err, io.EOF) {
			return fmt.Errorf("NBD_OPT_EXPORT_NAME %q: the server closed the connection: %w", opts.ExportName, ErrUnknownExport)
		}
		return fmt.Errorf("NBD_OPT_EXPORT_NAME: %w", err)
	}
	c.size, c.flags, c.block = binary.BigEndian.Uint64(b), binary.BigEndian.Uint16(b[8:]), defaultBlockSize
	return c.checkExport()
}

// checkExport checks what the handshake said of the export.
func (c *Conn) checkExport() error {
	if c.flags&wire.FlagHasFlags == 0 {
		return protocolError("transmission flags %#x without NBD_FLAG_HAS_FLAGS", c.flags)
	}
	if c.size > 1<<63-1 {
		return protocolError("export size %d is over 2^63-1", c.size)
	}
	// The payloads this client sends and accepts: the server's maximum,
	// at most the portable 32 MiB (bounding what one reply may make the
	// client buffer), rounded down to a multiple of the minimum.
	m := min(uint64(c.block.Maximum), wire.DefaultMaxPayload)
	m -= m % uint64(c.block.Minimum)
	c.maxPayload = int64(m)
	return nil
}
