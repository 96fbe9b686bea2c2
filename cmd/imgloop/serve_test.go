package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/imgloop/imgloop/internal/qemutest"
	"github.com/imgloop/imgloop/internal/tlstest"
)

// server is a running imgloop serve.
type server struct {
	cmd    *exec.Cmd
	uris   []string
	stderr *bytes.Buffer
	done   chan error
}

// shortTemp returns a directory whose paths fit in a unix socket address.
func shortTemp(t testing.TB) string {
	t.Helper()
	d, err := os.MkdirTemp("", "srv")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// startServe runs imgloop serve with args and waits for the n URIs it
// prints once it accepts connections; the server is killed at cleanup
// if still running.
func startServe(t testing.TB, n int, args ...string) *server {
	t.Helper()
	cmd := exec.Command(imgloopBin, append([]string{"serve"}, args...)...)
	cmd.Env = append(os.Environ(), "GORACE=atexit_sleep_ms=0")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	s := &server{cmd: cmd, stderr: &bytes.Buffer{}, done: make(chan error, 1)}
	cmd.Stderr = s.stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-s.done
	})
	lines := make(chan string)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
		s.done <- cmd.Wait()
	}()
	timeout := time.After(20 * time.Second)
	for len(s.uris) < n {
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatalf("imgloop serve %s exited before printing its URIs: %s", strings.Join(args, " "), s.stderr)
			}
			s.uris = append(s.uris, l)
		case <-timeout:
			t.Fatalf("imgloop serve %s printed no URIs", strings.Join(args, " "))
		}
	}
	go func() {
		for range lines {
		}
	}()
	return s
}

// stop sends sig and returns the exit status.
func (s *server) stop(t testing.TB, sig syscall.Signal) int {
	t.Helper()
	s.cmd.Process.Signal(sig)
	select {
	case <-s.done:
	case <-time.After(30 * time.Second):
		t.Fatal("imgloop serve did not exit")
	}
	s.done <- nil // for the cleanup
	return s.cmd.ProcessState.ExitCode()
}

