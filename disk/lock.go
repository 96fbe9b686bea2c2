package disk

import (
	"errors"

	"github.com/imgloop/imgloop/disk/hostfile"
)

// Image locking. Open locks the host files of an image as QEMU does, so
// that imgloop and QEMU processes (qemu-img, qemu-io, qemu-nbd, a VM) using
// the same image exclude each other: a writer conflicts with every other
// writer and reader, readers share with readers.
//
// The model is QEMU's block layer. A user of an image takes an Access: the
// permissions it holds (Perm) and those it lets others hold (Shared). The
// format driver derives from it the access it takes on each host file,
// from the file's Role (block.c bdrv_default_perms): a qcow2 image file
// holds metadata, so a driver writes to it and refuses to let others write
// or resize it even when its user would share that; raw passes its user's
// access through. The host file layer then locks QEMU's lock bytes for
// that access (hostfile.OSFile.Lock, block/file-posix.c).

// Perm is a set of QEMU block permissions (BLK_PERM_*).
type Perm = hostfile.Perm

// The permissions (see hostfile.Perm).
const (
	PermConsistentRead = hostfile.PermConsistentRead
	PermWrite          = hostfile.PermWrite
	PermWriteUnchanged = hostfile.PermWriteUnchanged
	PermResize         = hostfile.PermResize
	PermAll            = hostfile.PermAll
)

// ErrLocked is matched by the error of an Open that another process (or
// another open of the same file) prevents: a *LockError.
var ErrLocked = hostfile.ErrLocked

// LockError reports a lock that could not be taken on a host file: which
// file, which permission, and whether the other user holds it or refuses
// to share it. Its message reads as QEMU's: `a.qcow2: Failed to get
// "write" lock: is another process using the image?`.
type LockError = hostfile.LockError

// Access is what a user takes of an image or a host file: the permissions
// it holds and those it lets other users hold (QEMU's perm and
// shared_perm).
type Access struct {
	Perm, Shared Perm
}

// Role says what a driver keeps in a host file (QEMU's BdrvChildRole); it
// decides the access the driver takes on the file (Access.File).
type Role uint8

const (
	// RoleImage: the image's metadata and guest data (a qcow2 file).
	RoleImage Role = iota
	// RoleFiltered: the guest data byte for byte (a raw file).
	RoleFiltered
	// RoleMetadata: metadata only (a qcow2 file with an external data
	// file).
	RoleMetadata
	// RoleData: guest data only (an external data file).
	RoleData
)

// FileRoler is implemented by drivers whose image file is not RoleImage
// (raw: RoleFiltered). Open locks the image file for that role.
type FileRoler interface {
	FileRole() Role
}

// errWriteShare is returned by Access for ForceShare or ShareWrite with a
// read-write open.
var errWriteShare = errors.New("disk: force-share (-U) and ShareWrite can only be used with read-only images")

// Access returns the access an open with o takes of the image, as QEMU's
// BlockBackend for the image:
//
//   - read-write: consistent read, write and resize, sharing consistent
//     read and unchanging writes only (a writer refuses other writers, as
//     a QEMU guest disk does);
//   - read-only: consistent read, sharing consistent read and unchanging
//     writes (qemu-img convert's source, BDRV_O_NO_SHARE); with
//     ShareWrite every permission is shared (qemu-img info, map and
//     check); with ForceShare too, and the drivers share everything on
//     their files as well (QEMU's force-share).
//
// An open with Snapshot set is read-only. ForceShare and ShareWrite with a
// read-write open are an error.
func (o OpenOptions) Access() (Access, error) {
	if o.writable() {
		if o.ForceShare || o.ShareWrite {
			return Access{}, errWriteShare
		}
		return Access{PermConsistentRead | PermWrite | PermResize, PermConsistentRead | PermWriteUnchanged}, nil
	}
	a := Access{PermConsistentRead, PermConsistentRead | PermWriteUnchanged}
	if o.ShareWrite || o.ForceShare {
		a.Shared = PermAll
	}
	return a, nil
}

