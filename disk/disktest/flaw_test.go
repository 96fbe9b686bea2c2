package disktest

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/imgloop/imgloop/disk"
)

// The suite is tested by running it over models with one flaw each, in a
// child process (a failing subtest cannot be expected in-process): the
// case that owns the rule must fail, saying why.

// flaw is a Model broken in one way, and what the suite must say of it.
type flaw struct {
	name string
	mo   ModelOptions
	opts Options
	// want is the suite case that must fail, and msg a part of its
	// failure message.
	want, msg string
}

var flaws = []flaw{
	{name: "discard-zeroes-head-tail", want: "Discard", msg: "the whole units: "},
	{name: "discard-allocates", want: "Discard", msg: "allocated"},
	{name: "discard-noop", want: "Discard", msg: "is not zero"},
	{name: "slow-zero-changes", want: "FastZero", msg: "failed with ErrSlowZero, and changed the image"},
	{name: "slow-zero-not-supported", want: "FastZero", msg: "matches ErrNotSupported"},
	{name: "aligned-zero-slow", want: "FastZero", msg: "claims Zero and the range is aligned"},
	{name: "ro-discards", mo: ModelOptions{ReadOnly: true}, opts: Options{ReadOnly: true}, want: "ReadOnly", msg: "want ErrReadOnly"},
	{name: "ro-states-discard", mo: ModelOptions{ReadOnly: true}, opts: Options{ReadOnly: true}, want: "Capabilities", msg: "states Discard"},
	{name: "claims-fua-without-writer", want: "Capabilities", msg: "not a disk.FUAWriter"},
	{name: "resize-silent", want: "Resize", msg: "watcher A saw sizes []"},
	{name: "limits-not-pow2", want: "Limits", msg: "want a power of two"},
	{name: "max-below-preferred", want: "Limits", msg: "MinTransfer <= PreferredTransfer <= MaxTransfer"},
	{name: "flush-after-close", want: "Close", msg: "Flush after Close: <nil>"},
	{name: "closed-wrong-error", want: "CloseInFlight", msg: "want nil or ErrClosed"},
	{name: "fua-drops-write", want: "FUA", msg: "read back"},
	{name: "read-other-range", want: "ParallelMixed", msg: "another range's data"},
}

// flawed wraps a Model with one flaw (see flaws).
type flawed struct {
	*Model
	flaw  string
	reads atomic.Int64
}

// flawedNoFUA states capabilities over an image without optional
// interfaces.
type flawedNoFUA struct {
	disk.Image
	caps disk.Capabilities
}

func (f flawedNoFUA) Capabilities() disk.Capabilities { return f.caps }

func (f *flawed) Discard(off, n int64) error {
	switch f.flaw {
	case "discard-zeroes-head-tail":
		return f.Model.WriteZeroes(off, n, 0)
	case "discard-allocates":
		if err := f.Model.Discard(off, n); err != nil {
			return err
		}
		f.Model.mu.Lock()
		defer f.Model.mu.Unlock()
		f.Model.allocate(off, n)
		return nil
	case "ro-discards", "discard-noop":
		return nil
	}
	return f.Model.Discard(off, n)
}

func (f *flawed) WriteZeroes(off, n int64, flags disk.ZeroFlags) error {
	if flags&disk.ZeroFast != 0 {
		switch f.flaw {
		case "slow-zero-changes":
			if n > 1 {
				f.Model.WriteZeroes(off, n/2, 0)
				return disk.ErrSlowZero
			}
		case "slow-zero-not-supported":
			return fmt.Errorf("%w (%w)", disk.ErrSlowZero, disk.ErrNotSupported)
		case "aligned-zero-slow":
			return disk.ErrSlowZero
		}
	}
	return f.Model.WriteZeroes(off, n, flags)
}

func (f *flawed) Capabilities() disk.Capabilities {
	c := f.Model.Capabilities()
	if f.flaw == "ro-states-discard" {
		c.Discard = true
	}
	return c
}

func (f *flawed) NotifyResize(fn func(int64)) func() {
	if f.flaw == "resize-silent" {
		return func() {}
	}
	return f.Model.NotifyResize(fn)
}

func (f *flawed) Limits() disk.Limits {
	l := f.Model.Limits()
	switch f.flaw {
	case "limits-not-pow2":
		l.PreferredTransfer = 3000
	case "max-below-preferred":
		l.MaxTransfer = 2048
		l.PreferredTransfer = 4096
	}
	return l
}

