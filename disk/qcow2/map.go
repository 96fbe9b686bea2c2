package qcow2

import (
	"fmt"

	"github.com/imgloop/imgloop/disk"
)

// Map returns the allocation status of the virtual disk from off, for at
// most n bytes (disk.Mapper): the extent keeps one status, and for data
// contiguous host offsets. Normal clusters are StatusAllocated|StatusData
// with their host offset (HostFile names the image or data file);
// compressed clusters StatusAllocated|StatusData without one; zero
// clusters StatusAllocated|StatusZero (with the host offset of a
// preallocated one, as qemu-img map shows it). Ranges this image leaves
// unallocated are mapped by the backing image, one layer deeper; where no
// layer defines them they are StatusZero, at the depth of the last layer
// (or of the layer whose backing file ends before them: QEMU stops there,
// as it knows they read as zeros).
//
// Errors: disk.ErrOutOfRange unless 0 <= off, 0 < n and off+n <= Size;
// disk.ErrCorrupt for an invalid table entry; disk.ErrClosed; errors of
// the backing image, wrapped.
func (img *Image) Map(off, n int64) (disk.Extent, error) {
	t, err := img.enter()
	if err != nil {
		return disk.Extent{}, err
	}
	defer img.exit(t)
	if err := disk.CheckRange(off, n, img.size.Load()); err != nil {
		return disk.Extent{}, fmt.Errorf("qcow2: map: %w", err)
	}
	if n == 0 {
		return disk.Extent{}, fmt.Errorf("qcow2: map: empty range: %w", disk.ErrOutOfRange)
	}
	rt := img.reuse.Enter()
	defer img.reuse.Exit(rt)
	r, err := img.lookup(off, n)
	if err != nil {
		return disk.Extent{}, err
	}
	e := disk.Extent{Offset: off, Length: r.length, HostOffset: -1}
	switch r.kind {
	case kindNormal:
		e.Status = disk.StatusAllocated | disk.StatusData
		e.HostOffset, e.HostFile = r.host, img.hostFileName()
		// As QEMU does (block/io.c, bdrv_co_block_status): in an image
		// made with preallocation=metadata, allocated clusters over a
		// hole of the host file read as zeros. The extent ends where the
		// host file's run does.
		if !img.metadataPreallocated() {
			break
		}
		if hole, length, known, err := disk.HostRun(img.data, r.host, e.Length); err == nil && known {
			e.Length = length
			if hole {
				e.Status |= disk.StatusZero
			}
		}
	case kindZero:
		e.Status = disk.StatusAllocated | disk.StatusZero
	case kindZeroAlloc:
		e.Status = disk.StatusAllocated | disk.StatusZero
		e.HostOffset, e.HostFile = r.host, img.hostFileName()
	case kindCompressed:
		e.Status = disk.StatusAllocated | disk.StatusData
		// Merge the compressed clusters that follow.
		for end := off + n; e.Offset+e.Length < end; {
			next, err := img.lookup(e.Offset+e.Length, end-e.Offset-e.Length)
			if err != nil {
				return disk.Extent{}, err
			}
			if next.kind != kindCompressed {
				break
			}
			e.Length += next.length
		}
	case kindUnallocated:
		switch {
		case img.backing == nil:
			e.Status = disk.StatusZero
			if r.host >= 0 {
				e.HostOffset, e.HostFile = r.host, img.hostFileName()
			}
		case off >= img.backingSize:
			// Past the end of a shorter backing file: zeros, reported by
			// this layer as QEMU does.
			e.Status = disk.StatusZero
		default:
			be, err := disk.Map(img.backing, off, min(r.length, img.backingSize-off))
			if err != nil {
				return disk.Extent{}, fmt.Errorf("qcow2: backing file %q: %w", img.header().BackingFile, err)
			}
			be.Depth++
			return be, nil
		}
	}
	return e, nil
}

// hostFileName names the file guest data is stored in.
func (img *Image) hostFileName() string {
	if img.dataName != "" {
		return img.dataName
	}
	return img.f.Name()
}

// Location is where one byte of the virtual disk is stored (see
// disk.Location).
type Location = disk.Location

// Locate returns where the byte at guest offset off is stored, following
// the backing chain to the layer that defines it. Errors are Map's.
func (img *Image) Locate(off int64) (Location, error) {
	t, err := img.enter()
	if err != nil {
		return Location{}, err
	}
	defer img.exit(t)
	if err := disk.CheckRange(off, 1, img.size.Load()); err != nil {
		return Location{}, fmt.Errorf("qcow2: locate: %w", err)
	}
	rt := img.reuse.Enter()
	defer img.reuse.Exit(rt)
	r, err := img.lookup(off, 1)
	if err != nil {
		return Location{}, err
	}
	loc := Location{Offset: off, ClusterType: r.kind.String(), HostClusterOffset: r.cluster,
		OffsetInCluster: off & (img.geo.clusterSize() - 1)}
	switch r.kind {
	case kindNormal, kindZeroAlloc:
		loc.File = img.hostFileName()
	case kindCompressed:
		loc.File = img.f.Name()
		loc.CompressedLength = r.csize
	case kindUnallocated:
		if img.backing == nil {
			return loc, nil
		}
		if off >= img.backingSize {
			return loc, nil // zeros past the end of the backing file
		}
		var bl Location
		if b, ok := img.backing.(*Image); ok {
			if bl, err = b.Locate(off); err != nil {
				return Location{}, fmt.Errorf("qcow2: backing file %q: %w", img.header().BackingFile, err)
			}
		} else {
			e, err := disk.Map(img.backing, off, 1)
			if err != nil {
				return Location{}, fmt.Errorf("qcow2: backing file %q: %w", img.header().BackingFile, err)
			}
			bl = Location{Offset: off, ClusterType: "unallocated", HostClusterOffset: e.HostOffset,
				OffsetInCluster: 0, Depth: e.Depth, File: e.HostFile}
			switch {
			case e.Status&disk.StatusData != 0:
				bl.ClusterType = "normal"
				if bl.File == "" {
					bl.File = img.backingFull
				}
			case e.Status&disk.StatusZero != 0 && e.Status&disk.StatusAllocated != 0:
				bl.ClusterType = "zero"
			}
		}
		bl.Depth++
		return bl, nil
	}
	return loc, nil
}