// writable reports whether o opens the image for writing.
func (o OpenOptions) writable() bool { return !o.ReadOnly && o.Snapshot == "" }

// FileAccess returns the access a driver takes on a host file of role r
// of an image opened with o: Access().File(r, writable), everything
// shared with ForceShare (QEMU's force_share in bdrv_child_perm).
func (o OpenOptions) FileAccess(r Role) (Access, error) {
	a, err := o.Access()
	if err != nil {
		return Access{}, err
	}
	fa := a.File(r, o.writable())
	if o.ForceShare {
		fa.Shared = PermAll
	}
	return fa, nil
}

// File returns the access a format driver takes on a host file of role r
// when its user takes a, for an image opened read-write if writable (QEMU's
// bdrv_default_perms: bdrv_filter_default_perms for RoleFiltered, else
// bdrv_default_perms_for_storage). A file holding metadata is always read
// and, when writable, written and resized, and never shared for writing
// or resizing; a data file is not shared for resizing, and written data
// may grow it.
func (a Access) File(r Role, writable bool) Access {
	perm, shared := a.Perm&PermAll, a.Shared&PermAll
	if r == RoleFiltered {
		return Access{perm, shared}
	}
	if r == RoleImage || r == RoleMetadata {
		if writable {
			perm |= PermWrite | PermResize
		}
		perm |= PermConsistentRead
		shared &^= PermWrite | PermResize
	}
	if r == RoleImage || r == RoleData {
		shared &^= PermResize
		if perm&PermWriteUnchanged != 0 {
			perm |= PermWrite
		}
		if perm&PermWrite != 0 {
			perm |= PermResize
		}
	}
	return Access{perm, shared}
}

// locker is a host file that takes QEMU's locks (*hostfile.OSFile).
type locker interface {
	Lock(perm, shared Perm) error
}

// lockFile takes the locks of access a on f if f is a host file that
// locks; other files (in-memory test files) are left to their owner. It
// returns the function that releases them.
func lockFile(f File, a Access) (unlock func(), err error) {
	l, ok := f.(locker)
	if !ok {
		return func() {}, nil
	}
	if err := l.Lock(a.Perm, a.Shared); err != nil {
		return nil, err
	}
	return func() { _ = l.Lock(0, PermAll) }, nil
}

// lockImageFile takes on f, the image file of an image of driver d opened
// with opts, the locks of its role (FileRoler; RoleImage by default).
func lockImageFile(f File, d Driver, opts OpenOptions) (unlock func(), err error) {
	role := RoleImage
	if r, ok := d.(FileRoler); ok {
		role = r.FileRole()
	}
	a, err := opts.FileAccess(role)
	if err != nil {
		return nil, err
	}
	return lockFile(f, a)
}

// OpenChildFile opens the host file at path that a driver keeps in role r
// for an image opened with opts (an external data file), read-write when
// the image is opened read-write, and takes its locks (FileAccess). The
// locks go when the file is closed.
//
// Errors: the *fs.PathError of the open, a *LockError (ErrLocked) when
// another process conflicts.
func OpenChildFile(path string, r Role, opts OpenOptions) (File, error) {
	a, err := opts.FileAccess(r)
	if err != nil {
		return nil, err
	}
	f, err := hostfile.Open(path, !opts.writable())
	if err != nil {
		return nil, err
	}
	if _, err := lockFile(f, a); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// CreateFile creates (or truncates) the host file of a new image at path
// that the caller writes itself (a convert destination): it takes QEMU's
// creator locks before truncating (hostfile.Create: a file another
// process uses is left as it is), then a writer's (OpenOptions{} for
// RoleImage: refusing others' reads and writes), held until the file is
// closed.
//
// Errors: the *fs.PathError of the open, a *LockError (ErrLocked) when
// another process conflicts.
func CreateFile(path string) (*hostfile.OSFile, error) {
	f, err := hostfile.Create(path)
	if err != nil {
		return nil, err
	}
	a, err := OpenOptions{}.FileAccess(RoleImage)
	if err == nil {
		err = f.Lock(a.Perm, a.Shared)
	}
	if err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}
