package hostfile

import (
	"errors"
	"fmt"
	"strings"

	"golang.org/x/sys/unix"
)

// Image locking as QEMU does it (block/file-posix.c, raw_apply_lock_bytes
// and raw_check_lock_bytes), so that imgloop and QEMU processes using the
// same image exclude each other:
//
//   - a user holding permission bit i of a file (PermWrite is bit 1)
//     holds a shared OFD lock (F_OFD_SETLK, F_RDLCK) on byte
//     LockPermBase+i;
//   - a user refusing to share permission bit i holds one on byte
//     LockSharedBase+i;
//   - before it takes a permission, a user tests (F_OFD_GETLK, F_WRLCK)
//     that nobody else refuses to share it (byte LockSharedBase+i), and
//     before it refuses to share one, that nobody else holds it (byte
//     LockPermBase+i). A shared lock never conflicts with another shared
//     lock, so only these tests find conflicts.
//
// OFD locks belong to the open file description: two opens of one file in
// one process conflict as two processes do, and the locks go when the file
// is closed.

// Perm is a set of QEMU block permissions (include/block/block-common.h,
// BLK_PERM_*): what a user of an image does with it, or lets others do.
type Perm uint8

// The permissions, with QEMU's bit values (bit i locks byte
// LockPermBase+i and LockSharedBase+i).
const (
	// PermConsistentRead is BLK_PERM_CONSISTENT_READ: reading a complete
	// and self-consistent view of the disk.
	PermConsistentRead Perm = 1 << iota
	// PermWrite is BLK_PERM_WRITE: changing the visible disk contents.
	PermWrite
	// PermWriteUnchanged is BLK_PERM_WRITE_UNCHANGED: writes that leave
	// the visible contents as they are.
	PermWriteUnchanged
	// PermResize is BLK_PERM_RESIZE: changing the size.
	PermResize

	// PermAll is BLK_PERM_ALL, every permission.
	PermAll = PermConsistentRead | PermWrite | PermWriteUnchanged | PermResize
)

// The lock bytes (RAW_LOCK_PERM_BASE and RAW_LOCK_SHARED_BASE; libvirt
// uses byte 0).
const (
	LockPermBase   = 100
	LockSharedBase = 200
)

// permNames are QEMU's names of the permissions (bdrv_perm_names), in bit
// order.
var permNames = [...]string{"consistent read", "write", "write unchanged", "resize"}

// String returns QEMU's names of the permissions in p, separated by ", "
// ("consistent read, write"); "" for none.
func (p Perm) String() string {
	var names []string
	for i, n := range permNames {
		if p&(1<<i) != 0 {
			names = append(names, n)
		}
	}
	return strings.Join(names, ", ")
}

// ErrLocked is matched by a *LockError for a lock another user of the
// file prevents.
var ErrLocked = errors.New("image is locked by another process")

// LockError reports a lock that could not be taken on a host file.
type LockError struct {
	// Path is the file's name.
	Path string
	// Perm is the permission the lock is about (one bit).
	Perm Perm
	// Shared says that the conflict is with another user holding Perm,
	// which this open refuses to share (QEMU's "shared" lock); otherwise
	// another user refuses to share Perm, which this open takes.
	Shared bool
	// Byte is the lock byte that could not be locked or tested, when Err
	// is set.
	Byte int64
	// Err is the system call's error when the byte could not be locked
	// or tested for another reason than a conflict; nil for a conflict.
	Err error
}

// Error reads as QEMU's message: `a.qcow2: Failed to get "write" lock: is
// another process using the image?`.
func (e *LockError) Error() string {
	if e.Err != nil {
		return fmt.Sprintf("%s: Failed to lock byte %d: %v", e.Path, e.Byte, e.Err)
	}
	if e.Perm == 0 {
		return fmt.Sprintf("%s: Failed to lock byte %d: is another process using the image?", e.Path, e.Byte)
	}
	shared := ""
	if e.Shared {
		shared = "shared "
	}
	return fmt.Sprintf("%s: Failed to get %s%q lock: is another process using the image?", e.Path, shared, e.Perm.String())
}

// Is reports whether target is ErrLocked, for a conflict.
func (e *LockError) Is(target error) bool { return target == ErrLocked && e.Err == nil }

// Unwrap returns the system call's error, if any.
func (e *LockError) Unwrap() error { return e.Err }

// lockState is what an OSFile holds of QEMU's locks (BDRVRawState's perm,
// shared_perm, locked_perm and locked_shared_perm). The zero value holds
// nothing and shares everything.
type lockState struct {
	perm, unshared             Perm // committed: held, and refused to others
	lockedPerm, lockedUnshared Perm // bits whose bytes are locked now
	noOFD                      bool // the kernel has no OFD locks: locking is off
}

