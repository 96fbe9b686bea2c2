package qcow2

import (
	"math/rand/v2"
	"testing"
)

func TestClusterSetMatchesMap(t *testing.T) {
	var s clusterSet
	m := map[uint64]bool{}
	r := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < 20000; i++ {
		c := r.Uint64N(1 << 20)
		if i%7 == 0 {
			c = r.Uint64N(64) << setChunkBits // chunk edges
		}
		switch r.IntN(3) {
		case 0, 1:
			s.add(c)
			m[c] = true
		default:
			s.remove(c)
			delete(m, c)
		}
		if probe := r.Uint64N(1 << 20); s.has(probe) != m[probe] {
			t.Fatalf("has(%d) = %v, want %v", probe, s.has(probe), m[probe])
		}
	}
	for c := range m {
		if !s.has(c) {
			t.Fatalf("lost %d", c)
		}
	}
	for k, ch := range s.chunks {
		n := 0
		for _, w := range ch.words {
			for ; w != 0; w &= w - 1 {
				n++
			}
		}
		if n != ch.n || n == 0 {
			t.Fatalf("chunk %d counts %d members, holds %d", k, ch.n, n)
		}
	}
}
