package nbd

import (
	"bytes"
	"encoding/binary"
	"io"
	"net"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/imgloop/imgloop/disk/disktest"
	"github.com/imgloop/imgloop/export/nbd/internal/wire"
)

// modelServer serves an in-memory model image of size bytes.
func modelServer(t *testing.T, size int64, opts Options) (*testServer, *disktest.Model) {
	t.Helper()
	m := disktest.NewModel(size)
	return startServer(t, []Export{{Image: m}}, opts), m
}

// waitIdle waits until the server has no connections left.
func waitIdle(t *testing.T, s *testServer) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); s.Connections() > 0; {
		if time.Now().After(deadline) {
			t.Fatalf("%d connections still open", s.Connections())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestHostileHandshake sends malformed handshakes: each ends with a
// clean close or an error reply, never a hang or a crash, and a good
// client is served afterwards.
func TestHostileHandshake(t *testing.T) {
	s, _ := modelServer(t, 1<<20, Options{HandshakeTimeout: 2 * time.Second})
	tests := []struct {
		name string
		run  func(r *rawConn) // ends with the connection closed by the server
	}{
		{"unknown client flags", func(r *rawConn) { r.flags(1 << 7) }},
		{"no fixed newstyle", func(r *rawConn) { r.flags(0) }},
		{"bad option magic", func(r *rawConn) {
			r.flags(wire.FlagCFixedNewstyle)
			r.write(bytes.Repeat([]byte{0xff}, 16))
		}},
		{"option of a GiB", func(r *rawConn) {
			r.flags(wire.FlagCFixedNewstyle)
			r.write(wire.AppendOption(nil, wire.OptGo, nil)[:12])
			r.write(binary.BigEndian.AppendUint32(nil, 1<<30))
		}},
		{"export name unknown", func(r *rawConn) {
			r.flags(wire.FlagCFixedNewstyle)
			r.write(wire.AppendOption(nil, wire.OptExportName, []byte("nope")))
		}},
		{"silent client", func(r *rawConn) {}},
		{"half an option", func(r *rawConn) {
			r.flags(wire.FlagCFixedNewstyle)
			r.write(wire.AppendOption(nil, wire.OptGo, goRequest(""))[:20])
		}},
		{"errors then abort", func(r *rawConn) {
			r.flags(wire.FlagCFixedNewstyle)
			for _, c := range []struct {
				opt  uint32
				data []byte
				want uint32
			}{
				{99, nil, wire.RepErrUnsup},
				{wire.OptPeekExport, nil, wire.RepErrUnsup},
				{wire.OptList, []byte{1}, wire.RepErrInvalid},
				{wire.OptInfo, []byte{0, 0, 0, 9, 'x'}, wire.RepErrInvalid},
				{wire.OptGo, binary.BigEndian.AppendUint16(wire.AppendString(nil, ""), 3), wire.RepErrInvalid},
				{wire.OptGo, goRequest("nope"), wire.RepErrUnknown},
				{wire.OptSetMetaContext, setMeta("", wire.ContextBaseAllocation), wire.RepErrInvalid}, // before structured replies
				{wire.OptStartTLS, nil, wire.RepErrPolicy},
				{wire.OptExtendedHeaders, nil, wire.RepAck},
				{wire.OptStructuredReply, nil, wire.RepErrExtHeaderReqd},
				{wire.OptSetMetaContext, []byte{0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff}, wire.RepErrInvalid},
				{wire.OptSetMetaContext, setMeta("nope", wire.ContextBaseAllocation), wire.RepErrUnknown},
				{wire.OptListMetaContext, setMeta(""), wire.RepAck},
			} {
				if got := last(r.option(c.opt, c.data)); got != c.want {
					r.t.Errorf("option %d: reply %#x, want %#x", c.opt, got, c.want)
				}
			}
			if got := last(r.option(wire.OptAbort, nil)); got != wire.RepAck {
				r.t.Errorf("ABORT: %#x", got)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := dialRaw(t, s.sock)
			tt.run(r)
			if !r.closed() {
				t.Error("the server did not close the connection")
			}
		})
	}
	waitIdle(t, s)
	r := dialRaw(t, s.sock)
	r.start(true, false)
}

// TestHostileTransmission sends bad requests: errors for those the
// stream survives, a hard disconnect for the others; other connections
// go on.
func TestHostileTransmission(t *testing.T) {
	s, m := modelServer(t, 1<<20, Options{})
	good := dialRaw(t, s.sock)
	good.start(true, false)
	type step struct {
		req     wire.Request
		payload []byte
		want    uint32 // errno
	}
	tests := []struct {
		name       string
		extended   bool
		steps      []step
		disconnect []byte // sent last: the server must close
	}{
		{name: "unknown command", steps: []step{{req: wire.Request{Type: 42, Cookie: 1}, want: wire.EINVAL}}},
		{name: "resize not offered", steps: []step{{req: wire.Request{Type: wire.CmdResize, Cookie: 1}, want: wire.EINVAL}}},
		{name: "write over the maximum is drained", steps: []step{
			{req: wire.Request{Type: wire.CmdWrite, Cookie: 1, Length: 33 << 20}, payload: make([]byte, 33<<20), want: wire.EINVAL},
			{req: wire.Request{Type: wire.CmdWrite, Cookie: 2, Length: 4}, payload: []byte("abcd")},
		}},
		{name: "write past the end is drained", steps: []step{
			{req: wire.Request{Type: wire.CmdWrite, Cookie: 1, Offset: 1 << 20, Length: 4096}, payload: make([]byte, 4096), want: wire.ENOSPC},
		}},
		{name: "payload flag without extended headers", steps: []step{
			{req: wire.Request{Type: wire.CmdRead, Flags: wire.CmdFlagPayloadLen, Cookie: 1, Length: 8}, want: wire.EINVAL}}},
		{name: "offset overflow", steps: []step{
			{req: wire.Request{Type: wire.CmdRead, Cookie: 1, Offset: 1<<64 - 512, Length: 1024}, want: wire.EINVAL}}},
		{name: "bad request magic", disconnect: bytes.Repeat([]byte{0x25}, 28)},
		{name: "extended: write without payload flag", extended: true, steps: []step{
			{req: wire.Request{Type: wire.CmdWrite, Cookie: 1, Length: 4096}, want: wire.EINVAL}}},
		{name: "extended: read with a payload", extended: true, steps: []step{
			{req: wire.Request{Type: wire.CmdRead, Flags: wire.CmdFlagPayloadLen, Cookie: 1, Length: 8}, payload: make([]byte, 8), want: wire.EINVAL}}},
		{name: "extended: 64-bit trim past the end", extended: true, steps: []step{
			{req: wire.Request{Type: wire.CmdTrim, Cookie: 1, Length: 1 << 40}, want: wire.EINVAL}}},
		{name: "extended: block status payload naming an unknown context", extended: true, steps: []step{
			{req: wire.Request{Type: wire.CmdBlockStatus, Flags: wire.CmdFlagPayloadLen, Cookie: 1, Length: 12},
				payload: binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint64(nil, 4096), 7), want: wire.EINVAL}}},
		{name: "extended: payload over the maximum", extended: true,
			disconnect: wire.AppendRequest(nil, wire.Request{Type: wire.CmdWrite, Flags: wire.CmdFlagPayloadLen, Length: 1 << 40}, true)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := dialRaw(t, s.sock)
			r.start(true, tt.extended)
			for _, st := range tt.steps {
				r.request(st.req, tt.extended, st.payload)
				cookie, errno, _, _ := r.reply(tt.extended)
				if cookie != st.req.Cookie || errno != st.want {
					t.Fatalf("%s: cookie %d errno %s, want %d %s", wire.CmdName(st.req.Type), cookie,
						wire.ErrorName(errno), st.req.Cookie, wire.ErrorName(st.want))
				}
			}
			if tt.disconnect == nil {
				// Still serving.
				r.request(wire.Request{Type: wire.CmdFlush, Cookie: 9}, tt.extended, nil)
				if _, errno, _, _ := r.reply(tt.extended); errno != 0 {
					t.Fatalf("flush after the errors: %s", wire.ErrorName(errno))
				}
				return
			}
			r.write(tt.disconnect)
			if !r.closed() {
				t.Error("the server did not disconnect")
			}
		})
	}
	if got := m.Bytes()[:4]; string(got) != "abcd" {
		t.Errorf("the write after a drained one: %q", got)
	}
	good.request(wire.Request{Type: wire.CmdRead, Cookie: 5, Length: 4}, false, nil)
	if _, errno, _, p := good.reply(false); errno != 0 || string(p[0][8:]) != "abcd" {
		t.Errorf("other connection: errno %d, %q", errno, p)
	}
}

// TestVanishingClients drops connections at every point of a request:
// the server ends them, and nothing leaks.
func TestVanishingClients(t *testing.T) {
	s, _ := modelServer(t, 64<<20, Options{})
	before := runtime.NumGoroutine()
	write := wire.AppendRequest(nil, wire.Request{Type: wire.CmdWrite, Cookie: 1, Length: 1 << 20}, false)
	for cut := range []int{0, 1, 2, 3, 4} {
		for range 5 {
			r := dialRaw(t, s.sock)
			r.start(true, false)
			switch cut {
			case 1:
				r.write(write[:10]) // half a header
			case 2:
				r.write(append(write, make([]byte, 1000)...)) // half a payload
			case 3: // many reads in flight, replies never read
				for i := range 64 {
					r.request(wire.Request{Type: wire.CmdRead, Cookie: uint64(i), Length: 1 << 20}, false, nil)
				}
			case 4:
				r.request(wire.Request{Type: wire.CmdWriteZeroes, Cookie: 1, Length: 64 << 20}, false, nil)
			}
			r.nc.Close()
		}
	}
	waitIdle(t, s)
	for deadline := time.Now().Add(5 * time.Second); runtime.NumGoroutine() > before+2; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d goroutines, %d before", runtime.NumGoroutine(), before)
		}
	}
}

