package client

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/imgloop/imgloop/export/nbd/internal/wire"
)

// fake is the server end of a net.Pipe, scripted by a test.
type fake struct {
	nc  net.Conn
	br  *bufio.Reader
	ext bool
}

func (f *fake) write(b []byte) { f.nc.Write(b) }

// greet sends a fixed newstyle greeting and reads the client flags.
func (f *fake) greet() {
	b := binary.BigEndian.AppendUint64(nil, wire.MagicNBD)
	b = binary.BigEndian.AppendUint64(b, wire.MagicIHaveOpt)
	f.write(binary.BigEndian.AppendUint16(b, wire.FlagFixedNewstyle|wire.FlagNoZeroes))
	io.ReadFull(f.br, make([]byte, 4))
}

// option reads an option request.
func (f *fake) option() (uint32, []byte) {
	o, err := wire.ReadOption(f.br)
	if err != nil {
		return 0, nil
	}
	data := make([]byte, min(o.Length, 1<<16))
	io.ReadFull(f.br, data)
	return o.Option, data
}

func (f *fake) reply(opt, typ uint32, data []byte) { f.write(wire.AppendOptReply(nil, opt, typ, data)) }

// negotiate answers options as a well-behaved server of a 1 MiB export
// would, until NBD_OPT_GO, whose info replies are infos (nil: the
// export's).
func (f *fake) negotiate(infos [][]byte) {
	for {
		opt, _ := f.option()
		switch opt {
		case 0:
			return
		case wire.OptStructuredReply:
			f.reply(opt, wire.RepAck, nil)
		case wire.OptExtendedHeaders:
			f.ext = true
			f.reply(opt, wire.RepAck, nil)
		case wire.OptSetMetaContext:
			f.reply(opt, wire.RepMetaContext, wire.AppendRepMetaContext(nil, 1, wire.ContextBaseAllocation))
			f.reply(opt, wire.RepAck, nil)
		case wire.OptGo:
			if infos == nil {
				infos = [][]byte{wire.AppendInfoExport(nil, 1<<20, wire.FlagHasFlags|wire.FlagSendFlush)}
			}
			for _, i := range infos {
				f.reply(opt, wire.RepInfo, i)
			}
			f.reply(opt, wire.RepAck, nil)
			return
		default:
			f.reply(opt, wire.RepErrUnsup, nil)
		}
	}
}

// request reads a request header (and a write's payload).
func (f *fake) request() wire.Request {
	n := wire.RequestSize
	if f.ext {
		n = wire.ExtendedRequestSize
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(f.br, b); err != nil {
		return wire.Request{Type: wire.CmdDisc}
	}
	r, _ := wire.DecodeRequest(b, f.ext)
	if r.Type == wire.CmdWrite {
		io.CopyN(io.Discard, f.br, int64(r.Length))
	}
	return r
}

// chunk sends a reply chunk with payload p.
func (f *fake) chunk(r wire.Request, flags, typ uint16, p []byte) {
	f.write(append(wire.AppendChunk(nil, wire.Chunk{Flags: flags, Type: typ, Cookie: r.Cookie, Offset: r.Offset, Length: uint64(len(p))}, f.ext), p...))
}

// chunkLen sends a chunk header claiming length n, then p.
func (f *fake) chunkLen(r wire.Request, typ uint16, n uint64, p []byte) {
	f.write(append(wire.AppendChunk(nil, wire.Chunk{Flags: wire.ReplyFlagDone, Type: typ, Cookie: r.Cookie, Offset: r.Offset, Length: n}, f.ext), p...))
}

// startFake runs serve on the server end of a pipe and returns the
// client end.
func startFake(t *testing.T, serve func(f *fake)) net.Conn {
	cc, sc := net.Pipe()
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer sc.Close()
		serve(&fake{nc: sc, br: bufio.NewReader(sc)})
	}()
	t.Cleanup(func() {
		cc.Close()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Error("the fake server did not end")
		}
	})
	return cc
}

