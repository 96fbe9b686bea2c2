package client

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"

	"github.com/imgloop/imgloop/export/nbd/internal/wire"
	"github.com/imgloop/imgloop/internal/bufpool"
)

// Conn is a connection to an export in the transmission phase. It is a
// disk.Image (see image.go) and sends any request (RawRequest).
type Conn struct {
	nc net.Conn // the socket, or the TLS connection over it
	br *bufio.Reader

	// What the handshake settled; read-only afterwards.
	name        string
	description string
	size        uint64
	flags       uint16 // transmission flags
	block       wire.BlockSize
	maxPayload  int64 // the largest payload sent or accepted
	structured  bool
	extended    bool
	contexts    map[uint32]string // selected metadata contexts by ID

	wsem chan struct{} // held while a request is written

	mu      sync.Mutex
	pending map[uint64]*call
	cookie  uint64
	err     error // why the connection ended; nil while it serves
	closed  bool  // Close was called
	active  sync.WaitGroup
	done    chan struct{} // closed when the reader goroutine ends

	unaligned sync.Mutex // orders read-modify-write cycles (minimum block size > 1)
}

// call is one request in flight.
type call struct {
	req  wire.Request
	done chan struct{} // closed when the reply is complete (or the connection failed)

	// Written by the reader goroutine before done is closed.
	err     error
	data    []byte // NBD_CMD_READ: the reply's data, from bufpool (nil until data comes)
	covered []span // NBD_CMD_READ: the ranges the content chunks covered, sorted, merged
	df      bool   // NBD_CMD_FLAG_DF: at most one content chunk
	content int    // content chunks seen
	status  []StatusChunk
	nbdErr  *Error
	pastEnd bool   // the request reaches past the export's end
	effect  uint64 // NBD_CMD_BLOCK_STATUS with a payload: its effect length

	mu        sync.Mutex // guards abandoned and the hand-over of data
	abandoned bool       // the waiter left (context done): the reader frees data
	finished  bool
}

// span is a half-open range [off, end) of the export.
type span struct{ off, end uint64 }

// start the reader goroutine; called once the handshake is done.
func (c *Conn) start() {
	c.wsem = make(chan struct{}, 1)
	c.pending = map[uint64]*call{}
	c.done = make(chan struct{})
	go c.readLoop()
}

// errClosing ends the reader when Close disconnects.
var errClosing = errors.New("nbd client: closed by the client")

// fail ends the connection with err, from any goroutine: it closes the
// socket, which ends the reader, which then fails every request in
// flight (only the reader touches their buffers). Later requests fail
// with the same error. It returns the error the connection ended with
// (the first).
func (c *Conn) fail(err error) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err == nil {
		if errors.Is(err, errClosing) {
			c.err = err
		} else {
			c.err = fmt.Errorf("%w: %w", ErrDisconnected, err)
		}
		c.nc.Close()
	}
	return c.err
}

// drain fails every request in flight with the connection's error; the
// reader calls it when it ends.
func (c *Conn) drain() {
	c.mu.Lock()
	err := c.err
	pending := c.pending
	c.pending = map[uint64]*call{}
	c.mu.Unlock()
	for _, cl := range pending {
		cl.finish(err)
	}
}

// finish completes cl with err (nil: the reply's own outcome).
func (cl *call) finish(err error) {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	if cl.finished {
		return
	}
	cl.finished = true
	if err != nil {
		cl.err = err
	}
	if cl.abandoned && cl.data != nil {
		bufpool.Put(cl.data)
		cl.data = nil
	}
	close(cl.done)
}

// begin registers a new call for r and sends it with payload. It fails
// with ctx's error (nothing sent) or the connection's.
func (c *Conn) begin(ctx context.Context, r wire.Request, payload []byte) (*call, error) {
	select {
	case c.wsem <- struct{}{}:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	defer func() { <-c.wsem }()
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	cl := &call{req: r, done: make(chan struct{}), df: r.Type == wire.CmdRead && r.Flags&wire.CmdFlagDF != 0, effect: r.Length}
	if r.Type == wire.CmdBlockStatus && r.Flags&wire.CmdFlagPayloadLen != 0 && len(payload) >= 8 {
		cl.effect = binary.BigEndian.Uint64(payload)
	}
	cl.pastEnd = r.Offset > c.size || cl.effect > c.size-r.Offset
	if r.Type == wire.CmdWrite {
		cl.pastEnd = r.Offset > c.size || uint64(len(payload)) > c.size-r.Offset
	}
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return nil, err
	}
	c.cookie++
	cl.req.Cookie = c.cookie
	c.pending[cl.req.Cookie] = cl
	c.mu.Unlock()
	hdr := wire.AppendRequest(make([]byte, 0, wire.ExtendedRequestSize), cl.req, c.extended)
	var err error
	if len(payload) > 0 {
		bufs := net.Buffers{hdr, payload}
		_, err = bufs.WriteTo(c.nc)
	} else {
		_, err = c.nc.Write(hdr)
	}
	if err != nil {
		return nil, c.fail(fmt.Errorf("sending %s: %w", wire.CmdName(r.Type), err))
	}
	return cl, nil
}

