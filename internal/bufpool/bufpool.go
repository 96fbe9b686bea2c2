// Package bufpool hands out byte buffers of power-of-two size classes
// from sync.Pools, for servers that need a request-sized buffer per
// request (NBD, FUSE) without allocating one each time.
package bufpool

import (
	"math/bits"
	"sync"
)

// Size classes run from 1<<minShift to 1<<maxShift bytes; larger
// buffers are allocated and dropped.
const (
	minShift = 12 // 4 KiB
	maxShift = 25 // 32 MiB
)

var pools [maxShift - minShift + 1]sync.Pool

// class returns the pool index for n bytes, or -1 when n is too large.
func class(n int) int {
	if n <= 1<<minShift {
		return 0
	}
	c := bits.Len(uint(n-1)) - minShift
	if c >= len(pools) {
		return -1
	}
	return c
}

// Get returns a buffer of length n (its contents are not zeroed). Give
// it back with Put when done.
func Get(n int) []byte {
	c := class(n)
	if c < 0 {
		return make([]byte, n)
	}
	if p, ok := pools[c].Get().(*[]byte); ok {
		return (*p)[:n]
	}
	return make([]byte, n, 1<<(c+minShift))
}

// Put returns b, obtained from Get, to its pool. b must not be used
// afterwards.
func Put(b []byte) {
	c := class(cap(b))
	if c < 0 || cap(b) != 1<<(c+minShift) {
		return // not one of ours
	}
	b = b[:0]
	pools[c].Put(&b)
}