func offsetData(off uint64, data []byte) []byte {
	return append(binary.BigEndian.AppendUint64(nil, off), data...)
}

// TestHostileHandshake checks that a server breaking the handshake fails
// New with a clear error.
func TestHostileHandshake(t *testing.T) {
	info := func(b ...byte) []byte { return b }
	cases := []struct {
		name  string
		serve func(f *fake)
		want  error
	}{
		{"bad magic", func(f *fake) { f.write(bytes.Repeat([]byte{'x'}, 18)) }, ErrProtocol},
		{"oldstyle", func(f *fake) {
			f.write(binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint64(nil, wire.MagicNBD), wire.MagicOldstyleCliserv))
		}, ErrProtocol},
		{"not fixed newstyle", func(f *fake) {
			b := binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint64(nil, wire.MagicNBD), wire.MagicIHaveOpt)
			f.write(append(b, 0, 0))
		}, ErrProtocol},
		{"oversized option reply", func(f *fake) {
			f.greet()
			opt, _ := f.option()
			b := binary.BigEndian.AppendUint64(nil, wire.MagicOptReply)
			b = binary.BigEndian.AppendUint32(b, opt)
			b = binary.BigEndian.AppendUint32(b, wire.RepInfo)
			f.write(binary.BigEndian.AppendUint32(b, 1<<31))
		}, ErrProtocol},
		{"bad option reply magic", func(f *fake) {
			f.greet()
			f.option()
			f.write(make([]byte, 20))
		}, ErrProtocol},
		{"reply to another option", func(f *fake) {
			f.greet()
			f.option()
			f.reply(99, wire.RepAck, nil)
		}, ErrProtocol},
		{"GO without export info", func(f *fake) {
			f.greet()
			f.negotiate([][]byte{})
		}, ErrProtocol},
		{"bad block size", func(f *fake) {
			f.greet()
			f.negotiate([][]byte{wire.AppendInfoExport(nil, 1<<20, wire.FlagHasFlags),
				wire.AppendInfoBlockSize(nil, wire.BlockSize{Minimum: 3, Preferred: 4096, Maximum: 1 << 20})})
		}, ErrProtocol},
		{"short export info", func(f *fake) {
			f.greet()
			f.negotiate([][]byte{info(0, 0, 1)})
		}, ErrProtocol},
		{"no HAS_FLAGS", func(f *fake) {
			f.greet()
			f.negotiate([][]byte{wire.AppendInfoExport(nil, 1<<20, 0)})
		}, ErrProtocol},
		{"unknown export", func(f *fake) {
			f.greet()
			opt, _ := f.option()
			f.reply(opt, wire.RepErrUnknown, []byte("no such export\x1b[31m"))
		}, ErrUnknownExport},
		{"closed", func(f *fake) { f.greet() }, nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			nc := startFake(t, tc.serve)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			c, err := New(ctx, nc, Options{})
			if err == nil {
				c.Close()
				t.Fatal("New succeeded")
			}
			if tc.want != nil && !errors.Is(err, tc.want) {
				t.Fatalf("New: %v, want %v", err, tc.want)
			}
			t.Logf("%v", err)
		})
	}
}