// wait waits for cl's reply. With ctx done first it returns ctx's
// error and left, leaving the reply to be read and dropped (and cl's
// buffer to the reader).
func (c *Conn) wait(ctx context.Context, cl *call) (left bool, err error) {
	select {
	case <-cl.done:
		return false, cl.result()
	case <-ctx.Done():
	}
	cl.mu.Lock()
	defer cl.mu.Unlock()
	if cl.finished {
		return false, cl.result()
	}
	cl.abandoned = true
	return true, ctx.Err()
}

// result is the outcome of a finished call.
func (cl *call) result() error {
	if cl.err != nil {
		return cl.err
	}
	if cl.nbdErr != nil {
		return cl.nbdErr
	}
	return nil
}

// release gives back the buffer of a finished call the waiter used.
func (cl *call) release() {
	if cl.data != nil {
		bufpool.Put(cl.data)
		cl.data = nil
	}
}

// do sends one request and waits for its reply.
func (c *Conn) do(ctx context.Context, r wire.Request, payload []byte) (*call, error) {
	cl, err := c.begin(ctx, r, payload)
	if err != nil {
		return nil, err
	}
	if left, err := c.wait(ctx, cl); err != nil {
		if !left {
			cl.release()
		}
		return nil, err
	}
	return cl, nil
}

// readLoop reads replies and hands them to their calls until the
// connection ends.
func (c *Conn) readLoop() {
	defer close(c.done)
	for {
		if err := c.readReply(); err != nil {
			c.fail(err)
			c.drain()
			return
		}
	}
}

// readReply reads one reply message (a simple reply or one chunk).
func (c *Conn) readReply() error {
	rep, err := wire.ReadReply(c.br, c.extended)
	if err != nil {
		if errors.Is(err, io.EOF) {
			return errors.New("the server closed the connection")
		}
		return err
	}
	c.mu.Lock()
	cl := c.pending[rep.Cookie]
	c.mu.Unlock()
	if cl == nil {
		return protocolError("reply with cookie %#x, which no request in flight has", rep.Cookie)
	}
	if rep.Simple {
		return c.simpleReply(cl, rep.Errno)
	}
	if !c.structured {
		return protocolError("structured reply chunk, but structured replies were not negotiated")
	}
	return c.chunk(cl, rep.Chunk)
}

// complete removes cl from the calls in flight and finishes it.
func (c *Conn) complete(cl *call) {
	c.mu.Lock()
	delete(c.pending, cl.req.Cookie)
	c.mu.Unlock()
	cl.finish(nil)
}

// newError returns the *Error for an NBD error value in a reply to cl.
func (c *Conn) newError(cl *call, errno uint32, msg string) *Error {
	return &Error{Errno: errno, Message: msg, Command: cl.req.Type, Flags: cl.req.Flags,
		Offset: cl.req.Offset, Length: cl.req.Length, ErrorOffset: -1, pastEnd: cl.pastEnd}
}

// simpleReply handles a simple reply.
func (c *Conn) simpleReply(cl *call, errno uint32) error {
	if errno != 0 {
		cl.nbdErr = c.newError(cl, errno, "")
		c.complete(cl)
		return nil
	}
	if cl.req.Type == wire.CmdRead {
		if c.structured {
			return protocolError("simple reply to NBD_CMD_READ with structured replies")
		}
		if cl.req.Length > uint64(c.maxPayload) {
			return protocolError("simple reply with data to a read of %d bytes, over the maximum payload %d", cl.req.Length, c.maxPayload)
		}
		cl.data = bufpool.Get(int(cl.req.Length))
		if _, err := io.ReadFull(c.br, cl.data); err != nil {
			return fmt.Errorf("reading a read's data: %w", err)
		}
		cl.covered = []span{{cl.req.Offset, cl.req.Offset + cl.req.Length}}
	}
	if cl.req.Type == wire.CmdBlockStatus {
		return protocolError("simple reply to NBD_CMD_BLOCK_STATUS without an error")
	}
	c.complete(cl)
	return nil
}
