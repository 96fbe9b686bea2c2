package qcow2

import "github.com/imgloop/imgloop/disk"

var _ disk.Capabler = (*Image)(nil)

// Capabilities says what this open image does (disk.Capabler): an image
// opened read-only, on a snapshot, or whose writes this driver refuses
// (encryption, a corrupt or unrepaired dirty image) is read-only; a
// writable one flushes, discards, makes single writes durable (FUA,
// where the host file can) and resizes (unless its features prevent
// it), and zeroes without writing data from version 3 on (version 2
// has no zero clusters). Map reports allocation and backing depth.
func (img *Image) Capabilities() disk.Capabilities {
	c := disk.Capabilities{Extents: true, Depth: true}
	w := img.w
	if img.snapshot != nil || w == nil || w.unsupported != "" || w.err != nil {
		c.ReadOnly = true
		return c
	}
	h := img.header()
	_, syncs := img.data.(disk.SyncWriter)
	c.Flush, c.Discard, c.FUA = true, true, syncs
	c.Zero = h.Version >= 3
	c.Resize = !(h.NbSnapshots > 0 && h.Version < 3) && !(h.AutoclearFeatures&AutoclearBitmaps != 0 && h.NbBitmaps > 0)
	return c
}
