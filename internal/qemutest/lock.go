package qemutest

import (
	"bytes"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// LockedBytes returns the bytes of QEMU's image lock ranges (100-104 for
// the permissions held, 200-204 for those not shared; block/file-posix.c)
// that are locked on the file at path, as a new open file description
// sees them: the locks of every other open of the file, in this process
// or another.
func LockedBytes(t testing.TB, path string) []int64 {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var held []int64
	for _, base := range []int64{100, 200} {
		for i := int64(0); i < 5; i++ {
			lk := unix.Flock_t{Type: unix.F_WRLCK, Start: base + i, Len: 1}
			if err := unix.FcntlFlock(f.Fd(), unix.F_OFD_GETLK, &lk); err != nil {
				t.Fatalf("testing lock byte %d of %s: %v", base+i, path, err)
			}
			if lk.Type != unix.F_UNLCK {
				held = append(held, base+i)
			}
		}
	}
	return held
}

// Hold starts the QEMU tool name with args (qemu-nbd serving an image,
// qemu-io reading commands from its standard input) to keep the image at
// path open until the test ends, and returns once the lock bytes want
// are held on path (LockedBytes), so that the test runs against QEMU's
// locks in place. It polls rather than sleeps: the tool may take long to
// start on a loaded machine. It fails t if the locks are not all there
// within a minute, or if the tool exits first. The tool is stopped (its
// standard input closed, then killed) when the test ends.
func Hold(t testing.TB, path string, want []int64, name string, args ...string) {
	t.Helper()
	Require(t, name)
	cmd := exec.Command(name, args...)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() {
		cmd.Wait()
		close(exited)
	}()
	t.Cleanup(func() {
		stdin.Close()
		cmd.Process.Kill()
		<-exited
	})
	var got []int64
	for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); {
		if got = LockedBytes(t, path); slices.Equal(got, want) {
			return
		}
		select {
		case <-exited:
			t.Fatalf("%s %s exited before holding the image: %s", name, strings.Join(args, " "), out.String())
		case <-time.After(10 * time.Millisecond):
		}
	}
	// (Its output is not read here: the process still writes to it.)
	t.Fatalf("%s %s: lock bytes %v after a minute, want %v", name, strings.Join(args, " "), got, want)
}