// TestSlowReader: a client that sends reads and never reads the replies
// holds at most the connection's byte cap and is disconnected after the
// write timeout; a good client beside it is served all along.
func TestSlowReader(t *testing.T) {
	s, _ := modelServer(t, 64<<20, Options{WriteTimeout: time.Second, MaxConnBytes: 8 << 20})
	var ms runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&ms)
	heapBefore := ms.HeapAlloc
	slow := dialRaw(t, s.sock)
	slow.start(true, false)
	go func() {
		for i := range 4096 {
			if _, err := slow.nc.Write(wire.AppendRequest(nil, wire.Request{Type: wire.CmdRead, Cookie: uint64(i), Length: 1 << 20}, false)); err != nil {
				return
			}
		}
	}()
	good := dialRaw(t, s.sock)
	good.start(false, false)
	deadline := time.Now().Add(3 * time.Second)
	for i := 0; time.Now().Before(deadline); i++ {
		good.request(wire.Request{Type: wire.CmdRead, Cookie: uint64(i), Offset: uint64(i%64) << 20, Length: 1 << 20}, false, nil)
		if _, errno, _, _ := good.reply(false); errno != 0 {
			t.Fatalf("good client: %s", wire.ErrorName(errno))
		}
		good.full(make([]byte, 1<<20))
		if i == 10 {
			runtime.ReadMemStats(&ms)
			if grown := int64(ms.HeapAlloc) - int64(heapBefore); grown > 96<<20 {
				t.Errorf("heap grew by %d MiB with a slow reader", grown>>20)
			}
		}
	}
	if !slow.closed() {
		t.Error("the slow reader was not disconnected")
	}
}

