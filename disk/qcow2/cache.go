package qcow2

import "sync"

// The L2 slice cache keeps recently used parts of L2 tables in memory, as
// QEMU's L2 cache does with l2-cache-entry-size smaller than a cluster: a
// lookup loads one slice (4 KiB, or the whole table for smaller clusters),
// not the whole table, so a random read costs one small metadata read.

const (
	// maxSliceSize is the size of an L2 slice (QEMU's default
	// l2-cache-entry-size is the cluster size; 4 KiB slices make a cache
	// miss one page of I/O and let a small cache cover scattered reads).
	maxSliceSize = 4096
	// defaultCacheMax bounds the default cache: QEMU's default
	// l2-cache-size is what covers the whole disk, at most 32 MiB
	// (enough for 256 GiB of guest disk with 64 KiB clusters).
	defaultCacheMax = 32 << 20
	// minCacheSlices is the fewest slices a cache holds, whatever the
	// requested size, so that one read spanning slice boundaries never
	// evicts its own slices.
	minCacheSlices = 16
	// maxCacheShards bounds how many independently locked parts the cache
	// is split into.
	maxCacheShards = 16
	// slicesPerShard is the fewest slices a shard holds; below that the
	// cache uses fewer shards, keeping eviction close to a global LRU.
	slicesPerShard = 64
)

// defaultCacheSize returns the cache size that covers a disk of size bytes
// (one L2 entry of entryBytes per cluster), capped at defaultCacheMax.
func defaultCacheSize(size int64, clusterBits uint, entryBytes int) int64 {
	clusters := (size + 1<<clusterBits - 1) >> clusterBits
	need := clusters * int64(entryBytes)
	return min(need, defaultCacheMax)
}

// l2Cache is an LRU cache of L2 slices keyed by their host offset, bounded
// in bytes. It is split into shards, each with its own lock; a lock is
// held only to look up or update the shard's map and list, never during
// file I/O. Concurrent misses on one slice load it once: later callers
// wait for the first one's load.
//
// Cached slices are immutable: a caller may keep using a slice after it
// has been evicted.
type l2Cache struct {
	sliceSize int
	shards    []cacheShard
	shardMask uint64
}

type cacheShard struct {
	mu       sync.Mutex
	items    map[uint64]*cacheItem
	lru      cacheItem // sentinel of a circular list; lru.next is the most recent
	capacity int       // slices
	hits     int64     // lookups that found the slice (or its load under way)
	misses   int64     // lookups that loaded it
	_        [64]byte  // keep shards on separate cache lines
}

type cacheItem struct {
	key        uint64
	data       []byte
	err        error
	ready      chan struct{} // closed when data/err are set
	prev, next *cacheItem
	// pinned items (L2 slices changed in memory and not yet written to
	// the file) are never evicted.
	pinned bool
}

// newL2Cache returns a cache of about capacity bytes of slices of
// sliceSize bytes each.
func newL2Cache(capacity int64, sliceSize int) *l2Cache {
	slices := max(capacity/int64(sliceSize), minCacheSlices)
	shards := 1
	for shards < maxCacheShards && int64(shards*2*slicesPerShard) <= slices {
		shards *= 2
	}
	c := &l2Cache{sliceSize: sliceSize, shards: make([]cacheShard, shards), shardMask: uint64(shards - 1)}
	per := int((slices + int64(shards) - 1) / int64(shards))
	for i := range c.shards {
		s := &c.shards[i]
		s.items = make(map[uint64]*cacheItem)
		s.lru.next, s.lru.prev = &s.lru, &s.lru
		s.capacity = per
	}
	return c
}

// shard picks the shard of a slice offset (slices are sliceSize aligned).
func (c *l2Cache) shard(key uint64) *cacheShard {
	h := key / uint64(c.sliceSize)
	h ^= h >> 7
	return &c.shards[h&c.shardMask]
}