// TestHostileReplies checks that a server breaking the transmission
// phase fails the request, and every later one, with a clear error.
func TestHostileReplies(t *testing.T) {
	data4k := make([]byte, 4096)
	read := func(c *Conn) error { _, err := c.ReadAt(make([]byte, 4096), 0); return err }
	status := func(c *Conn) error { _, err := c.BlockStatus(context.Background(), 0, 4096, false); return err }
	cases := []struct {
		name  string
		opts  Options
		op    func(c *Conn) error
		reply func(f *fake, r wire.Request)
	}{
		{"data past the request", modes[1].opts, read, func(f *fake, r wire.Request) {
			f.chunk(r, wire.ReplyFlagDone, wire.ReplyTypeOffsetData, offsetData(0, make([]byte, 8192)))
		}},
		{"huge data chunk", modes[1].opts, read, func(f *fake, r wire.Request) {
			f.chunkLen(r, wire.ReplyTypeOffsetData, 1<<32-1, nil)
		}},
		{"data outside the request", modes[1].opts, read, func(f *fake, r wire.Request) {
			f.chunk(r, wire.ReplyFlagDone, wire.ReplyTypeOffsetData, offsetData(1<<19, data4k))
		}},
		{"overlapping chunks", modes[1].opts, read, func(f *fake, r wire.Request) {
			f.chunk(r, 0, wire.ReplyTypeOffsetData, offsetData(0, data4k))
			f.chunk(r, wire.ReplyFlagDone, wire.ReplyTypeOffsetHole, wire.AppendOffsetHole(nil, 100, 1))
		}},
		{"chunks short of the request", modes[2].opts, read, func(f *fake, r wire.Request) {
			f.chunk(r, 0, wire.ReplyTypeOffsetData, offsetData(0, data4k[:100]))
			f.chunk(r, wire.ReplyFlagDone, wire.ReplyTypeNone, nil)
		}},
		{"hole of 0 bytes", modes[1].opts, read, func(f *fake, r wire.Request) {
			f.chunk(r, wire.ReplyFlagDone, wire.ReplyTypeOffsetHole, wire.AppendOffsetHole(nil, 0, 0))
		}},
		{"simple reply to a structured read", modes[1].opts, read, func(f *fake, r wire.Request) {
			f.write(append(wire.AppendSimpleReply(nil, 0, r.Cookie), data4k...))
		}},
		{"structured reply without negotiation", modes[0].opts, read, func(f *fake, r wire.Request) {
			f.chunk(r, wire.ReplyFlagDone, wire.ReplyTypeOffsetData, offsetData(0, data4k))
		}},
		{"unknown cookie", modes[0].opts, read, func(f *fake, r wire.Request) {
			f.write(append(wire.AppendSimpleReply(nil, 0, r.Cookie+1000), data4k...))
		}},
		{"bad reply magic", modes[0].opts, read, func(f *fake, r wire.Request) { f.write(make([]byte, 16)) }},
		{"extended offset mismatch", modes[2].opts, read, func(f *fake, r wire.Request) {
			r.Offset++
			f.chunk(r, wire.ReplyFlagDone, wire.ReplyTypeNone, nil)
		}},
		{"unknown chunk type", modes[1].opts, read, func(f *fake, r wire.Request) {
			f.chunk(r, wire.ReplyFlagDone, 77, nil)
		}},
		{"error message past the chunk", modes[1].opts, read, func(f *fake, r wire.Request) {
			f.chunk(r, wire.ReplyFlagDone, wire.ReplyTypeError, []byte{0, 0, 0, 5, 0x10, 0})
		}},
		{"huge error chunk", modes[2].opts, read, func(f *fake, r wire.Request) {
			f.chunkLen(r, wire.ReplyTypeError, 1<<40, nil)
		}},
		{"block status huge count", modes[2].opts, status, func(f *fake, r wire.Request) {
			f.chunkLen(r, wire.ReplyTypeBlockStatusExt, 8+16*(1<<30), binary.BigEndian.AppendUint32([]byte{0, 0, 0, 1}, 1<<30))
		}},
		{"block status count mismatch", modes[2].opts, status, func(f *fake, r wire.Request) {
			f.chunk(r, wire.ReplyFlagDone, wire.ReplyTypeBlockStatusExt, wire.AppendBlockStatus(nil, 1,
				[]wire.Descriptor{{Length: 4096}}, true)[:8])
		}},
		{"block status unknown context", modes[1].opts, status, func(f *fake, r wire.Request) {
			f.chunk(r, wire.ReplyFlagDone, wire.ReplyTypeBlockStatus, wire.AppendBlockStatus(nil, 7, []wire.Descriptor{{Length: 4096}}, false))
		}},
		{"block status zero length", modes[1].opts, status, func(f *fake, r wire.Request) {
			f.chunk(r, wire.ReplyFlagDone, wire.ReplyTypeBlockStatus, wire.AppendBlockStatus(nil, 1, []wire.Descriptor{{Length: 0}}, false))
		}},
		{"block status past the request", modes[1].opts, status, func(f *fake, r wire.Request) {
			f.chunk(r, wire.ReplyFlagDone, wire.ReplyTypeBlockStatus, wire.AppendBlockStatus(nil, 1,
				[]wire.Descriptor{{Length: 4096}, {Length: 512}}, false))
		}},
		{"compact status with extended headers", modes[2].opts, status, func(f *fake, r wire.Request) {
			f.chunk(r, wire.ReplyFlagDone, wire.ReplyTypeBlockStatus, wire.AppendBlockStatus(nil, 1, []wire.Descriptor{{Length: 4096}}, false))
		}},
		{"dropped", modes[1].opts, read, func(f *fake, r wire.Request) { f.nc.Close() }},
		{"dropped mid-data", modes[0].opts, read, func(f *fake, r wire.Request) {
			f.write(append(wire.AppendSimpleReply(nil, 0, r.Cookie), data4k[:100]...))
			f.nc.Close()
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			nc := startFake(t, func(f *fake) {
				f.greet()
				f.negotiate(nil)
				r := f.request()
				if r.Type != wire.CmdDisc {
					tc.reply(f, r)
				}
				io.Copy(io.Discard, f.br)
			})
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			c, err := New(ctx, nc, tc.opts)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			err = tc.op(c)
			if !errors.Is(err, ErrDisconnected) {
				t.Fatalf("%v, want ErrDisconnected", err)
			}
			t.Logf("%v", err)
			if err := tc.op(c); !errors.Is(err, ErrDisconnected) {
				t.Fatalf("next request: %v, want ErrDisconnected", err)
			}
		})
	}
}

