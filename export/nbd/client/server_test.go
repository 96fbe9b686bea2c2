package client

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/export/nbd"
	"github.com/imgloop/imgloop/export/nbd/internal/wire"
	"github.com/imgloop/imgloop/internal/qemutest"
	"github.com/imgloop/imgloop/internal/tlstest"
)

// mapRun is a run of the export with one status, for comparing maps.
type mapRun struct {
	Start, Length       int64
	Data, Zero, Present bool
	Depth               int
}

// merge appends r to runs, joining it with the last run when equal.
func merge(runs []mapRun, r mapRun) []mapRun {
	if k := len(runs); k > 0 {
		l := &runs[k-1]
		if l.Data == r.Data && l.Zero == r.Zero && l.Present == r.Present && l.Depth == r.Depth && l.Start+l.Length == r.Start {
			l.Length += r.Length
			return runs
		}
	}
	return append(runs, r)
}

// clientMap is the export's map through Conn.Map.
func clientMap(t testing.TB, c *Conn, depth bool) []mapRun {
	t.Helper()
	var runs []mapRun
	err := disk.Extents(c, 0, c.Size(), func(e disk.Extent) error {
		r := mapRun{Start: e.Offset, Length: e.Length, Data: e.Status&disk.StatusData != 0, Zero: e.Status&disk.StatusZero != 0}
		if depth {
			r.Present, r.Depth = e.Status&disk.StatusAllocated != 0, e.Depth
		}
		runs = merge(runs, r)
		return nil
	})
	if err != nil {
		t.Fatalf("Extents: %v", err)
	}
	return runs
}

// qemuMap is qemu-img map's view of image in the same terms.
func qemuMap(t testing.TB, image string, depth bool) []mapRun {
	t.Helper()
	var runs []mapRun
	for _, e := range qemutest.Map(t, image) {
		r := mapRun{Start: e.Start, Length: e.Length, Data: e.Data, Zero: e.Zero}
		if depth {
			r.Present = e.Present
			if e.Present {
				r.Depth = e.Depth
			}
		}
		runs = merge(runs, r)
	}
	return runs
}

// TestModes reads, writes and maps a qcow2 image through our server in
// every header mode, over a unix socket and TCP: reads match qemu-img
// convert, the map matches qemu-img map, and after writes, zeroing and
// trims from many goroutines the image is clean (qemu-img check) and
// equal to the model (qemu-img compare).
func TestModes(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	for _, network := range []string{"unix", "tcp"} {
		for _, m := range modes {
			t.Run(network+"/"+m.name, func(t *testing.T) {
				dir := t.TempDir()
				p := makeQcow2(t, dir, "12M")
				want := qemutest.RawBytes(t, p)
				wantMap := qemuMap(t, p, true)
				img, err := disk.Open(p, disk.OpenOptions{Format: "qcow2"})
				if err != nil {
					t.Fatal(err)
				}
				s := startServer(t, network, []nbd.Export{{Name: "x", Description: "the image", Image: img}}, nbd.Options{})
				opts := m.opts
				opts.ExportName = "x"
				c := s.dial(t, opts)
				if c.Name() != "x" || c.Description() != "the image" || c.Size() != int64(len(want)) {
					t.Fatalf("export %q %q size %d", c.Name(), c.Description(), c.Size())
				}
				structured := m.opts.StructuredReplies || m.opts.ExtendedHeaders
				if c.StructuredReplies() != structured || c.ExtendedHeaders() != m.opts.ExtendedHeaders {
					t.Fatalf("structured %v extended %v negotiated", c.StructuredReplies(), c.ExtendedHeaders())
				}
				if got := readAll(t, c, 3<<20+512); !bytes.Equal(got, want) {
					t.Fatalf("read differs from qemu-img convert at %d", qemutest.FirstDiff(got, want))
				}
				if structured {
					if got := clientMap(t, c, true); fmt.Sprint(got) != fmt.Sprint(wantMap) {
						t.Fatalf("map:\nclient   %v\nqemu-img %v", got, wantMap)
					}
				}
				model := append([]byte(nil), want...)
				concurrentWrites(t, c, model)
				if got := readAll(t, c, 1<<20); !bytes.Equal(got, model) {
					t.Fatalf("after writes: differs from the model at %d", qemutest.FirstDiff(got, model))
				}
				if err := c.Close(); err != nil {
					t.Fatalf("Close: %v", err)
				}
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				s.Shutdown(ctx)
				if err := img.Close(); err != nil {
					t.Fatal(err)
				}
				qemutest.Img(t, "check", p)
				mp := filepath.Join(dir, "model.raw")
				if err := os.WriteFile(mp, model, 0o644); err != nil {
					t.Fatal(err)
				}
				qemutest.Img(t, "compare", "-f", "raw", "-F", "qcow2", mp, p)
			})
		}
	}
}

