package nbd

import (
	"bufio"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/imgloop/imgloop/export/nbd/internal/wire"
)

// rawConn is a hand-driven client connection, for requests no real
// client sends.
type rawConn struct {
	t  testing.TB
	nc net.Conn
	br *bufio.Reader
}

// dialRaw connects to the unix socket sock and reads the server's
// greeting.
func dialRaw(t testing.TB, sock string) *rawConn {
	t.Helper()
	return dialRawNet(t, "unix", sock)
}

// dialRawNet connects to addr and reads the server's greeting.
func dialRawNet(t testing.TB, network, addr string) *rawConn {
	t.Helper()
	nc, err := net.Dial(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	nc.SetDeadline(time.Now().Add(20 * time.Second))
	r := &rawConn{t: t, nc: nc, br: bufio.NewReader(nc)}
	var hello [18]byte
	r.full(hello[:])
	if binary.BigEndian.Uint64(hello[:]) != wire.MagicNBD || binary.BigEndian.Uint64(hello[8:]) != wire.MagicIHaveOpt {
		t.Fatalf("greeting %x", hello)
	}
	return r
}

func (r *rawConn) full(b []byte) {
	r.t.Helper()
	if _, err := io.ReadFull(r.br, b); err != nil {
		r.t.Fatalf("reading: %v", err)
	}
}

func (r *rawConn) write(b []byte) {
	r.t.Helper()
	if _, err := r.nc.Write(b); err != nil {
		r.t.Fatalf("writing: %v", err)
	}
}

// flags sends the client flags.
func (r *rawConn) flags(f uint32) { r.write(binary.BigEndian.AppendUint32(nil, f)) }

// option sends an option and returns the replies up to the final one.
func (r *rawConn) option(opt uint32, data []byte) []wire.OptReply {
	r.t.Helper()
	r.write(wire.AppendOption(nil, opt, data))
	var reps []wire.OptReply
	for {
		rep, err := wire.ReadOptReply(r.br)
		if err != nil {
			r.t.Fatalf("option %d: %v", opt, err)
		}
		r.full(make([]byte, rep.Length))
		reps = append(reps, rep)
		if rep.Type == wire.RepAck || rep.Type&wire.RepFlagError != 0 {
			return reps
		}
	}
}

// last returns the type of the final reply.
func last(reps []wire.OptReply) uint32 { return reps[len(reps)-1].Type }

// goRequest is NBD_OPT_GO's data for export name.
func goRequest(name string) []byte {
	return binary.BigEndian.AppendUint16(wire.AppendString(nil, name), 0)
}

// setMeta is NBD_OPT_SET_META_CONTEXT's data.
func setMeta(name string, queries ...string) []byte {
	b := wire.AppendString(nil, name)
	b = binary.BigEndian.AppendUint32(b, uint32(len(queries)))
	for _, q := range queries {
		b = wire.AppendString(b, q)
	}
	return b
}

// start runs a handshake to transmission on the default export, with
// structured replies, extended headers and base:allocation as asked.
func (r *rawConn) start(structured, extended bool) {
	r.t.Helper()
	r.flags(wire.FlagCFixedNewstyle | wire.FlagCNoZeroes)
	if extended {
		if got := last(r.option(wire.OptExtendedHeaders, nil)); got != wire.RepAck {
			r.t.Fatalf("EXTENDED_HEADERS: %#x", got)
		}
	} else if structured {
		if got := last(r.option(wire.OptStructuredReply, nil)); got != wire.RepAck {
			r.t.Fatalf("STRUCTURED_REPLY: %#x", got)
		}
	}
	if structured || extended {
		if got := last(r.option(wire.OptSetMetaContext, setMeta("", wire.ContextBaseAllocation, wire.ContextAllocationDepth))); got != wire.RepAck {
			r.t.Fatalf("SET_META_CONTEXT: %#x", got)
		}
	}
	if got := last(r.option(wire.OptGo, goRequest(""))); got != wire.RepAck {
		r.t.Fatalf("GO: %#x", got)
	}
}

// request sends a request header and payload.
func (r *rawConn) request(req wire.Request, extended bool, payload []byte) {
	r.t.Helper()
	r.write(append(wire.AppendRequest(nil, req, extended), payload...))
}

// reply reads one reply (all chunks up to the done one) and returns its
// error (0 for success) and the data of its chunks.
func (r *rawConn) reply(extended bool) (cookie uint64, errno uint32, chunks []wire.Chunk, payloads [][]byte) {
	r.t.Helper()
	for {
		rep, err := wire.ReadReply(r.br, extended)
		if err != nil {
			r.t.Fatalf("reading a reply: %v", err)
		}
		if rep.Simple {
			return rep.Cookie, rep.Errno, nil, nil
		}
		if rep.Length > 64<<20 {
			r.t.Fatalf("chunk of %d bytes", rep.Length)
		}
		p := make([]byte, rep.Length)
		r.full(p)
		chunks, payloads = append(chunks, rep.Chunk), append(payloads, p)
		if rep.Type&wire.ReplyTypeFlagError != 0 {
			e, _, _, err := wire.DecodeErrorPayload(p)
			if err != nil {
				r.t.Fatal(err)
			}
			errno = e
		}
		if rep.Flags&wire.ReplyFlagDone != 0 {
			return rep.Cookie, errno, chunks, payloads
		}
	}
}

// closed reports whether the server closed the connection: reading gets
// EOF (or a reset, when the server left requests unread) within a few
// seconds.
func (r *rawConn) closed() bool {
	r.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := io.Copy(io.Discard, r.br)
	var ne net.Error
	return !errors.As(err, &ne) || !ne.Timeout()
}
