package report

import "slices"

// qdictBuckets is QEMU's QDICT_BUCKET_MAX.
const qdictBuckets = 512

// qdictHash is QEMU's tdb_hash (qobject/qdict.c), on 32-bit unsigned
// arithmetic.
func qdictHash(name string) uint32 {
	value := 0x238F13AF * uint32(len(name))
	for i := 0; i < len(name); i++ {
		value += uint32(name[i]) << (uint(i) * 5 % 24)
	}
	return 1103515243*value + 12345
}

// qdictOrder returns the indexes of keys (inserted in that order) in the
// order QEMU iterates a QDict: by hash bucket, and within a bucket most
// recently inserted first (qdict_put inserts at the bucket's head).
func qdictOrder(keys []string) []int {
	order := make([]int, len(keys))
	for i := range order {
		order[i] = i
	}
	slices.SortStableFunc(order, func(a, b int) int {
		ba, bb := qdictHash(keys[a])%qdictBuckets, qdictHash(keys[b])%qdictBuckets
		if ba != bb {
			return int(ba) - int(bb)
		}
		return b - a // later insertion first
	})
	return order
}
