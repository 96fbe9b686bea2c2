package qcow2

import (
	"fmt"

	"github.com/imgloop/imgloop/disk"
)

// openDataFile opens the external data file (incompatible feature bit 2),
// read-only unless opts open the image read-write, and locks it as a file
// holding guest data (disk.OpenChildFile); guest clusters are then read
// from it. Its name comes from the external data file name header
// extension, resolved against the image's folder.
func (img *Image) openDataFile(opts disk.OpenOptions) error {
	if !img.header().HasDataFile() {
		return nil
	}
	name := img.header().DataFile
	if name == "" {
		return img.formatError(-1, "external data file bit set but the image names no data file")
	}
	if isProtocolName(name) {
		return &disk.UnsupportedError{Format: formatName, Feature: fmt.Sprintf("data file %q (a QEMU protocol name)", name)}
	}
	path := resolveName(img.f.Name(), name)
	f, err := disk.OpenChildFile(path, disk.RoleData, opts)
	if err != nil {
		return fmt.Errorf("qcow2: data file %q: %w", name, err)
	}
	size, err := f.Size()
	if err != nil {
		f.Close()
		return fmt.Errorf("qcow2: data file %q: %w", name, err)
	}
	img.data, img.dataName = f, path
	img.geo.dataSize = size
	return nil
}
