package convert

import "github.com/imgloop/imgloop/disk"

// class says what Clusters does with a cluster of the destination.
type class uint8

const (
	// classSkip: left unallocated (the source reads as zeros there, or,
	// with a backing file, its top layer leaves the range to its backing
	// file).
	classSkip class = iota
	// classZero: stored as a zero cluster without reading the source.
	classZero
	// classRead: read from the source and stored as what it holds.
	classRead
)

// planner classifies the destination's clusters from the source's
// extents, in order, and hands them on in runs of one class: whole runs of
// skipped clusters, and runs of the other classes cut at multiples of
// chunk clusters (so that batches start as soon as the map reaches them).
// A cluster several extents share takes the class they all allow.
//
// With subclusters (sub > 1), a cluster read from the source whose
// subclusters are not all alike records, in masks, those it may leave
// unallocated; batches take them with takeMasks.
type planner struct {
	cs, size, chunk int64 // chunk: clusters per batch
	sub             int64 // subclusters per cluster
	opts            Options
	sparse          bool
	emit            func(first, n int64, c class) error
	masks           map[int64]uint32 // cluster index -> subclusters to skip

	// The cluster whose extents are being gathered, -1 for none, and
	// whether all its bytes so far may be skipped, or are zeros.
	cur              int64
	curSkip, curZero bool
	curNotSkip       uint32 // subclusters with a byte that may not be skipped

	// The pending run of clusters of one class.
	runFirst, runN int64
	runClass       class
}

func newPlanner(cs, size, chunk int64, sub int, opts Options, emit func(first, n int64, c class) error) *planner {
	return &planner{cs: cs, size: size, chunk: max(1, chunk), sub: int64(max(1, sub)), opts: opts,
		sparse: opts.SparseSize > 0, emit: emit, cur: -1, masks: map[int64]uint32{}}
}

// takeMasks appends to dst the subclusters to skip of each cluster of
// [first, end) and forgets them; it returns nil if there are none.
func (p *planner) takeMasks(dst []uint32, first, end int64) []uint32 {
	if p == nil || len(p.masks) == 0 {
		return nil
	}
	found := false
	for i := first; i < end; i++ {
		m, ok := p.masks[i]
		if ok {
			delete(p.masks, i)
			found = true
		}
		dst = append(dst, m)
	}
	if !found {
		return nil
	}
	return dst
}

// extent takes the next extent of the source's map.
func (p *planner) extent(e disk.Extent) error {
	a, b := e.Offset, e.Offset+e.Length
	zero := e.Status&disk.StatusZero != 0
	if p.opts.Backed {
		// Zeros past the end of the backing file read as zeros when
		// left unallocated: split the extent there.
		if bs := p.opts.BackingSize; zero && a < bs && bs < b {
			if err := p.add(a, bs, e.Depth > 0, true); err != nil {
				return err
			}
			a = bs
		}
		return p.add(a, b, e.Depth > 0 || (zero && a >= p.opts.BackingSize), zero)
	}
	return p.add(a, b, zero && p.sparse, zero)
}

// classOf returns the class of a cluster whose bytes may all be skipped
// (skip), or all read as zeros (zero).
func (p *planner) classOf(skip, zero bool) class {
	switch {
	case skip:
		return classSkip
	case zero && p.opts.Backed && p.sparse:
		return classZero
	}
	return classRead
}

// add classifies the bytes [a, b) of the disk.
func (p *planner) add(a, b int64, skip, zero bool) error {
	nclusters := (p.size + p.cs - 1) / p.cs
	for a < b {
		ci := a / p.cs
		cend := min((ci+1)*p.cs, p.size)
		if a == ci*p.cs && b >= cend && p.cur != ci {
			// Whole clusters.
			last := b / p.cs
			if b >= p.size {
				last = nclusters
			}
			if err := p.push(ci, last-ci, p.classOf(skip, zero)); err != nil {
				return err
			}
			a = min(b, last*p.cs)
			continue
		}
		if p.cur != ci {
			p.cur, p.curSkip, p.curZero, p.curNotSkip = ci, true, true, 0
		}
		p.curSkip = p.curSkip && skip
		p.curZero = p.curZero && zero
		seg := min(b, cend)
		if !skip && p.sub > 1 {
			us := p.cs / p.sub
			for u := (a - ci*p.cs) / us; u <= (seg-1-ci*p.cs)/us; u++ {
				p.curNotSkip |= 1 << u
			}
		}
		if seg == cend {
			p.cur = -1
			c := p.classOf(p.curSkip, p.curZero)
			if p.sub > 1 && c != classSkip {
				// The subclusters within the disk.
				us := p.cs / p.sub
				full := uint32(1)<<((cend-ci*p.cs+us-1)/us) - 1
				if m := full &^ p.curNotSkip; m != 0 {
					// Some subclusters are left to the backing file.
					c = classRead
					p.masks[ci] = m
				}
			}
			if err := p.push(ci, 1, c); err != nil {
				return err
			}
		}
		a = seg
	}
	return nil
}

// push appends clusters [first, first+n) of class c to the pending run,
// emitting what is complete.
func (p *planner) push(first, n int64, c class) error {
	if p.runN > 0 && (p.runClass != c || p.runFirst+p.runN != first) {
		if err := p.flush(); err != nil {
			return err
		}
	}
	if p.runN == 0 {
		p.runFirst, p.runClass = first, c
	}
	p.runN += n
	if c == classSkip {
		return nil
	}
	end := p.runFirst + p.runN
	if cut := end / p.chunk * p.chunk; cut > p.runFirst {
		if err := p.emit(p.runFirst, cut-p.runFirst, c); err != nil {
			return err
		}
		p.runFirst, p.runN = cut, end-cut
	}
	return nil
}

// flush emits the pending run.
func (p *planner) flush() error {
	if p.runN == 0 {
		return nil
	}
	first, n := p.runFirst, p.runN
	p.runN = 0
	return p.emit(first, n, p.runClass)
}
