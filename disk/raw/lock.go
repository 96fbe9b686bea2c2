package raw

import "github.com/imgloop/imgloop/disk"

var _ disk.FileRoler = Driver{}

// FileRole returns disk.RoleFiltered: the raw file is the virtual disk, so
// the driver takes on it what its user takes of the image, no more (QEMU's
// raw format is a filter over its file when it has no offset or size).
func (Driver) FileRole() disk.Role { return disk.RoleFiltered }