// concurrentWrites writes, zeroes and trims disjoint stripes of c from
// many goroutines at once, keeping model up to date.
func concurrentWrites(t *testing.T, c *Conn, model []byte) {
	t.Helper()
	const workers, stripe = 16, 192 << 10
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Go(func() {
			r := rand.New(rand.NewPCG(uint64(w), 7))
			for off := int64(w * stripe); off+stripe <= c.Size(); off += workers * stripe {
				for i := range 6 {
					o := off + r.Int64N(stripe/2)
					n := 1 + r.Int64N(stripe/2)
					var err error
					switch i % 3 {
					case 0, 1:
						b := make([]byte, n)
						for j := range b {
							b[j] = byte(r.Uint32())
						}
						_, err = disk.WriteAtFlags(c, b, o, disk.WriteFlags(i%2))
						copy(model[o:], b)
					case 2:
						err = c.WriteZeroes(o, n, disk.ZeroFlags(r.IntN(2))*disk.ZeroNoUnmap)
						clear(model[o : o+n])
					}
					if err != nil {
						errs <- err
						return
					}
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
}

// TestBlockStatus64 asks an extended-headers connection for the status of
// more than 4 GiB at once: one 64-bit descriptor covers it.
func TestBlockStatus64(t *testing.T) {
	p := filepath.Join(t.TempDir(), "big.raw")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	const size = 10 << 30
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("data"), 6<<30); err != nil {
		t.Fatal(err)
	}
	f.Close()
	img := openImage(t, p, "raw", true)
	s := startServer(t, "unix", []nbd.Export{{Image: img}}, nbd.Options{})
	c := s.dial(t, modes[2].opts)
	chunks, err := c.BlockStatus(context.Background(), 0, size, false)
	if err != nil {
		t.Fatal(err)
	}
	for _, ch := range chunks {
		if ch.Context != wire.ContextBaseAllocation {
			continue
		}
		d := ch.Descriptors[0]
		if d.Length < 5<<30 || d.Status != uint64(wire.StateHole|wire.StateZero) {
			t.Fatalf("first descriptor %+v, want a hole of at least 5 GiB", d)
		}
		return
	}
	t.Fatalf("no base:allocation chunk in %+v", chunks)
}

// TestErrors sends requests our server must refuse, checking the typed
// errors, and that the connection goes on serving.
func TestErrors(t *testing.T) {
	dir := t.TempDir()
	var imgs []disk.Image
	for i, readOnly := range []bool{false, true} {
		p := filepath.Join(dir, fmt.Sprintf("%d.raw", i))
		if err := os.WriteFile(p, make([]byte, 1<<20), 0o644); err != nil {
			t.Fatal(err)
		}
		imgs = append(imgs, openImage(t, p, "raw", readOnly))
	}
	rw, ro := imgs[0], imgs[1]
	s := startServer(t, "unix", []nbd.Export{{Name: "rw", Image: rw}, {Name: "ro", Image: ro}}, nbd.Options{})
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			opts := m.opts
			opts.ExportName = "ro"
			cro := s.dial(t, opts)
			opts.ExportName = "rw"
			crw := s.dial(t, opts)
			ctx := context.Background()
			cases := []struct {
				name  string
				c     *Conn
				req   Request
				want  error
				errno uint32
			}{
				{"read past end", crw, Request{Type: wire.CmdRead, Offset: 1 << 20, Length: 512}, disk.ErrOutOfRange, wire.EINVAL},
				{"write to read-only", cro, Request{Type: wire.CmdWrite, Length: 512, Payload: make([]byte, 512)}, disk.ErrReadOnly, wire.EPERM},
				{"trim past end", crw, Request{Type: wire.CmdTrim, Offset: 1<<20 - 512, Length: 1024}, disk.ErrOutOfRange, wire.EINVAL},
				{"zeroes past end", crw, Request{Type: wire.CmdWriteZeroes, Offset: 1 << 20, Length: 1}, disk.ErrOutOfRange, wire.ENOSPC},
				{"unknown flag", crw, Request{Type: wire.CmdFlush, Flags: 1 << 9}, nil, wire.EINVAL},
				{"unknown command", crw, Request{Type: 99}, nil, wire.EINVAL},
				{"read over max", crw, Request{Type: wire.CmdRead, Length: 64 << 20}, nil, 0},
			}
			for _, tc := range cases {
				if m.name == "extended" && tc.req.Type == wire.CmdWrite {
					tc.req.Flags |= wire.CmdFlagPayloadLen
				}
				_, err := tc.c.RawRequest(ctx, tc.req)
				var e *Error
				if !errors.As(err, &e) {
					t.Errorf("%s: %v, want an *Error", tc.name, err)
					continue
				}
				if tc.want != nil && !errors.Is(err, tc.want) {
					t.Errorf("%s: %v does not match %v", tc.name, err, tc.want)
				}
				if tc.errno != 0 && e.Errno != tc.errno {
					t.Errorf("%s: %v, want %s", tc.name, err, wire.ErrorName(tc.errno))
				}
				if m.name != "simple" && e.Message == "" {
					t.Errorf("%s: no message with structured replies", tc.name)
				}
			}
			if _, err := cro.WriteAt(make([]byte, 512), 0); !errors.Is(err, disk.ErrReadOnly) {
				t.Errorf("WriteAt on read-only: %v", err)
			}
			if _, err := crw.ReadAt(make([]byte, 2), 1<<20-1); !errors.Is(err, disk.ErrOutOfRange) {
				t.Errorf("ReadAt past end: %v", err)
			}
			if _, err := crw.ReadAt(make([]byte, 512), 0); err != nil {
				t.Errorf("read after the errors: %v", err)
			}
		})
	}
}