// TestSlowReadersHoldTotal: readers that never read their replies hold
// all of the server's total byte cap; a good client's small requests
// still go through on its connection's reserve, long before the slow
// readers are disconnected.
func TestSlowReadersHoldTotal(t *testing.T) {
	s, _ := modelServer(t, 64<<20, Options{WriteTimeout: time.Minute, MaxConnBytes: 40 << 20, MaxTotalBytes: 40 << 20})
	for range 3 {
		slow := dialRaw(t, s.sock)
		slow.start(true, false)
		go func() {
			for i := range 4096 {
				if _, err := slow.nc.Write(wire.AppendRequest(nil, wire.Request{Type: wire.CmdRead, Cookie: uint64(i), Length: 1 << 20}, false)); err != nil {
					return
				}
			}
		}()
	}
	// Wait until the slow readers hold the whole total.
	for deadline := time.Now().Add(10 * time.Second); s.total.TryAcquire(1); time.Sleep(10 * time.Millisecond) {
		s.total.Release(1)
		if time.Now().After(deadline) {
			t.Fatal("the slow readers never filled the total cap")
		}
	}
	good := dialRaw(t, s.sock)
	good.nc.SetDeadline(time.Now().Add(20 * time.Second))
	good.start(false, false)
	for i := range 200 {
		good.request(wire.Request{Type: wire.CmdRead, Cookie: uint64(i), Offset: uint64(i) << 16, Length: 64 << 10}, false, nil)
		if _, errno, _, _ := good.reply(false); errno != 0 {
			t.Fatalf("good client: %s", wire.ErrorName(errno))
		}
		good.full(make([]byte, 64<<10))
	}
}