// freePort returns a TCP address on the loopback interface nothing
// listens on.
func freePort(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// testQcow2 makes a qcow2 image with data written by qemu-io.
func testQcow2(t testing.TB, dir, name string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	qemutest.Create(t, p, "qcow2", "", "16M")
	qemutest.IO(t, p, "qcow2", "write -P 0xab 0 1M", "write -c -P 0x12 4M 256k", "write -z 6M 64k")
	return p
}

// TestServe serves a qcow2 over a unix socket and TCP at once to
// qemu-img and qemu-io; SIGTERM then flushes, closes and exits 0.
func TestServe(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	dir := shortTemp(t)
	p := testQcow2(t, dir, "a.qcow2")
	want := qemutest.RawBytes(t, p)
	sock := filepath.Join(dir, "s")
	addr := freePort(t)
	s := startServe(t, 2, "-k", sock, "--listen", addr, p)
	if s.uris[0] != "nbd+unix:///?socket="+sock || s.uris[1] != "nbd://"+addr+"/" {
		t.Fatalf("URIs %q", s.uris)
	}
	for _, uri := range s.uris {
		out := filepath.Join(dir, "out.raw")
		qemutest.Img(t, "convert", "-f", "raw", uri, "-O", "raw", out)
		got, _ := os.ReadFile(out)
		if !bytes.Equal(got, want) {
			t.Fatalf("%s: differs from qemu-img convert at %d", uri, qemutest.FirstDiff(got, want))
		}
	}
	// Locked as QEMU locks: qemu-img info without -U fails meanwhile.
	if _, err := qemutest.Try("qemu-img", "info", p); err == nil {
		t.Error("qemu-img info of a served read-write image succeeded without -U")
	}
	// A second server on the same image is refused with the lock error.
	r := imgloop(t, dir, "serve", "-k", filepath.Join(dir, "s2"), p)
	checkFailure(t, r, []string{"serve", p})
	if !strings.Contains(r.stderr, "lock") {
		t.Errorf("second server: %q, want a lock conflict", r.stderr)
	}
	qemutest.Run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x5c 8M 192k", s.uris[1])
	if code := s.stop(t, syscall.SIGTERM); code != 0 {
		t.Fatalf("exit status %d after SIGTERM: %s", code, s.stderr)
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Error("socket left behind")
	}
	qemutest.Img(t, "check", p)
	qemutest.IO(t, p, "qcow2", "read -P 0x5c 8M 192k", "read -P 0xab 0 1M")
}

// TestServeOptions covers exports' names, read-only exports, --fork with
// --pidfile, --oneshot and bad command lines.
func TestServeOptions(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io", "nbdinfo")
	dir := shortTemp(t)
	a, b := testQcow2(t, dir, "a.qcow2"), testQcow2(t, dir, "b.qcow2")
	sock := filepath.Join(dir, "s")

	t.Run("names and read-only", func(t *testing.T) {
		s := startServe(t, 2, "-r", "-k", sock, "--name", "one", "--name", "two", "--description", "A", "--description", "B", a, b)
		if s.uris[0] != "nbd+unix:///one?socket="+sock || s.uris[1] != "nbd+unix:///two?socket="+sock {
			t.Fatalf("URIs %q", s.uris)
		}
		list := qemutest.Run(t, "nbdinfo", "--list", s.uris[0])
		for _, w := range []string{`export="one"`, `export="two"`, "description: A", "description: B", "is_read_only: true"} {
			if !strings.Contains(list, w) {
				t.Errorf("nbdinfo --list: no %q in\n%s", w, list)
			}
		}
		if out, err := qemutest.Try("qemu-io", "-f", "raw", "-c", "write 0 4k", s.uris[0]); err == nil && !strings.Contains(out, "failed") {
			t.Errorf("write to a read-only export: %s", out)
		}
		// Readers share: qemu-img info works beside a read-only server.
		qemutest.Img(t, "info", a)
		s.stop(t, syscall.SIGINT)
	})

	t.Run("default names", func(t *testing.T) {
		s := startServe(t, 2, "-r", "-k", sock, a, b)
		if s.uris[0] != "nbd+unix:///a.qcow2?socket="+sock || s.uris[1] != "nbd+unix:///b.qcow2?socket="+sock {
			t.Fatalf("URIs %q", s.uris)
		}
		s.stop(t, syscall.SIGTERM)
	})

	t.Run("fork and pidfile", func(t *testing.T) {
		pidfile := filepath.Join(dir, "pid")
		out := mustRun(t, dir, "serve", "--fork", "--pidfile", pidfile, "-k", sock, a)
		if out != "nbd+unix:///?socket="+sock+"\n" {
			t.Errorf("--fork printed %q", out)
		}
		data, err := os.ReadFile(pidfile)
		if err != nil {
			t.Fatal(err)
		}
		pid, _ := strconv.Atoi(strings.TrimSpace(string(data)))
		proc, err := os.FindProcess(pid)
		if err != nil || pid <= 0 {
			t.Fatalf("pidfile %q", data)
		}
		qemutest.Run(t, "nbdinfo", "--size", "nbd+unix:///?socket="+sock) // accepts at once
		proc.Signal(syscall.SIGTERM)
		waitGone(t, pid)
		if _, err := os.Stat(pidfile); !os.IsNotExist(err) {
			t.Error("pidfile left behind")
		}
	})

	t.Run("oneshot", func(t *testing.T) {
		s := startServe(t, 1, "--oneshot", "-k", sock, a)
		qemutest.Run(t, "nbdinfo", "--size", s.uris[0])
		select {
		case <-s.done:
			s.done <- nil
			if code := s.cmd.ProcessState.ExitCode(); code != 0 {
				t.Errorf("--oneshot exit status %d: %s", code, s.stderr)
			}
		case <-time.After(20 * time.Second):
			t.Fatal("--oneshot server still running after its client left")
		}
	})

	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"names count", []string{"--name", "x", a, b}, "--name given 1 times for 2 images"},
		{"key without cert", []string{"--tls-key", "k.pem", a}, "--tls-cert and --tls-key go together"},
		{"tls required without cert", []string{"--tls-required", a}, "need --tls-cert"},
		{"missing cert file", []string{"--tls-cert", "nope.pem", "--tls-key", "nope.pem", a}, "no such file"},
		{"missing image", []string{"-k", sock, "nope.qcow2"}, "nope.qcow2"},
		{"not a socket", []string{"-k", a, b}, "not a socket"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"serve"}, tc.args...)
			r := imgloop(t, dir, args...)
			checkFailure(t, r, args)
			if !strings.Contains(r.stderr, tc.want) {
				t.Errorf("stderr %q, want %q", r.stderr, tc.want)
			}
		})
	}
}

