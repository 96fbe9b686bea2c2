package hostfiletest

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"testing"
)

func TestFaultyRules(t *testing.T) {
	custom := errors.New("disk on fire")
	cases := []struct {
		name  string
		setup func(f *Faulty)
		want  []bool // which of 5 writes fail
		err   error
	}{
		{"no rule", func(f *Faulty) {}, []bool{false, false, false, false, false}, nil},
		{"fail after 2", func(f *Faulty) { f.FailAfter(OpWrite, 2, nil) }, []bool{false, false, true, true, true}, ErrInjected},
		{"fail after 0", func(f *Faulty) { f.FailAfter(OpWrite, 0, custom) }, []bool{true, true, true, true, true}, custom},
		{"fail 3rd only", func(f *Faulty) { f.FailNth(OpWrite, 3, nil) }, []bool{false, false, false, true, false}, ErrInjected},
		{"other op", func(f *Faulty) { f.FailAfter(OpSync, 0, nil) }, []bool{false, false, false, false, false}, nil},
		{"reset", func(f *Faulty) { f.FailAfter(OpWrite, 0, nil); f.Reset() }, []bool{false, false, false, false, false}, nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			mem := NewMemFile("m", nil)
			f := NewFaulty(mem)
			c.setup(f)
			for i, wantFail := range c.want {
				_, err := f.WriteAt([]byte{byte(i)}, int64(i))
				if wantFail != (err != nil) || (wantFail && !errors.Is(err, c.err)) {
					t.Fatalf("write %d: %v, want failure %v (%v)", i, err, wantFail, c.err)
				}
				got := make([]byte, 1)
				_, rerr := mem.ReadAt(got, int64(i))
				if wantFail && rerr == nil && got[0] == byte(i) && i > 0 {
					t.Fatalf("write %d failed but reached the file", i)
				}
			}
			if n := f.Count(OpWrite); n != int64(len(c.want)) {
				t.Fatalf("Count(OpWrite) = %d, want %d", n, len(c.want))
			}
		})
	}
}

func TestFaultyForwards(t *testing.T) {
	mem := NewMemFile("inner", []byte("0123456789"))
	f := NewFaulty(mem)
	if f.Name() != "inner" || f.Unwrap() != File(mem) {
		t.Fatal("Name or Unwrap does not reach the wrapped file")
	}
	if err := f.PunchHole(0, 4096); err != nil {
		t.Fatal(err)
	}
	if err := f.ZeroRange(0, 1); err != nil {
		t.Fatal(err)
	}
	if _, err := f.SeekData(0); err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(5); err != nil {
		t.Fatal(err)
	}
	if size, err := f.Size(); size != 5 || err != nil {
		t.Fatalf("Size = %d, %v", size, err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	if got := f.Count(OpSeek) + f.Count(OpPunchHole) + f.Count(OpZeroRange) + f.Count(OpTruncate) + f.Count(OpSync) + f.Count(OpSize); got != 6 {
		t.Fatalf("counted %d operations, want 6", got)
	}
	// Without the optional methods underneath: errors.ErrUnsupported.
	plain := NewFaulty(struct{ File }{NewMemFile("p", nil)})
	for name, err := range map[string]error{
		"PunchHole": plain.PunchHole(0, 1),
		"ZeroRange": plain.ZeroRange(0, 1),
		"SeekData":  second(plain.SeekData(0)),
		"SeekHole":  second(plain.SeekHole(0)),
	} {
		if !errors.Is(err, errors.ErrUnsupported) {
			t.Errorf("%s without support underneath = %v, want errors.ErrUnsupported", name, err)
		}
	}
	// A failing Close still closes the wrapped file.
	f.FailAfter(OpClose, 0, nil)
	if err := f.Close(); !errors.Is(err, ErrInjected) {
		t.Fatalf("Close = %v", err)
	}
	if _, err := mem.Size(); !errors.Is(err, os.ErrClosed) {
		t.Fatalf("wrapped file still open: %v", err)
	}
	if OpWrite.String() != "write" || Op(99).String() != "Op(99)" {
		t.Fatal("Op.String")
	}
}

func second[T any](_ T, err error) error { return err }

// TestFaultySweep shows the intended use: fail each write of a workload in
// turn, crash, and check that what survived is a state the workload
// passed through (here: a log whose synced records all survive).
func TestFaultySweep(t *testing.T) {
	const records = 6
	workload := func(f File) (synced int, err error) {
		for i := 0; i < records; i++ {
			rec := []byte(fmt.Sprintf("record %d;", i))
			if _, err := f.WriteAt(rec, int64(i*len(rec))); err != nil {
				return synced, err
			}
			if err := f.Sync(); err != nil {
				return synced, err
			}
			synced = i + 1
		}
		return synced, nil
	}
	for _, op := range []Op{OpWrite, OpSync} {
		for i := int64(0); ; i++ {
			mem := NewMemFile("log", nil)
			f := NewFaulty(mem)
			f.FailNth(op, i, nil)
			synced, err := workload(f)
			if err == nil {
				if i != records {
					t.Fatalf("%s: workload passed with %s #%d failing", op, op, i)
				}
				break
			}
			if !errors.Is(err, ErrInjected) {
				t.Fatalf("%s #%d: %v", op, i, err)
			}
			after := mem.Crash().Bytes()
			for r := 0; r < synced; r++ {
				rec := []byte(fmt.Sprintf("record %d;", r))
				if !bytes.Contains(after, rec) {
					t.Fatalf("%s #%d failing: synced record %d lost after crash", op, i, r)
				}
			}
			if bytes.Contains(after, []byte(fmt.Sprintf("record %d;", synced+1))) {
				t.Fatalf("%s #%d failing: an unsynced later record survived", op, i)
			}
		}
	}
}