// TestMaxClients: connections over the limit are closed at once.
func TestMaxClients(t *testing.T) {
	s, _ := modelServer(t, 1<<20, Options{MaxClients: 2})
	a, b := dialRaw(t, s.sock), dialRaw(t, s.sock)
	a.start(false, false)
	b.start(false, false)
	nc, err := net.Dial("unix", s.sock)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	nc.SetDeadline(time.Now().Add(5 * time.Second))
	if n, err := io.ReadFull(nc, make([]byte, 18)); err != io.EOF {
		t.Fatalf("third client: read %d bytes, %v; want EOF at once", n, err)
	}
	a.nc.Close()
	for deadline := time.Now().Add(5 * time.Second); s.Connections() > 1; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the closed connection was not released")
		}
	}
	dialRaw(t, s.sock).start(false, false)
}

// TestOutOfOrder: many requests in flight on one connection are all
// answered, with their own cookies, and reads return what was written.
func TestOutOfOrder(t *testing.T) {
	for _, mode := range []struct {
		name                 string
		structured, extended bool
	}{{"simple", false, false}, {"structured", true, false}, {"extended", true, true}} {
		t.Run(mode.name, func(t *testing.T) {
			s, _ := modelServer(t, 16<<20, Options{})
			r := dialRaw(t, s.sock)
			r.start(mode.structured, mode.extended)
			const n = 256
			var wg sync.WaitGroup
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range n {
					p := bytes.Repeat([]byte{byte(i)}, 4096)
					flags := uint16(0)
					if mode.extended {
						flags = wire.CmdFlagPayloadLen
					}
					r.request(wire.Request{Type: wire.CmdWrite, Flags: flags, Cookie: uint64(i), Offset: uint64(i) * 65536, Length: 4096}, mode.extended, p)
				}
			}()
			seen := map[uint64]bool{}
			for range n {
				cookie, errno, _, _ := r.reply(mode.extended)
				if errno != 0 || seen[cookie] || cookie >= n {
					t.Fatalf("reply cookie %d errno %d (seen %v)", cookie, errno, seen[cookie])
				}
				seen[cookie] = true
			}
			wg.Wait()
			for i := range n {
				r.request(wire.Request{Type: wire.CmdRead, Cookie: uint64(i), Offset: uint64(i) * 65536, Length: 4096}, mode.extended, nil)
				_, errno, chunks, p := r.reply(mode.extended)
				if errno != 0 {
					t.Fatal(wire.ErrorName(errno))
				}
				data := []byte(nil)
				if mode.structured {
					if len(chunks) != 1 || chunks[0].Type != wire.ReplyTypeOffsetData {
						t.Fatalf("read chunks %+v", chunks)
					}
					data = p[0][8:]
				} else {
					data = make([]byte, 4096)
					r.full(data)
				}
				if !bytes.Equal(data, bytes.Repeat([]byte{byte(i)}, 4096)) {
					t.Fatalf("read %d: wrong data", i)
				}
			}
		})
	}
}
