package gate

import (
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func TestGateExcludes(t *testing.T) {
	var g Gate
	var inside, exclusive atomic.Int32
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for range 8 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				tok := g.Enter()
				inside.Add(1)
				if exclusive.Load() != 0 {
					t.Error("shared holder inside while the exclusive side is held")
				}
				inside.Add(-1)
				g.Exit(tok)
			}
		})
	}
	for range 200 {
		g.Lock()
		exclusive.Store(1)
		if n := inside.Load(); n != 0 {
			t.Fatalf("%d shared holders inside under Lock", n)
		}
		exclusive.Store(0)
		g.Unlock()
	}
	close(stop)
	wg.Wait()
}

func TestGateLockWaitsForHolders(t *testing.T) {
	var g Gate
	tok := g.Enter()
	locked := make(chan struct{})
	go func() {
		g.Lock()
		close(locked)
		g.Unlock()
	}()
	select {
	case <-locked:
		t.Fatal("Lock returned while a shared holder was inside")
	case <-time.After(20 * time.Millisecond):
	}
	g.Exit(tok)
	<-locked
}

func BenchmarkGateEnterExit(b *testing.B) {
	var g Gate
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			g.Exit(g.Enter())
		}
	})
}
