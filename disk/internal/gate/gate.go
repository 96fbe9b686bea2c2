// Package gate holds Gate, a reader/writer lock split into shards so that
// many concurrent holders of its shared side do not contend on one cache
// line. Drivers use one to admit I/O calls (shared) and to shut them out
// while an image is closed or resized (exclusive), and one to make the
// reuse of a freed host cluster wait for the reads still using it.
//
// # Concurrency
//
// A Gate is safe for concurrent use. Its shared side must not be taken
// twice by one goroutine (as with sync.RWMutex, a waiting exclusive
// holder would deadlock it).
package gate

import (
	"math/rand/v2"
	"sync"
)

// shards is how many independent locks a Gate holds: enough that the
// cores of a large host rarely meet on one, few enough that the
// exclusive side (which takes them all) stays cheap.
const shards = 16

// Gate is a sharded reader/writer lock. The zero value is unlocked.
type Gate struct {
	shard [shards]struct {
		sync.RWMutex
		_ [64 - 24]byte // one cache line each (sync.RWMutex is 24 bytes)
	}
}

// Token says which shard Enter locked; pass it to Exit.
type Token uint8

// Enter takes the shared side and returns the token Exit needs.
func (g *Gate) Enter() Token {
	t := Token(rand.Uint32() % shards)
	g.shard[t].RLock()
	return t
}

// Exit releases the shared side taken by the Enter that returned t.
func (g *Gate) Exit(t Token) { g.shard[t].RUnlock() }

// Lock takes the exclusive side: it waits until no shared holder is left
// and keeps new ones out until Unlock.
func (g *Gate) Lock() {
	for i := range g.shard {
		g.shard[i].Lock()
	}
}

// Unlock releases the exclusive side.
func (g *Gate) Unlock() {
	for i := range g.shard {
		g.shard[i].Unlock()
	}
}
