package disk_test

import (
	"testing"

	"github.com/imgloop/imgloop/disk"
)

const (
	cr  = disk.PermConsistentRead
	w   = disk.PermWrite
	wu  = disk.PermWriteUnchanged
	rz  = disk.PermResize
	all = disk.PermAll
)

// TestAccessFile checks the derivation of a file's access from its
// user's (QEMU's bdrv_default_perms). The roots and results of the QEMU
// rows are those qemu-io and qemu-nbd 7.2 show in /proc/locks.
func TestAccessFile(t *testing.T) {
	for _, tc := range []struct {
		name     string
		user     disk.Access
		role     disk.Role
		writable bool
		want     disk.Access
	}{
		{"qemu-io rw qcow2", disk.Access{cr | w, all}, disk.RoleImage, true, disk.Access{cr | w | rz, cr | wu}},
		{"qemu-io -r qcow2", disk.Access{cr, all}, disk.RoleImage, false, disk.Access{cr, cr | wu}},
		{"qemu-io rw raw", disk.Access{cr | w, all}, disk.RoleFiltered, true, disk.Access{cr | w, all}},
		{"qemu-io -r raw", disk.Access{cr, all}, disk.RoleFiltered, false, disk.Access{cr, all}},
		{"qemu-nbd rw raw", disk.Access{cr | w, all &^ rz}, disk.RoleFiltered, true, disk.Access{cr | w, all &^ rz}},
		{"qemu-io rw data file", disk.Access{cr | w, all}, disk.RoleData, true, disk.Access{cr | w | rz, all &^ rz}},
		{"qemu-io -r data file", disk.Access{cr, all}, disk.RoleData, false, disk.Access{cr, all &^ rz}},
		{"qemu-io rw metadata file", disk.Access{cr | w, all}, disk.RoleMetadata, true, disk.Access{cr | w | rz, cr | wu}},
		{"info without I/O", disk.Access{0, all}, disk.RoleImage, false, disk.Access{cr, cr | wu}},
		{"write unchanged implies write on data", disk.Access{wu, all}, disk.RoleData, false, disk.Access{wu | w | rz, all &^ rz}},
		{"imgloop writer raw", disk.Access{cr | w | rz, cr | wu}, disk.RoleFiltered, true, disk.Access{cr | w | rz, cr | wu}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := tc.user.File(tc.role, tc.writable); got != tc.want {
				t.Errorf("File = {%v; %v}, want {%v; %v}", got.Perm, got.Shared, tc.want.Perm, tc.want.Shared)
			}
		})
	}
}

func TestOpenOptionsAccess(t *testing.T) {
	for _, tc := range []struct {
		name    string
		opts    disk.OpenOptions
		want    disk.Access
		wantErr bool
	}{
		{"read-write", disk.OpenOptions{}, disk.Access{cr | w | rz, cr | wu}, false},
		{"read-only", disk.OpenOptions{ReadOnly: true}, disk.Access{cr, cr | wu}, false},
		{"snapshot", disk.OpenOptions{Snapshot: "1"}, disk.Access{cr, cr | wu}, false},
		{"share write", disk.OpenOptions{ReadOnly: true, ShareWrite: true}, disk.Access{cr, all}, false},
		{"force share", disk.OpenOptions{ReadOnly: true, ForceShare: true}, disk.Access{cr, all}, false},
		{"force share read-write", disk.OpenOptions{ForceShare: true}, disk.Access{}, true},
		{"share write read-write", disk.OpenOptions{ShareWrite: true}, disk.Access{}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := tc.opts.Access()
			if (err != nil) != tc.wantErr || got != tc.want {
				t.Errorf("Access() = %v, %v; want %v (error: %t)", got, err, tc.want, tc.wantErr)
			}
		})
	}
	// Force-share shares everything on the files too, metadata included.
	a, err := disk.OpenOptions{ReadOnly: true, ForceShare: true}.FileAccess(disk.RoleImage)
	if err != nil || a != (disk.Access{cr, all}) {
		t.Errorf("FileAccess with ForceShare = %v, %v", a, err)
	}
}
