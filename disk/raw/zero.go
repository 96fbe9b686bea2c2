package raw

import (
	"errors"
	"fmt"

	"github.com/imgloop/imgloop/disk"
)

// zeroChunk bounds each write of the zero-writing fallback.
const zeroChunk = 256 << 10

// zeroBuf is the source of the zero-writing fallback; it is never written.
var zeroBuf [zeroChunk]byte

// Discard deallocates the whole file system blocks of [off, off+n) (see
// Limits) by punching a hole in the host file; they then read as zeros.
// The unaligned head and tail are left as they are (disk.Discarder): a
// hole punched there would zero them. Errors: disk.ErrClosed,
// disk.ErrReadOnly, disk.ErrOutOfRange, ErrProbedFormatChange,
// disk.ErrNotSupported when the host file cannot punch holes, and the
// host file's errors.
func (img *Image) Discard(off, n int64) error {
	t, err := img.enter("discard")
	if err != nil {
		return err
	}
	defer img.ops.Exit(t)
	if err := img.checkWrite("discard", off, n); err != nil {
		return err
	}
	hp, ok := img.f.(disk.HolePuncher)
	if !ok || !img.canPunch() {
		return fmt.Errorf("raw: discard on %s: %w", img.f.Name(), disk.ErrNotSupported)
	}
	end := off + n
	a := (off + img.block - 1) / img.block * img.block
	b := end / img.block * img.block
	if end == img.size.Load() {
		b = end // the file's last, partial block goes whole
	}
	if a >= b {
		return nil
	}
	unlock, err := img.guardZeroes(a, b-a)
	if err != nil {
		return err
	}
	defer unlock()
	if err := hp.PunchHole(a, b-a); err != nil {
		if errors.Is(err, errors.ErrUnsupported) {
			img.noPunch.Store(true)
			return fmt.Errorf("raw: discard on %s: %w: %w", img.f.Name(), disk.ErrNotSupported, err)
		}
		return img.hostErr("discard", a, err)
	}
	return nil
}

// WriteZeroes makes [off, off+n) read as zeros: by punching a hole unless
// flags has disk.ZeroNoUnmap, else (or when punching is not possible) by
// zeroing the range in place (fallocate ZERO_RANGE where the host file
// offers it, writing zero bytes otherwise). With disk.ZeroFast it fails
// with disk.ErrSlowZero, before writing anything, where it would have to
// write zero bytes; with disk.ZeroFUA the file is synced before it
// returns. Errors: as for WriteAt.
func (img *Image) WriteZeroes(off, n int64, flags disk.ZeroFlags) error {
	t, err := img.enter("write zeroes")
	if err != nil {
		return err
	}
	defer img.ops.Exit(t)
	if err := img.checkWrite("write zeroes", off, n); err != nil {
		return err
	}
	if n == 0 {
		return nil
	}
	unlock, err := img.guardZeroes(off, n)
	if err != nil {
		return err
	}
	defer unlock()
	if err := img.zero(off, n, flags); err != nil {
		return err
	}
	if flags&disk.ZeroFUA != 0 {
		return img.flush()
	}
	return nil
}

// zero implements WriteZeroes.
func (img *Image) zero(off, n int64, flags disk.ZeroFlags) error {
	if hp, ok := img.f.(disk.HolePuncher); ok && flags&disk.ZeroNoUnmap == 0 && img.canPunch() {
		err := hp.PunchHole(off, n)
		if err == nil {
			return nil
		}
		if !errors.Is(err, errors.ErrUnsupported) {
			return img.hostErr("write zeroes", off, err)
		}
		img.noPunch.Store(true)
	}
	if zr, ok := img.f.(disk.ZeroRanger); ok && img.canZeroRange() {
		err := zr.ZeroRange(off, n)
		if err == nil {
			return nil
		}
		if !errors.Is(err, errors.ErrUnsupported) {
			return img.hostErr("write zeroes", off, err)
		}
		img.noZeroRange.Store(true)
	}
	if flags&disk.ZeroFast != 0 {
		return fmt.Errorf("raw: write zeroes on %s: %w", img.f.Name(), disk.ErrSlowZero)
	}
	for n > 0 {
		k := min(n, zeroChunk)
		if _, err := img.f.WriteAt(zeroBuf[:k], off); err != nil {
			return img.hostErr("write zeroes", off, err)
		}
		off, n = off+k, n-k
	}
	return nil
}

// guardZeroes runs the probing check for zeroing [off, off+n) and returns
// the function that releases the guard (a no-op when none was taken).
func (img *Image) guardZeroes(off, n int64) (func(), error) {
	if !img.probed || off >= sectorSize {
		return func() {}, nil
	}
	img.guard.Lock()
	if err := img.checkProbe(off, nil, n); err != nil {
		img.guard.Unlock()
		return nil, err
	}
	return img.guard.Unlock, nil
}
