// Package qemutest drives QEMU's tools (qemu-img, qemu-io) from Go tests:
// it builds images at test time and produces the reference data imgloop is
// compared against.
//
// A test that needs a tool calls Require; when the tool is missing the test
// is skipped with the reason, unless IMGLOOP_REQUIRE_TOOLS=1 is set (as CI
// does), in which case it fails: CI can never pass by skipping.
package qemutest

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/imgloop/imgloop/internal/report"
)

// Require skips (or, under IMGLOOP_REQUIRE_TOOLS=1, fails) t unless every
// named program is on PATH.
func Require(t testing.TB, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			msg := fmt.Sprintf("%s not found on PATH (install qemu-utils)", tool)
			if os.Getenv("IMGLOOP_REQUIRE_TOOLS") == "1" {
				t.Fatal(msg + "; IMGLOOP_REQUIRE_TOOLS=1 forbids skipping")
			}
			t.Skip(msg)
		}
	}
}

// Run runs a command and fails t with its output if it does not succeed.
// It returns standard output.
func Run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := Try(name, args...)
	if err != nil {
		t.Fatalf("%v", err)
	}
	return out
}

// Try runs a command and returns its standard output, or an error that
// includes the command line and its standard error.
func Try(name string, args ...string) (string, error) {
	return TryIn("", name, args...)
}

// TryIn is Try with the command's working directory set to dir ("" for
// the test's own).
func TryIn(dir, name string, args ...string) (string, error) {
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("%s %s: %v\n%s%s", name, strings.Join(args, " "), err, stdout.String(), stderr.String())
	}
	return stdout.String(), nil
}

// Img runs qemu-img with args.
func Img(t testing.TB, args ...string) string {
	t.Helper()
	Require(t, "qemu-img")
	return Run(t, "qemu-img", args...)
}

// IO runs qemu-io on image (format fmt, "" to probe) with the given -c
// commands, e.g. IO(t, "a.qcow2", "qcow2", "write -P 0x33 0 64k").
func IO(t testing.TB, image, format string, cmds ...string) string {
	t.Helper()
	Require(t, "qemu-io")
	args := []string{}
	if format != "" {
		args = append(args, "-f", format)
	}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	args = append(args, image)
	return Run(t, "qemu-io", args...)
}

// Create runs `qemu-img create -f format [-o opts] [extra...] path size`
// in path's folder, so that relative names in opts (data_file=) land beside
// the image, where imgloop resolves them. opts may be "", and so may size
// when a backing file gives it.
func Create(t testing.TB, path, format, opts, size string, extra ...string) {
	t.Helper()
	Require(t, "qemu-img")
	args := []string{"create", "-q", "-f", format}
	if opts != "" {
		args = append(args, "-o", opts)
	}
	args = append(args, extra...)
	abs, err := filepath.Abs(path)
	if err != nil {
		t.Fatal(err)
	}
	args = append(args, abs)
	if size != "" {
		args = append(args, size)
	}
	if _, err := TryIn(filepath.Dir(abs), "qemu-img", args...); err != nil {
		t.Fatal(err)
	}
}

// RawBytes returns the virtual disk of image as qemu-img reads it
// (`qemu-img convert -O raw` into a temporary file).
func RawBytes(t testing.TB, image string, openArgs ...string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "ref.raw")
	args := append([]string{"convert", "-O", "raw"}, openArgs...)
	args = append(args, image, out)
	Img(t, args...)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// MapEntry is one element of `qemu-img map --output=json` (the type imgloop
// map prints).
type MapEntry = report.MapEntry

// Map returns `qemu-img map --output=json` of image.
func Map(t testing.TB, image string, openArgs ...string) []MapEntry {
	t.Helper()
	args := append([]string{"map", "--output=json"}, openArgs...)
	args = append(args, image)
	var m []MapEntry
	if err := json.Unmarshal([]byte(Img(t, args...)), &m); err != nil {
		t.Fatalf("qemu-img map: %v", err)
	}
	return m
}

// Info returns `qemu-img info --output=json` of image, decoded generically.
func Info(t testing.TB, image string, openArgs ...string) map[string]any {
	t.Helper()
	args := append([]string{"info", "--output=json"}, openArgs...)
	args = append(args, image)
	var m map[string]any
	if err := json.Unmarshal([]byte(Img(t, args...)), &m); err != nil {
		t.Fatalf("qemu-img info: %v", err)
	}
	return m
}

// FirstDiff returns the offset of the first byte where a and b differ, or
// -1 if they are equal (a shorter slice differs at its end).
func FirstDiff(a, b []byte) int64 {
	if bytes.Equal(a, b) {
		return -1
	}
	n := min(len(a), len(b))
	for i := 0; i < n; i++ {
		if a[i] != b[i] {
			return int64(i)
		}
	}
	if len(a) != len(b) {
		return int64(n)
	}
	return -1
}

// Compressible returns n bytes of compressible but non-repeating data
// (base64 of a seeded pseudo-random stream): QEMU stores clusters of
// incompressible data uncompressed even with -c.
func Compressible(seed int64, n int) []byte {
	const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
	b := make([]byte, n)
	x := uint64(seed)*0x9E3779B97F4A7C15 + 1
	for i := range b {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		b[i] = alphabet[x&63]
	}
	return b
}
