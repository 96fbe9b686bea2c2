package disktest

import (
	"math/rand/v2"
	"runtime"
	"testing"

	"github.com/imgloop/imgloop/disk"
)

func TestModelConformance(t *testing.T) {
	for _, size := range []int64{0, 1, 511, 4096, 1<<20 + 3} {
		content := make([]byte, size)
		fill(rand.New(rand.NewPCG(uint64(size), 1)), content)
		t.Run("", func(t *testing.T) {
			Run(t, func(t *testing.T) disk.Image { return NewModelFrom(content) }, Options{Model: content})
		})
	}
	t.Run("no model", func(t *testing.T) {
		Run(t, func(t *testing.T) disk.Image { return NewModel(3 << 20) }, Options{Seed: 7})
	})
}

func TestRandomOpsModelAgainstModel(t *testing.T) {
	for seed := uint64(1); seed <= 3; seed++ {
		RandomOps(t, seed, NewModel(2<<20+100), NewModel(2<<20+100), 500)
	}
}

// brokenImage forgets one byte of every write: RandomOps must catch it.
type brokenImage struct{ *Model }

func (b brokenImage) WriteAt(p []byte, off int64) (int, error) {
	if len(p) > 1 {
		return b.Model.WriteAt(p[:len(p)-1], off)
	}
	return b.Model.WriteAt(p, off)
}

func TestRandomOpsCatchesDivergence(t *testing.T) {
	ft := &fakeT{TB: t}
	done := make(chan struct{})
	go func() {
		defer close(done)
		RandomOps(ft, 1, brokenImage{NewModel(1 << 20)}, NewModel(1<<20), 300)
	}()
	<-done
	if !ft.failed {
		t.Fatal("RandomOps did not notice a driver that drops bytes")
	}
}

// fakeT records a Fatal instead of failing the real test.
type fakeT struct {
	testing.TB
	failed bool
}

func (f *fakeT) Helper() {}
func (f *fakeT) Fatalf(format string, args ...any) {
	f.failed = true
	f.TB.Logf("(expected) "+format, args...)
	runtime.Goexit()
}