// TestCancel cancels a request waiting for its reply: it returns the
// context's error at once, and the connection goes on serving requests
// answered out of order, its late reply dropped.
func TestCancel(t *testing.T) {
	got := make(chan wire.Request, 2)
	release := make(chan struct{})
	nc := startFake(t, func(f *fake) {
		f.greet()
		f.negotiate(nil)
		a := f.request()
		got <- a
		b := f.request()
		got <- b
		<-release
		f.write(append(wire.AppendSimpleReply(nil, 0, b.Cookie), bytes.Repeat([]byte{'b'}, int(b.Length))...))
		f.write(append(wire.AppendSimpleReply(nil, 0, a.Cookie), bytes.Repeat([]byte{'a'}, int(a.Length))...))
		c := f.request()
		f.write(wire.AppendSimpleReply(nil, uint32(wire.EIO), c.Cookie))
		for r := f.request(); r.Type != wire.CmdDisc; r = f.request() {
			f.write(wire.AppendSimpleReply(nil, 0, r.Cookie)) // the flush of Close
		}
	})
	c, err := New(context.Background(), nc, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithCancel(context.Background())
	errA := make(chan error)
	bufA := make([]byte, 512)
	go func() { _, err := c.ReadAtContext(ctx, bufA, 0); errA <- err }()
	<-got
	errB := make(chan error)
	bufB := make([]byte, 1024)
	go func() { _, err := c.ReadAt(bufB, 4096); errB <- err }()
	<-got
	cancel()
	if err := <-errA; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled read: %v", err)
	}
	close(release)
	if err := <-errB; err != nil || !bytes.Equal(bufB, bytes.Repeat([]byte{'b'}, 1024)) {
		t.Fatalf("second read: %v", err)
	}
	if !bytes.Equal(bufA, make([]byte, 512)) {
		t.Fatal("the cancelled read's buffer was written after it returned")
	}
	_, err = c.ReadAt(make([]byte, 512), 0)
	var e *Error
	if !errors.As(err, &e) || e.Errno != wire.EIO {
		t.Fatalf("third read: %v, want NBD_EIO", err)
	}
}
