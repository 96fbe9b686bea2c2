package main

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/imgloop/imgloop/internal/qemutest"
)

var update = flag.Bool("update", false, "rewrite testdata/*.golden")

// imgloopBin is the imgloop executable TestMain builds; tmpDir holds it
// and the shared test images.
var imgloopBin, tmpDir string

func TestMain(m *testing.M) {
	flag.Parse()
	dir, err := os.MkdirTemp("", "imgloop-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	tmpDir = dir
	imgloopBin = filepath.Join(dir, "imgloop")
	args := []string{"build", "-o", imgloopBin}
	if raceEnabled {
		args = append(args, "-race")
	}
	cmd := exec.Command("go", append(args, ".")...)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		fmt.Fprintf(os.Stderr, "building imgloop: %v\n", err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// result is the outcome of one imgloop run.
type result struct {
	stdout, stderr string
	code           int
}

// imgloop runs the binary in dir with args.
func imgloop(t testing.TB, dir string, args ...string) result {
	t.Helper()
	cmd := exec.Command(imgloopBin, args...)
	cmd.Dir = dir
	// A -race binary sleeps a second at exit by default; a race report
	// fails the test through stderr and the exit status (66).
	cmd.Env = append(os.Environ(), "GORACE=atexit_sleep_ms=0")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	r := result{stdout: stdout.String(), stderr: stderr.String()}
	if ee, ok := err.(*exec.ExitError); ok {
		r.code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("imgloop %s: %v", strings.Join(args, " "), err)
	}
	return r
}

// mustRun runs imgloop and fails t unless it succeeds silently on stderr.
func mustRun(t testing.TB, dir string, args ...string) string {
	t.Helper()
	r := imgloop(t, dir, args...)
	if r.code != 0 || r.stderr != "" {
		t.Fatalf("imgloop %s: exit %d, stderr %q", strings.Join(args, " "), r.code, r.stderr)
	}
	return r.stdout
}

// checkFailure checks that r is a failure reported as one "imgloop: ..."
// line, not a crash.
func checkFailure(t testing.TB, r result, args []string) {
	t.Helper()
	if r.code == 0 {
		t.Errorf("imgloop %s: exit 0, want failure (stdout %q)", strings.Join(args, " "), r.stdout)
		return
	}
	lines := strings.Split(strings.TrimSuffix(r.stderr, "\n"), "\n")
	if len(lines) != 1 || !strings.HasPrefix(lines[0], "imgloop: ") || !strings.HasSuffix(r.stderr, "\n") {
		t.Errorf("imgloop %s: stderr %q, want one line \"imgloop: ...\"", strings.Join(args, " "), r.stderr)
	}
	if strings.Contains(r.stderr, "internal error") || strings.Contains(r.stderr, "goroutine ") {
		t.Errorf("imgloop %s crashed: %s", strings.Join(args, " "), r.stderr)
	}
}

// golden compares got with testdata/name.golden, or rewrites it under
// -update.
func golden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", name+".golden")
	if *update {
		if err := os.MkdirAll("testdata", 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run with -update to create it)", err)
	}
	if got != string(want) {
		t.Errorf("%s differs from %s:\n--- got\n%s--- want\n%s", name, path, got, want)
	}
}

// testImage is one of the images makeImages builds.
type testImage struct {
	name   string // file name in the images folder
	format string // for -f; "" probes
}

var images struct {
	once sync.Once
	dir  string
	list []testImage
	err  string // why building them failed
}

// sharedImages returns the folder holding the test images (built once,
// with qemu-img and qemu-io, for all tests; tests must not change them)
// and their list.
func sharedImages(t *testing.T) (string, []testImage) {
	t.Helper()
	qemutest.Require(t, "qemu-img", "qemu-io")
	images.once.Do(func() {
		images.dir = filepath.Join(tmpDir, "images")
		if err := os.Mkdir(images.dir, 0o755); err != nil {
			images.err = err.Error()
			return
		}
		// Build through a throwaway subtest-free recorder: failures are
		// kept and reported to every caller.
		rec := &recorder{TB: t}
		func() {
			defer func() {
				if r := recover(); r != nil && r != errRecorded {
					panic(r)
				}
			}()
			images.list = makeImages(rec, images.dir)
		}()
		images.err = rec.msg
	})
	if images.err != "" {
		t.Fatalf("building test images: %s", images.err)
	}
	return images.dir, images.list
}

// errRecorded unwinds makeImages after a recorded failure.
var errRecorded = errors.New("recorded failure")

// recorder is a testing.TB whose Fatal records the message and unwinds,
// so that a failure while building the shared images is reported to every
// test that needs them, not only the first.
type recorder struct {
	testing.TB
	msg string
}

func (r *recorder) Fatal(args ...any) { r.msg = fmt.Sprint(args...); panic(errRecorded) }
func (r *recorder) Fatalf(format string, args ...any) {
	r.msg = fmt.Sprintf(format, args...)
	panic(errRecorded)
}

// makeImages builds the test images in dir with qemu-img and qemu-io and
// returns their names.
func makeImages(t testing.TB, dir string) []testImage {
	t.Helper()
	p := func(name string) string { return filepath.Join(dir, name) }
	write := func(name, format string, cmds ...string) { qemutest.IO(t, p(name), format, cmds...) }

	// raw: data, a hole, more data.
	qemutest.Create(t, p("disk.raw"), "raw", "", "4M")
	write("disk.raw", "raw", "write -P 0x11 0 64k", "write -P 0x22 1M 128k", "write -P 0x33 3145728 4k")

	// qcow2 with data, an explicit zero cluster and a discarded one.
	qemutest.Create(t, p("plain.qcow2"), "qcow2", "", "8M")
	write("plain.qcow2", "qcow2", "write -P 0x44 0 192k", "write -z 1M 64k", "write -P 0x55 2M 64k",
		"write -P 0x66 4194304 512", "write -P 0 6M 64k")

	// backing chain: base <- top, top overriding part of base.
	qemutest.Create(t, p("base.qcow2"), "qcow2", "", "8M")
	write("base.qcow2", "qcow2", "write -P 0x77 0 1M", "write -P 0x78 5M 64k")
	qemutest.Create(t, p("top.qcow2"), "qcow2", "", "8M", "-b", "base.qcow2", "-F", "qcow2")
	write("top.qcow2", "qcow2", "write -P 0x88 256k 64k", "write -z 512k 64k", "write -P 0x89 7M 64k")

	// compressed (zlib and zstd) from compressible data.
	src := p("compressible.raw")
	data := qemutest.Compressible(7, 3<<20)
	img := make([]byte, 8<<20)
	copy(img[1<<20:], data)
	if err := os.WriteFile(src, img, 0o644); err != nil {
		t.Fatal(err)
	}
	qemutest.Img(t, "convert", "-c", "-O", "qcow2", src, p("zlib.qcow2"))
	qemutest.Img(t, "convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", src, p("zstd.qcow2"))

	// qcow2 v2 (compat=0.10) and extended L2 entries.
	qemutest.Create(t, p("v2.qcow2"), "qcow2", "compat=0.10", "4M")
	write("v2.qcow2", "qcow2", "write -P 0x99 64k 64k")
	qemutest.Create(t, p("ext-l2.qcow2"), "qcow2", "extended_l2=on,cluster_size=128k", "4M")
	write("ext-l2.qcow2", "qcow2", "write -P 0xaa 4k 4k", "write -P 0xab 300k 20k")

	// external data file.
	// (qemu-img creates the data file relative to its working directory.)
	qemuImg(t, dir, "create", "-q", "-f", "qcow2", "-o", "data_file=ext.data", "ext.qcow2", "4M")
	// (qemu 7.2 resolves the data file name against its working directory.)
	runIn(t, dir, "qemu-io", "-f", "qcow2", "-c", "write -P 0xbb 128k 64k", "ext.qcow2")

	// qcow2 with an internal snapshot.
	qemutest.Create(t, p("snap.qcow2"), "qcow2", "", "4M")
	write("snap.qcow2", "qcow2", "write -P 0xcc 0 64k")
	qemutest.Img(t, "snapshot", "-c", "first", p("snap.qcow2"))
	write("snap.qcow2", "qcow2", "write -P 0xcd 0 64k")

	// lazy refcounts, left dirty by a crash (qemu-io abort).
	qemutest.Create(t, p("dirty.qcow2"), "qcow2", "lazy_refcounts=on", "4M")
	cmd := exec.Command("qemu-io", "-f", "qcow2", "-c", "write -P 0xdd 0 64k", "-c", "abort", p("dirty.qcow2"))
	_ = cmd.Run() // abort kills qemu-io, by design

	if err := os.WriteFile(p("empty"), nil, 0o644); err != nil {
		t.Fatal(err)
	}

	return []testImage{
		{"disk.raw", "raw"}, {"plain.qcow2", ""}, {"base.qcow2", ""}, {"top.qcow2", ""},
		{"zlib.qcow2", ""}, {"zstd.qcow2", ""}, {"v2.qcow2", ""}, {"ext-l2.qcow2", ""},
		{"ext.qcow2", ""}, {"snap.qcow2", ""}, {"dirty.qcow2", ""},
	}
}

// openArgs returns the -f arguments for img.
func (img testImage) openArgs() []string {
	if img.format == "" {
		return nil
	}
	return []string{"-f", img.format}
}

// qemuImg runs qemu-img in dir and returns its standard output.
func qemuImg(t testing.TB, dir string, args ...string) string {
	t.Helper()
	return runIn(t, dir, "qemu-img", args...)
}

// runIn runs a program in dir and returns its standard output.
func runIn(t testing.TB, dir, prog string, args ...string) string {
	t.Helper()
	qemutest.Require(t, prog)
	cmd := exec.Command(prog, args...)
	cmd.Dir = dir
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s %s: %v: %s", prog, strings.Join(args, " "), err, stderr.String())
	}
	return string(out)
}