// Lock makes this open file hold the permissions perm and share those in
// shared with other users of the file, by QEMU's lock bytes, as
// raw_handle_perm_lock does: the bytes for the union of the old and new
// permissions are locked, the new ones are tested against other users'
// locks, then the bytes no longer needed are unlocked. Lock(0, PermAll)
// releases every lock; closing the file does too.
//
// On a kernel without OFD locks Lock does nothing, as QEMU's default
// (locking=auto) does.
//
// Errors: a *LockError, matching ErrLocked when another user of the file
// conflicts; the file's locks are then as they were before the call.
func (o *OSFile) Lock(perm, shared Perm) error {
	o.lockMu.Lock()
	defer o.lockMu.Unlock()
	if o.lock.noOFD {
		return nil
	}
	perm &= PermAll
	unshared := ^shared & PermAll
	s := &o.lock
	if s.perm|perm == s.perm && s.unshared|unshared == s.unshared {
		// Only giving up permissions: nothing to test (RAW_PL_PREPARE's
		// shortcut).
		_ = o.applyLocks(perm, unshared, true)
		s.perm, s.unshared = perm, unshared
		return nil
	}
	err := o.applyLocks(s.perm|perm, s.unshared|unshared, false)
	if err == nil {
		err = o.checkLocks(perm, unshared)
	}
	if err != nil {
		// RAW_PL_ABORT: back to the committed state.
		_ = o.applyLocks(s.perm, s.unshared, true)
		if errors.Is(err, errNoOFD) {
			s.noOFD = true
			return nil
		}
		return err
	}
	_ = o.applyLocks(perm, unshared, true)
	s.perm, s.unshared = perm, unshared
	return nil
}

// errNoOFD: the kernel does not know F_OFD_SETLK.
var errNoOFD = errors.New("no OFD locks")

// applyLocks locks the bytes of perm and unshared not yet locked and, with
// unlock set, unlocks those locked that are in neither
// (raw_apply_lock_bytes).
func (o *OSFile) applyLocks(perm, unshared Perm, unlock bool) error {
	s := &o.lock
	for _, set := range []struct {
		base   int64
		want   Perm
		locked *Perm
	}{{LockPermBase, perm, &s.lockedPerm}, {LockSharedBase, unshared, &s.lockedUnshared}} {
		for i := range len(permNames) {
			bit := Perm(1) << i
			off := set.base + int64(i)
			switch {
			case set.want&bit != 0 && *set.locked&bit == 0:
				if err := o.fcntlLock(unix.F_OFD_SETLK, unix.F_RDLCK, off); err != nil {
					if err == unix.EINVAL {
						return errNoOFD
					}
					e := &LockError{Path: o.f.Name(), Byte: off}
					if err != unix.EAGAIN && err != unix.EACCES {
						e.Err = err
					}
					return e
				}
				*set.locked |= bit
			case unlock && set.want&bit == 0 && *set.locked&bit != 0:
				if err := o.fcntlLock(unix.F_OFD_SETLK, unix.F_UNLCK, off); err != nil {
					return &LockError{Path: o.f.Name(), Byte: off, Err: err}
				}
				*set.locked &^= bit
			}
		}
	}
	return nil
}

// checkLocks tests that no other user refuses to share a permission of
// perm, nor holds one of unshared (raw_check_lock_bytes).
func (o *OSFile) checkLocks(perm, unshared Perm) error {
	for _, c := range []struct {
		base   int64
		bits   Perm
		shared bool
	}{{LockSharedBase, perm, false}, {LockPermBase, unshared, true}} {
		for i := range len(permNames) {
			bit := Perm(1) << i
			if c.bits&bit == 0 {
				continue
			}
			off := c.base + int64(i)
			lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: off, Len: 1}
			err := ignoreEINTRErrno(func() error { return unix.FcntlFlock(o.f.Fd(), unix.F_OFD_GETLK, &lk) })
			if err == unix.EINVAL {
				return errNoOFD
			}
			if err != nil {
				return &LockError{Path: o.f.Name(), Perm: bit, Shared: c.shared, Byte: off, Err: err}
			}
			if lk.Type != unix.F_UNLCK {
				return &LockError{Path: o.f.Name(), Perm: bit, Shared: c.shared, Byte: off}
			}
		}
	}
	return nil
}

// fcntlLock sets a lock of type typ on byte off.
func (o *OSFile) fcntlLock(cmd int, typ int16, off int64) error {
	lk := unix.Flock_t{Type: typ, Whence: 0, Start: off, Len: 1}
	return ignoreEINTRErrno(func() error { return unix.FcntlFlock(o.f.Fd(), cmd, &lk) })
}

// ignoreEINTRErrno calls fn until it fails with another error than EINTR.
func ignoreEINTRErrno(fn func() error) error {
	for {
		if err := fn(); err != unix.EINTR {
			return err
		}
	}
}
