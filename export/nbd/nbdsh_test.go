package nbd

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/imgloop/imgloop/internal/qemutest"
)

// nbdshPrelude runs before each script: it connects h to $URI with
// base:allocation selected and libnbd's client-side checks off, so that
// the server sees the bad requests, and defines expect(errno, fn).
const nbdshPrelude = `
import errno, os
h.set_strict_mode(0)
h.add_meta_context("base:allocation")
h.connect_uri(os.environ["URI"])
size = h.get_size()
def expect(code, fn, *args):
    try:
        fn(*args)
    except nbd.Error as e:
        if e.errno != errno.errorcode[code]:
            raise SystemExit("%s: errno %s, want %s (%s)" % (fn.__name__, e.errno, errno.errorcode[code], e.string))
        return
    raise SystemExit("%s succeeded, want errno %s" % (fn.__name__, errno.errorcode[code]))
`

// nbdsh runs script with nbdsh against uri.
func nbdsh(t *testing.T, uri, script string) {
	t.Helper()
	qemutest.Require(t, "nbdsh")
	cmd := exec.Command("nbdsh", "-c", nbdshPrelude+script)
	// nbdsh runs "python3" from PATH: the system's, which has the nbd
	// module (python3-libnbd), not a user's.
	cmd.Env = append(os.Environ(), "URI="+uri, "PATH=/usr/bin:"+os.Getenv("PATH"))
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nbdsh: %v\n%s", err, out)
	}
}

// TestErrorsNbdsh sends libnbd each request the spec says a server must
// refuse, and checks the error and that the connection still serves.
func TestErrorsNbdsh(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	p := filepath.Join(dir, "e.qcow2")
	qemutest.Create(t, p, "qcow2", "", "16M")
	qemutest.IO(t, p, "qcow2", "write -P 0x61 0 1M")
	img := openImage(t, p, "qcow2", false)
	s := startServer(t, []Export{{Image: img}, {Name: "ro", Image: img, ReadOnly: true}}, Options{})
	tests := []struct {
		name, export, script string
	}{
		{"read past the end", "", "expect(errno.EINVAL, h.pread, 512, size)"},
		{"read across the end", "", "expect(errno.EINVAL, h.pread, 1024, size-512)"},
		{"write past the end", "", "expect(errno.ENOSPC, h.pwrite, b'x'*512, size)"},
		{"trim past the end", "", "expect(errno.EINVAL, h.trim, 512, size)"},
		{"zero past the end", "", "expect(errno.ENOSPC, h.zero, 512, size)"},
		{"cache past the end", "", "expect(errno.EINVAL, h.cache, 512, size)"},
		{"block status past the end", "", "expect(errno.EINVAL, h.block_status, 512, size, lambda *a: 0)"},
		{"read over the maximum", "", "expect(errno.EOVERFLOW, h.pread, 64<<20, 0)"},
		{"read with an unknown flag", "", "expect(errno.EINVAL, h.pread, 512, 0, nbd.CMD_FLAG_NO_HOLE)"},
		{"write with DF", "", "expect(errno.EINVAL, h.pwrite, b'x'*512, 0, nbd.CMD_FLAG_DF)"},
		{"fast zero that would write", "", `expect(errno.ENOTSUP, h.zero, 512, 512, nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(1024, 0) == b'\x61'*1024, "a failed fast zero changed the data"`},
		{"write to read-only", "ro", "expect(errno.EPERM, h.pwrite, b'x'*512, 0)"},
		{"trim on read-only", "ro", "expect(errno.EPERM, h.trim, 512, 0)"},
		{"zero on read-only", "ro", "expect(errno.EPERM, h.zero, 512, 0)"},
		{"flush on read-only", "ro", "h.flush()"},
		{"fast zero that can be fast", "", `h.zero(1<<20, 4<<20, nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(1<<20, 4<<20) == bytes(1<<20)`},
		{"zero no hole then read", "", `h.pwrite(b'\x62'*4096, 8<<20)
h.zero(4096, 8<<20, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
assert h.pread(4096, 8<<20) == bytes(4096)`},
		{"write fua, trim fua, flush", "", `h.pwrite(b'\x63'*65536, 9<<20, nbd.CMD_FLAG_FUA)
h.trim(65536, 9<<20, nbd.CMD_FLAG_FUA)
h.flush()
assert h.pread(65536, 9<<20) == bytes(65536)`},
		{"block status req one", "", `seen = []
h.block_status(16<<20, 0, lambda ctx, off, ents, err: seen.append(ents), nbd.CMD_FLAG_REQ_ONE)
assert len(seen) == 1 and len(seen[0]) == 2 and seen[0][0] <= (16<<20) and seen[0][1] == 0, seen`},
		{"read with DF", "", "assert h.pread(2<<20, 0, nbd.CMD_FLAG_DF)[:1<<20] == b'\\x61'*(1<<20)"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// After the error, the connection still serves.
			nbdsh(t, s.uri(tt.export), tt.script+"\nassert len(h.pread(512, 0)) == 512\n")
		})
	}
}