// get returns the slice at host offset key, calling load to read it into a
// new buffer of sliceSize bytes on a miss. A load error is returned to
// every caller waiting for that load and is not cached.
func (c *l2Cache) get(key uint64, load func(buf []byte) error) ([]byte, error) {
	s := c.shard(key)
	s.mu.Lock()
	if it, ok := s.items[key]; ok {
		s.moveToFront(it)
		s.hits++
		s.mu.Unlock()
		<-it.ready // closed already, unless another goroutine is loading it
		if it.err != nil {
			return nil, it.err
		}
		return it.data, nil
	}
	it := &cacheItem{key: key, ready: make(chan struct{})}
	s.items[key] = it
	s.pushFront(it)
	s.evict()
	s.misses++
	s.mu.Unlock()

	buf := make([]byte, c.sliceSize)
	err := load(buf)
	if err != nil {
		it.err = err
		s.mu.Lock()
		if s.items[key] == it {
			delete(s.items, key)
			s.unlink(it)
		}
		s.mu.Unlock()
	} else {
		it.data = buf
	}
	close(it.ready)
	if err != nil {
		return nil, err
	}
	return buf, nil
}

// stats returns how many lookups found their slice cached (or being
// loaded) and how many loaded it.
func (c *l2Cache) stats() (hits, misses int64) {
	for i := range c.shards {
		s := &c.shards[i]
		s.mu.Lock()
		hits += s.hits
		misses += s.misses
		s.mu.Unlock()
	}
	return hits, misses
}

// len returns the number of slices cached (or being loaded).
func (c *l2Cache) len() int {
	n := 0
	for i := range c.shards {
		s := &c.shards[i]
		s.mu.Lock()
		n += len(s.items)
		s.mu.Unlock()
	}
	return n
}

// capacityBytes returns the most bytes of slices the cache holds.
func (c *l2Cache) capacityBytes() int64 {
	n := int64(0)
	for i := range c.shards {
		n += int64(c.shards[i].capacity) * int64(c.sliceSize)
	}
	return n
}

func (s *cacheShard) pushFront(it *cacheItem) {
	it.prev = &s.lru
	it.next = s.lru.next
	it.next.prev = it
	s.lru.next = it
}

func (s *cacheShard) unlink(it *cacheItem) {
	if it.prev == nil {
		return
	}
	it.prev.next = it.next
	it.next.prev = it.prev
	it.prev, it.next = nil, nil
}

func (s *cacheShard) moveToFront(it *cacheItem) {
	if s.lru.next == it {
		return
	}
	s.unlink(it)
	s.pushFront(it)
}

// evict drops least recently used slices beyond the shard's capacity.
// An item still loading may be dropped from the map: its loader and
// waiters keep their reference, only the cache forgets it.
func (s *cacheShard) evict() {
	old := s.lru.prev
	for len(s.items) > s.capacity && old != &s.lru {
		prev := old.prev
		if !old.pinned {
			s.unlink(old)
			delete(s.items, old.key)
		}
		old = prev
	}
}

// set makes data (which the cache then owns, and which must not change)
// the slice at host offset key, replacing any cached or loading one.
// With pinned set the slice stays cached until unpin: the writer pins
// the L2 slices it changed in memory until it has written them to the
// file. Callers still holding the old slice keep using it unchanged.
func (c *l2Cache) set(key uint64, data []byte, pinned bool) {
	it := &cacheItem{key: key, data: data, ready: make(chan struct{}), pinned: pinned}
	close(it.ready)
	s := c.shard(key)
	s.mu.Lock()
	if old, ok := s.items[key]; ok {
		s.unlink(old)
		delete(s.items, key)
	}
	s.items[key] = it
	s.pushFront(it)
	s.evict()
	s.mu.Unlock()
}

// unpin lets the slice at key be evicted again.
func (c *l2Cache) unpin(key uint64) {
	s := c.shard(key)
	s.mu.Lock()
	if it, ok := s.items[key]; ok {
		it.pinned = false
	}
	s.evict()
	s.mu.Unlock()
}