// waitGone waits for process pid to exit.
func waitGone(t testing.TB, pid int) {
	t.Helper()
	for range 400 {
		if syscall.Kill(pid, 0) != nil {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("process %d still running", pid)
}

// TestServeTLS serves with the certificates of a test CA to qemu-img
// (tls-creds-x509) and nbdinfo (tls-certificates=); with --tls-required
// a plain client is refused.
func TestServeTLS(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io", "nbdinfo")
	pki := tlstest.New(t)
	dir := shortTemp(t)
	p := testQcow2(t, dir, "a.qcow2")
	sock := filepath.Join(dir, "s")
	addr := freePort(t)
	s := startServe(t, 2, "--tls-cert", pki.ServerCert, "--tls-key", pki.ServerKey, "--tls-ca", pki.CACert,
		"--tls-required", "-k", sock, "--listen", addr, p)
	if s.uris[0] != "nbds+unix:///?socket="+sock || s.uris[1] != "nbds://"+addr+"/" {
		t.Fatalf("URIs %q", s.uris)
	}
	obj := "tls-creds-x509,id=tls0,endpoint=client,dir=" + pki.Dir
	host, port, _ := net.SplitHostPort(addr)
	qemutest.Run(t, "qemu-io", "--object", obj, "--image-opts",
		fmt.Sprintf("driver=nbd,host=%s,port=%s,tls-creds=tls0,tls-hostname=localhost", host, port),
		"-c", "write -P 0x3c 2M 64k", "-c", "flush")
	info := qemutest.Run(t, "nbdinfo", s.uris[0]+"&tls-certificates="+pki.Dir)
	if !strings.Contains(info, "with TLS") {
		t.Errorf("nbdinfo:\n%s", info)
	}
	if _, err := qemutest.Try("qemu-img", "info", "nbd+unix:///?socket="+sock); err == nil {
		t.Error("plain client served with --tls-required")
	}
	if code := s.stop(t, syscall.SIGTERM); code != 0 {
		t.Fatalf("exit status %d: %s", code, s.stderr)
	}
	qemutest.IO(t, p, "qcow2", "read -P 0x3c 2M 64k")
}

// TestServeSocketActivation passes a listening socket as systemd does.
func TestServeSocketActivation(t *testing.T) {
	qemutest.Require(t, "qemu-img", "nbdinfo")
	dir := shortTemp(t)
	p := testQcow2(t, dir, "a.qcow2")
	sock := filepath.Join(dir, "act")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	f, err := l.(*net.UnixListener).File()
	if err != nil {
		t.Fatal(err)
	}
	l.Close()
	cmd := exec.Command("sh", "-c", `LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" serve -r "$1"`, imgloopBin, p)
	cmd.ExtraFiles = []*os.File{f}
	cmd.Env = append(os.Environ(), "GORACE=atexit_sleep_ms=0")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	defer cmd.Wait()
	defer cmd.Process.Signal(syscall.SIGTERM)
	size := strings.TrimSpace(qemutest.Run(t, "nbdinfo", "--size", "nbd+unix:///?socket="+sock))
	if size != strconv.Itoa(16<<20) {
		t.Errorf("size over an activated socket: %s (%s)", size, stderr.String())
	}
}

// TestServeCrash writes and flushes through imgloop serve with qemu-io
// and kills the server with SIGKILL at random moments, many times: the
// image must stay free of corruption and every write acknowledged before
// the last completed flush must read back.
func TestServeCrash(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	dir := shortTemp(t)
	p := filepath.Join(dir, "c.qcow2")
	const slots, slotSize, markers = 1024, 64 << 10, int64(64 << 20)
	qemutest.Create(t, p, "qcow2", "cluster_size=4096", "65M")
	sock := filepath.Join(dir, "s")
	rng := rand.New(rand.NewPCG(7, 7))
	durable := map[int64]int{} // slot -> pattern durable at the last completed flush
	const rounds, groups, perGroup = 20, 8, 5
	// Each slot is written once: a write after the last completed flush
	// may or may not survive, so a slot rewritten later could legally
	// hold either pattern.
	order := rng.Perm(slots)
	for round := range rounds {
		s := startServe(t, 1, "-k", sock, p)
		// One qemu-io session runs its commands in order: groups of
		// writes, each followed by a flush and a marker read of its
		// own offset; a marker's "read" line proves its flush done.
		var cmds []string
		type write struct {
			slot int64
			pat  int
		}
		var written [groups][perGroup]write
		for g := range groups {
			for i := range perGroup {
				w := write{int64(order[(round*groups+g)*perGroup+i]), 1 + rng.IntN(250)}
				written[g][i] = w
				cmds = append(cmds, "-c", fmt.Sprintf("write -P %d %d %d", w.pat, w.slot*slotSize, slotSize))
			}
			cmds = append(cmds, "-c", "flush", "-c", fmt.Sprintf("read %d 512", markers+int64(g)*512))
		}
		client := exec.Command("qemu-io", append(append([]string{"-f", "raw"}, cmds...), s.uris[0])...)
		var out bytes.Buffer
		client.Stdout, client.Stderr = &out, &out
		if err := client.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Duration(5+rng.IntN(80)) * time.Millisecond)
		s.cmd.Process.Kill()
		<-s.done
		s.done <- nil
		client.Wait()
		for g := range groups {
			if strings.Contains(out.String(), fmt.Sprintf("read 512/512 bytes at offset %d\n", markers+int64(g)*512)) {
				for _, w := range written[g] {
					durable[w.slot] = w.pat
				}
			}
		}
		check := exec.Command("qemu-img", "check", p)
		if out, err := check.CombinedOutput(); err != nil {
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.ExitCode() != 3 { // 3: leaks only
				t.Fatalf("round %d: qemu-img check: %v\n%s", round, err, out)
			}
		}
		var reads []string
		for slot, pat := range durable {
			reads = append(reads, fmt.Sprintf("read -P %d %d %d", pat, slot*slotSize, slotSize))
		}
		if len(reads) > 0 {
			if out := qemutest.IO(t, p, "qcow2", reads...); strings.Contains(out, "Pattern verification failed") {
				t.Fatalf("round %d: a write acknowledged before a completed flush was lost:\n%s", round, out)
			}
		}
	}
	if len(durable) == 0 {
		t.Fatal("no flush ever completed before a kill: the test proved nothing")
	}
	t.Logf("%d rounds, %d slots durable", rounds, len(durable))
}