func (f *flawed) Flush() error {
	err := f.Model.Flush()
	if f.flaw == "flush-after-close" && errors.Is(err, disk.ErrClosed) {
		return nil
	}
	return err
}

func (f *flawed) WriteAt(p []byte, off int64) (int, error) {
	n, err := f.Model.WriteAt(p, off)
	if f.flaw == "closed-wrong-error" && errors.Is(err, disk.ErrClosed) {
		return n, os.ErrClosed // a host file's error leaking through
	}
	return n, err
}

func (f *flawed) WriteAtFUA(p []byte, off int64) (int, error) {
	if f.flaw == "fua-drops-write" {
		return len(p), nil
	}
	return f.Model.WriteAtFUA(p, off)
}

func (f *flawed) ReadAt(p []byte, off int64) (int, error) {
	n, err := f.Model.ReadAt(p, off)
	// Long reads (the racing readers'; writers read within a chunk)
	// sometimes get 8 bytes of another range.
	if f.flaw == "read-other-range" && err == nil && len(p) > parallelChunk && f.reads.Add(1)%7 == 0 {
		other := off + int64(len(p))
		if other+8 <= f.Size() {
			f.Model.ReadAt(p[16:24], other)
		}
	}
	return n, err
}

// open returns the flawed image for a flaw's name.
func (fl flaw) open(content []byte) disk.Image {
	f := &flawed{Model: NewModelWith(content, fl.mo), flaw: fl.name}
	if fl.name == "claims-fua-without-writer" {
		// An image with no optional interface that claims FUA.
		return flawedNoFUA{Image: plainImage{f}, caps: disk.Capabilities{Flush: true, FUA: true}}
	}
	return f
}

// plainImage hides every optional interface of an image.
type plainImage struct{ disk.Image }

func TestFlawedModel(t *testing.T) {
	name := os.Getenv("DISKTEST_FLAW")
	if name == "" {
		t.Skip("run by TestSuiteCatchesFlaws")
	}
	for _, fl := range flaws {
		if fl.name != name {
			continue
		}
		content := make([]byte, 3<<20+512)
		fill(rand.New(rand.NewPCG(5, 5)), content)
		clear(content[1<<20 : 2<<20])
		opts := fl.opts
		opts.Model = content
		Run(t, func(t *testing.T) disk.Image { return fl.open(content) }, opts)
		return
	}
	t.Fatalf("no flaw %q", name)
}

// TestSuiteCatchesFlaws runs the suite's case for each flaw over a model
// with that flaw, in a child process, and checks that the case fails with
// the expected message.
func TestSuiteCatchesFlaws(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a child process per flaw")
	}
	exe, err := os.Executable()
	if err != nil {
		t.Skip(err)
	}
	for _, fl := range flaws {
		t.Run(fl.name, func(t *testing.T) {
			cmd := exec.Command(exe, "-test.run=^TestFlawedModel$/^"+fl.want+"$", "-test.v", "-test.count=1")
			cmd.Env = append(os.Environ(), "DISKTEST_FLAW="+fl.name)
			out, err := cmd.CombinedOutput()
			if err == nil {
				t.Fatalf("the suite's %s case passed a model with the flaw %q:\n%s", fl.want, fl.name, out)
			}
			if !strings.Contains(string(out), "--- FAIL: TestFlawedModel/"+fl.want) || !strings.Contains(string(out), fl.msg) {
				t.Fatalf("flaw %q: want case %s to fail saying %q; output:\n%s", fl.name, fl.want, fl.msg, out)
			}
		})
	}
}

// TestRandomOpsCatchesDiscardFlaws: the differential test holds discard
// to the contract too.
func TestRandomOpsCatchesDiscardFlaws(t *testing.T) {
	for _, name := range []string{"discard-zeroes-head-tail", "discard-noop"} {
		ft := &fakeT{TB: t}
		done := make(chan struct{})
		go func() {
			defer close(done)
			img := &flawed{Model: NewModel(1 << 20), flaw: name}
			RandomOps(ft, 1, img, NewModel(1<<20), 300)
		}()
		<-done
		if !ft.failed {
			t.Errorf("RandomOps did not notice the flaw %q", name)
		}
	}
}
