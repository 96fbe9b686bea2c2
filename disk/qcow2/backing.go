package qcow2

import (
	"fmt"
	"path/filepath"
	"slices"
	"strings"

	"github.com/imgloop/imgloop/disk"
)

// resolveName resolves a file name stored in an image (backing file, data
// file) the way QEMU does: an absolute name as is, a relative one against
// the folder of the image's own name, without cleaning the result
// ("sub/top.qcow2" + "../base.qcow2" -> "sub/../base.qcow2").
func resolveName(imageName, name string) string {
	if filepath.IsAbs(name) {
		return name
	}
	if i := strings.LastIndexByte(imageName, '/'); i >= 0 {
		return imageName[:i+1] + name
	}
	return name
}

// isProtocolName reports whether a stored file name is a QEMU protocol or
// JSON pseudo-filename ("nbd://...", "json:{...}"), which only QEMU's
// block layer can open.
func isProtocolName(name string) bool {
	if strings.HasPrefix(name, "json:") {
		return true
	}
	i := strings.Index(name, ":")
	return i > 0 && !strings.Contains(name[:i], "/")
}

// openBacking opens the backing file named in the header, read-only, with
// opts.Parents extended by this image's path so that disk.Open refuses
// loops and over-deep chains, and with opts' sharing (ShareWrite,
// ForceShare) for its locks.
func (img *Image) openBacking(opts disk.OpenOptions) error {
	name := img.header().BackingFile
	if name == "" {
		return nil
	}
	if isProtocolName(name) {
		return &disk.UnsupportedError{Format: formatName, Feature: fmt.Sprintf("backing file %q (a QEMU protocol name)", name)}
	}
	img.backingFull = resolveName(img.f.Name(), name)
	if opts.NoBacking {
		img.backingFormat = img.header().BackingFormat
		return nil
	}
	self := img.f.Name()
	if abs, err := filepath.Abs(self); err == nil {
		self = abs
		if real, err := filepath.EvalSymlinks(abs); err == nil {
			self = real
		}
	}
	parents := append(slices.Clip(opts.Parents), self)
	// Locks: QEMU's backing child takes consistent read only, and shares
	// writes when the overlay's user does (bdrv_default_perms_for_cow);
	// force-share is inherited.
	b, err := disk.Open(img.backingFull, disk.OpenOptions{
		Format:     img.header().BackingFormat,
		ReadOnly:   true,
		CacheSize:  opts.CacheSize,
		Parents:    parents,
		ShareWrite: opts.ShareWrite,
		ForceShare: opts.ForceShare,
	})
	if err != nil {
		return fmt.Errorf("qcow2: backing file %q: %w", name, err)
	}
	img.backing = b
	img.backingSize = b.Size()
	img.backingFormat = img.header().BackingFormat
	if img.backingFormat == "" {
		if d, ok := b.(disk.Describer); ok {
			img.backingFormat = d.Info().Format
		}
	}
	return nil
}

// readBacking fills p with the guest data at off that this image leaves
// unallocated: the backing image's, zeros past its end or without one.
func (img *Image) readBacking(p []byte, off int64) error {
	if img.backing == nil || off >= img.backingSize {
		clear(p)
		return nil
	}
	n := min(int64(len(p)), img.backingSize-off)
	if _, err := img.backing.ReadAt(p[:n], off); err != nil {
		return fmt.Errorf("qcow2: backing file %q: %w", img.header().BackingFile, err)
	}
	clear(p[n:])
	return nil
}
