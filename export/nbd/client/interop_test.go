package client

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"testing"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/export/nbd/internal/wire"
	"github.com/imgloop/imgloop/internal/qemutest"
)

// TestQemuNBD talks to qemu-nbd (7.2: no extended headers, so asking for
// them falls back to structured replies): reads match qemu-img convert,
// the map (base:allocation, qemu:allocation-depth) matches qemu-img map
// (but for the zero flag),
// and writes and zeroing read back.
func TestQemuNBD(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io", "qemu-nbd")
	p := makeQcow2(t, t.TempDir(), "12M")
	want := qemutest.RawBytes(t, p)
	// qemu-nbd reports the host-file holes inside a data cluster as
	// data without NBD_STATE_ZERO, where qemu-img map says zero: the
	// comparison leaves the zero flag out.
	wantMap := noZero(qemuMap(t, p, true))
	sock := filepath.Join(shortDir(t), "q")
	startProcess(t, sock, "qemu-nbd", "-t", "-A", "-k", sock, "-f", "qcow2", p)
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			c := dialAt(t, "unix", sock, m.opts)
			if m.opts.ExtendedHeaders && (c.ExtendedHeaders() || !c.StructuredReplies()) {
				t.Fatalf("extended %v structured %v: want the fallback to structured replies", c.ExtendedHeaders(), c.StructuredReplies())
			}
			if got := readAll(t, c, 5<<20); !bytes.Equal(got, want) {
				t.Fatalf("read differs from qemu-img convert at %d", qemutest.FirstDiff(got, want))
			}
			if m.opts.MetaContexts != nil {
				if len(c.MetaContexts()) != 2 {
					t.Fatalf("contexts %v", c.MetaContexts())
				}
				if got := noZero(clientMap(t, c, true)); fmt.Sprint(got) != fmt.Sprint(wantMap) {
					t.Fatalf("map:\nclient   %v\nqemu-img %v", got, wantMap)
				}
			}
		})
	}
	// Writes last: qemu-nbd allocates what it writes.
	c := dialAt(t, "unix", sock, modes[2].opts)
	m := modes[2]
	model := append([]byte(nil), want...)
	data := bytes.Repeat([]byte(m.name), 20000)
	off := int64(5<<20 + 333)
	if _, err := c.WriteAtFUA(data, off); err != nil {
		t.Fatal(err)
	}
	copy(model[off:], data)
	if err := c.WriteZeroes(64<<10, 100000, disk.ZeroNoUnmap); err != nil {
		t.Fatal(err)
	}
	clear(model[64<<10 : 64<<10+100000])
	if err := c.Cache(context.Background(), 0, 1<<20); err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, c, 1<<20); !bytes.Equal(got, model) {
		t.Fatalf("after writes: differs from the model at %d", qemutest.FirstDiff(got, model))
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestNbdkit talks to nbdkit's memory plugin: writes, zeroing (fast
// too), trims and block status.
func TestNbdkit(t *testing.T) {
	sock := filepath.Join(shortDir(t), "k")
	startProcess(t, sock, "nbdkit", "-f", "-U", sock, "memory", "64M")
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			c := dialAt(t, "unix", sock, m.opts)
			if c.Size() != 64<<20 {
				t.Fatalf("size %d", c.Size())
			}
			base := int64(len(m.name)) << 22 // a region per mode
			data := bytes.Repeat([]byte{0xa5}, 3<<20)
			if _, err := c.WriteAt(data, base); err != nil {
				t.Fatal(err)
			}
			if err := c.WriteZeroes(base+1<<20, 1<<20, 0); err != nil {
				t.Fatal(err)
			}
			if err := c.WriteZeroes(base+2<<20, 512<<10, disk.ZeroFast); err != nil && !isSlowZero(err) {
				t.Fatal(err)
			}
			if err := c.Discard(base+2<<20, 512<<10); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, 2<<20)
			if _, err := c.ReadAt(got, base); err != nil {
				t.Fatal(err)
			}
			want := append(bytes.Repeat([]byte{0xa5}, 1<<20), make([]byte, 1<<20)...)
			if !bytes.Equal(got, want) {
				t.Fatalf("read back differs at %d", qemutest.FirstDiff(got, want))
			}
			if m.opts.MetaContexts == nil {
				return
			}
			e, err := c.Map(base, 1<<20)
			if err != nil {
				t.Fatal(err)
			}
			if e.Status&disk.StatusData == 0 || e.Length != 1<<20 {
				t.Fatalf("Map of written data = %+v", e)
			}
			chunks, err := c.BlockStatus(context.Background(), 60<<20, 4<<20, false)
			if err != nil {
				t.Fatal(err)
			}
			if len(chunks) != 1 || chunks[0].Context != wire.ContextBaseAllocation ||
				chunks[0].Descriptors[0].Status != uint64(wire.StateHole|wire.StateZero) {
				t.Fatalf("block status of an unwritten range: %+v", chunks)
			}
		})
	}
}

func isSlowZero(err error) bool { return err != nil && errors.Is(err, disk.ErrSlowZero) }

// noZero returns runs without their zero flags, merged.
func noZero(runs []mapRun) []mapRun {
	var out []mapRun
	for _, r := range runs {
		r.Zero = false
		out = merge(out, r)
	}
	return out
}

// TestMinimumBlockSize talks to nbdkit enforcing a 4 KiB minimum block
// size (the blocksize-policy filter fails unaligned requests): unaligned
// reads, writes and zeroing go through whole blocks.
func TestMinimumBlockSize(t *testing.T) {
	sock := filepath.Join(shortDir(t), "k")
	startProcess(t, sock, "nbdkit", "-f", "-U", sock, "--filter=blocksize-policy", "memory", "4M",
		"blocksize-minimum=4096", "blocksize-preferred=4096", "blocksize-maximum=65536", "blocksize-error-policy=error")
	c := dialAt(t, "unix", sock, modes[1].opts)
	if bs := c.BlockSize(); bs.Minimum != 4096 || bs.Maximum != 65536 {
		t.Fatalf("block size %+v", bs)
	}
	model := make([]byte, c.Size())
	for i, w := range []struct{ off, n int64 }{{1, 10}, {4095, 2}, {5000, 100000}, {8192, 4096}, {c.Size() - 3, 3}} {
		b := bytes.Repeat([]byte{byte(i + 1)}, int(w.n))
		if _, err := c.WriteAt(b, w.off); err != nil {
			t.Fatalf("WriteAt(%d, %d): %v", w.off, w.n, err)
		}
		copy(model[w.off:], b)
	}
	if err := c.WriteZeroes(6000, 20000, 0); err != nil {
		t.Fatal(err)
	}
	clear(model[6000:26000])
	if err := c.WriteZeroes(100, 10, disk.ZeroFast); !errors.Is(err, disk.ErrSlowZero) {
		t.Fatalf("unaligned fast zero: %v, want ErrSlowZero", err)
	}
	got := make([]byte, 200001)
	if _, err := c.ReadAt(got, 3); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, model[3:200004]) {
		t.Fatalf("unaligned read differs at %d", qemutest.FirstDiff(got, model[3:200004]))
	}
	if all := readAll(t, c, 1<<20); !bytes.Equal(all, model) {
		t.Fatalf("read differs at %d", qemutest.FirstDiff(all, model))
	}
}
