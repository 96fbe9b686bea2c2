package nbd

import (
	"bytes"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/imgloop/imgloop/export/nbd/internal/wire"
	"github.com/imgloop/imgloop/internal/qemutest"
)

// readAll reads the whole export over r in pieces of chunk bytes, all
// sent at once (the server bounds what it takes in; the socket buffers
// the rest), returning the bytes.
func readAll(r *rawConn, size, chunk int64) ([]byte, error) {
	out := make([]byte, size)
	n := int((size + chunk - 1) / chunk)
	go func() {
		for i := range n {
			off := int64(i) * chunk
			r.request(wire.Request{Type: wire.CmdRead, Cookie: uint64(i), Offset: uint64(off), Length: uint64(min(chunk, size-off))}, false, nil)
		}
	}()
	for range n {
		cookie, errno, chunks, payloads := r.reply(false)
		if errno != 0 {
			return nil, fmt.Errorf("read %d: %s", cookie, wire.ErrorName(errno))
		}
		for i, c := range chunks {
			p := payloads[i]
			switch c.Type {
			case wire.ReplyTypeOffsetData:
				off := int64(beUint64(p))
				copy(out[off:], p[8:])
			case wire.ReplyTypeOffsetHole:
				off, hole := int64(beUint64(p)), int64(beUint32(p[8:]))
				clear(out[off : off+hole])
			}
		}
	}
	return out, nil
}

func beUint64(b []byte) uint64 { return uint64(beUint32(b))<<32 | uint64(beUint32(b[4:])) }
func beUint32(b []byte) uint32 {
	return uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
}

// TestFleet: 64 clients at once read one read-only qcow2 over TCP
// loopback (a fleet booting from one golden image); each gets the
// oracle's bytes. The fleet runs alone, then beside bad clients (garbage,
// readers that never read their replies, vanishing clients), and the
// test logs how much of its throughput it kept.
func TestFleet(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	src := makeQcow2(t, dir, "10M")
	want := qemutest.RawBytes(t, src)
	img := openImage(t, src, "qcow2", true)
	// The write deadline stays generous: under -race on a loaded CI machine a
	// good client may wait seconds for its turn; the slow reader that never
	// reads is hostile_test.go's case, with a short deadline.
	s := startServer(t, []Export{{Image: img}}, Options{WriteTimeout: 60 * time.Second})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go s.Serve(ln)
	addr := ln.Addr().String()
	alone := runFleet(t, addr, want, false)
	beside := runFleet(t, addr, want, true)
	t.Logf("64 clients read %d MiB each: %v alone, %v beside bad clients (%.0f%% of the throughput kept)",
		len(want)>>20, alone, beside, 100*alone.Seconds()/beside.Seconds())
}

// runFleet runs 64 clients reading the export at addr, with bad clients
// beside them if bad, and returns how long the fleet took.
func runFleet(t *testing.T, addr string, want []byte, bad bool) time.Duration {
	stop := make(chan struct{})
	var badWG sync.WaitGroup
	var badConns atomic.Int64
	for i := range 4 {
		if !bad {
			break
		}
		badWG.Add(1)
		go func() { // bad clients: garbage, slow readers, vanishing
			defer badWG.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				nc, err := net.Dial("tcp", addr)
				if err != nil {
					continue
				}
				badConns.Add(1)
				switch i {
				case 0:
					nc.Write(bytes.Repeat([]byte{0x42}, 4096))
				case 1, 2:
					hello := make([]byte, 18)
					if _, err := nc.Read(hello); err == nil {
						nc.Write([]byte{0, 0, 0, 3})
						nc.Write(wire.AppendOption(nil, wire.OptExportName, nil))
						for j := range 256 {
							nc.Write(wire.AppendRequest(nil, wire.Request{Type: wire.CmdRead, Cookie: uint64(j), Length: 1 << 20}, false))
						}
						if i == 2 {
							time.Sleep(100 * time.Millisecond)
						}
					}
				case 3:
					time.Sleep(10 * time.Millisecond)
				}
				nc.Close()
			}
		}()
	}
	const clients = 64
	var wg sync.WaitGroup
	start := time.Now()
	errs := make(chan error, clients)
	for range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := dialRawNet(t, "tcp", addr)
			// 64 clients share 2 cores (slower still under -race).
			r.nc.SetDeadline(time.Now().Add(3 * time.Minute))
			r.start(true, false)
			got, err := readAll(r, int64(len(want)), 256<<10)
			if err != nil {
				errs <- err
				return
			}
			if !bytes.Equal(got, want) {
				errs <- fmt.Errorf("client read differs at %d", qemutest.FirstDiff(got, want))
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	close(stop)
	badWG.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if bad && badConns.Load() == 0 {
		t.Error("no bad client connected")
	}
	return elapsed
}
