package qcow2

// clusterSet is a set of host cluster indexes, stored as a sparse bitmap:
// one bit per cluster, in chunks allocated as clusters in their range
// join the set. It costs about a bit per host cluster of the image's
// metadata range, where a map would cost tens of bytes per member.
type clusterSet struct {
	chunks map[uint64]*setChunk
}

// setChunkBits is log2 of the clusters one chunk covers (32768: a 4 KiB
// chunk).
const setChunkBits = 15

type setChunk struct {
	words [1 << setChunkBits / 64]uint64
	n     int // members
}

// has reports whether c is in the set.
func (s *clusterSet) has(c uint64) bool {
	ch := s.chunks[c>>setChunkBits]
	if ch == nil {
		return false
	}
	i := c & (1<<setChunkBits - 1)
	return ch.words[i/64]>>(i%64)&1 != 0
}

// add puts c in the set.
func (s *clusterSet) add(c uint64) {
	if s.chunks == nil {
		s.chunks = map[uint64]*setChunk{}
	}
	ch := s.chunks[c>>setChunkBits]
	if ch == nil {
		ch = &setChunk{}
		s.chunks[c>>setChunkBits] = ch
	}
	i := c & (1<<setChunkBits - 1)
	if ch.words[i/64]>>(i%64)&1 == 0 {
		ch.words[i/64] |= 1 << (i % 64)
		ch.n++
	}
}

// remove takes c out of the set.
func (s *clusterSet) remove(c uint64) {
	ch := s.chunks[c>>setChunkBits]
	if ch == nil {
		return
	}
	i := c & (1<<setChunkBits - 1)
	if ch.words[i/64]>>(i%64)&1 != 0 {
		ch.words[i/64] &^= 1 << (i % 64)
		if ch.n--; ch.n == 0 {
			delete(s.chunks, c>>setChunkBits)
		}
	}
}