// TestTLS connects with STARTTLS, and checks that a TLSRequired server
// refuses a plain client and that a plain server refuses TLS.
func TestTLS(t *testing.T) {
	pki := tlstest.New(t)
	p := filepath.Join(t.TempDir(), "a.raw")
	data := bytes.Repeat([]byte("tls!"), 64<<10)
	if err := os.WriteFile(p, data, 0o644); err != nil {
		t.Fatal(err)
	}
	img := openImage(t, p, "raw", true)
	exp := []nbd.Export{{Image: img}}
	s := startServer(t, "tcp", exp, nbd.Options{TLS: pki.ServerConfig(t, true), TLSRequired: true})
	for _, m := range modes {
		opts := m.opts
		opts.TLS = pki.ClientConfig(t)
		c := s.dial(t, opts)
		if got := readAll(t, c, 100000); !bytes.Equal(got, data) {
			t.Fatalf("%s over TLS: read differs at %d", m.name, qemutest.FirstDiff(got, data))
		}
	}
	ctx := context.Background()
	if _, err := Dial(ctx, s.network, s.addr, Options{}); !errors.Is(err, ErrTLSRequired) {
		t.Errorf("plain client to a TLSRequired server: %v, want ErrTLSRequired", err)
	}
	if _, err := List(ctx, s.network, s.addr, Options{}); !errors.Is(err, ErrTLSRequired) {
		t.Errorf("List without TLS on a TLSRequired server: %v, want ErrTLSRequired", err)
	}
	if l, err := List(ctx, s.network, s.addr, Options{TLS: pki.ClientConfig(t)}); err != nil || len(l) != 1 {
		t.Errorf("List with TLS: %v, %v", l, err)
	}
	plain := startServer(t, "tcp", exp, nbd.Options{})
	if _, err := Dial(ctx, plain.network, plain.addr, Options{TLS: pki.ClientConfig(t)}); !errors.Is(err, ErrTLSRefused) {
		t.Errorf("TLS client to a plain server: %v, want ErrTLSRefused", err)
	}
}

// TestList lists the exports of our server, and connects to an unknown
// one.
func TestList(t *testing.T) {
	p := filepath.Join(t.TempDir(), "a.raw")
	if err := os.WriteFile(p, make([]byte, 4096), 0o644); err != nil {
		t.Fatal(err)
	}
	img := openImage(t, p, "raw", true)
	s := startServer(t, "unix", []nbd.Export{{Name: "one", Description: "first", Image: img}, {Name: "two", Image: img}}, nbd.Options{})
	l, err := List(context.Background(), s.network, s.addr, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if want := []ExportInfo{{"one", "first"}, {"two", ""}}; fmt.Sprint(l) != fmt.Sprint(want) {
		t.Fatalf("List = %v, want %v", l, want)
	}
	_, err = Dial(context.Background(), s.network, s.addr, Options{ExportName: "three"})
	if !errors.Is(err, ErrUnknownExport) {
		t.Fatalf("Dial of an unknown export: %v, want ErrUnknownExport", err)
	}
}
