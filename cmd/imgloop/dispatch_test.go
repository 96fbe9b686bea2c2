package main

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/imgloop/imgloop/disk"
)

// The commands reach format drivers only through package disk's
// interfaces: a new driver plugs into check, convert, info --header and
// map --offset by implementing them. These tests register fake drivers in
// this process and run the commands in it (run), not the built binary.

// fakeImage is a disk.Image over its host file, byte for byte.
type fakeImage struct{ f disk.File }

func (i *fakeImage) ReadAt(p []byte, off int64) (int, error)  { return i.f.ReadAt(p, off) }
func (i *fakeImage) WriteAt(p []byte, off int64) (int, error) { return i.f.WriteAt(p, off) }
func (i *fakeImage) Size() int64                              { n, _ := i.f.Size(); return n }
func (i *fakeImage) SectorSize() int                          { return 512 }
func (i *fakeImage) Flush() error                             { return i.f.Sync() }
func (i *fakeImage) Close() error                             { return i.f.Close() }

// inspectImage is a fakeImage with a header and byte locations.
type inspectImage struct{ fakeImage }

func (i *inspectImage) HeaderFields() []disk.Field {
	return []disk.Field{{Name: "magic", Value: "FAKE"}, {Name: "size", Value: "4096"}}
}

func (i *inspectImage) Locate(off int64) (disk.Location, error) {
	return disk.Location{Offset: off, ClusterType: "normal", HostClusterOffset: off &^ 511,
		OffsetInCluster: off & 511, File: i.f.Name()}, nil
}

// fakeDriver is a format that detects nothing (use -f), with only Open.
type fakeDriver struct{ name string }

func (d fakeDriver) Name() string      { return d.name }
func (fakeDriver) Probe([]byte) int    { return 0 }
func (fakeDriver) FileRole() disk.Role { return disk.RoleFiltered }
func (d fakeDriver) Open(f disk.File, opts disk.OpenOptions) (disk.Image, error) {
	if d.name == "fakeinspect" {
		return &inspectImage{fakeImage{f}}, nil
	}
	return &fakeImage{f}, nil
}

// checkDriver has a check that finds two leaks.
type checkDriver struct{ fakeDriver }

func (checkDriver) Check(f disk.File, opts disk.CheckOptions) (*disk.CheckResult, error) {
	return &disk.CheckResult{Filename: opts.Filename, Format: "fakecheck", Leaks: 2,
		Messages: []string{"Leaked cluster 1 refcount=1 reference=0"}}, nil
}

// streamDriver writes images one cluster at a time: its images are the
// clusters in order, like raw with 512-byte clusters.
type streamDriver struct{ fakeDriver }

func (streamDriver) CheckStream(size int64, opts map[string]string) error {
	if _, ok := opts["bad"]; ok {
		return errors.New("fakestream: option bad is bad")
	}
	return nil
}

func (streamDriver) NewStream(f disk.File, size int64, opts map[string]string) (disk.StreamWriter, error) {
	return &fakeStream{f: f, size: size}, nil
}

type fakeStream struct {
	f    disk.File
	size int64
}

func (s *fakeStream) ClusterSize() int { return 512 }
func (s *fakeStream) WriteCluster(i int64, data []byte) error {
	_, err := s.f.WriteAt(data, i*512)
	return err
}
func (s *fakeStream) WriteCompressed(int64, []byte) error { return errors.New("no compression") }
func (s *fakeStream) WriteZero(int64) error               { return disk.ErrNotSupported }
func (s *fakeStream) Compress(dst, data []byte) ([]byte, bool) {
	return dst, false
}
func (s *fakeStream) Close() error { return s.f.Truncate(s.size) }

var registerFakes = sync.OnceFunc(func() {
	disk.MustRegister(fakeDriver{"nocheck"})
	disk.MustRegister(checkDriver{fakeDriver{"fakecheck"}})
	disk.MustRegister(streamDriver{fakeDriver{"fakestream"}})
	disk.MustRegister(fakeDriver{"fakeinspect"})
})

// runHere runs imgloop in this process with args, in dir.
func runHere(t *testing.T, dir string, args ...string) result {
	t.Helper()
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chdir(dir); err != nil {
		t.Fatal(err)
	}
	defer os.Chdir(wd)
	var stdout, stderr bytes.Buffer
	code := run(args, &stdout, &stderr)
	return result{stdout: stdout.String(), stderr: stderr.String(), code: code}
}

func TestDispatch(t *testing.T) {
	registerFakes()
	dir := t.TempDir()
	data := bytes.Repeat([]byte("imgloop!"), 512) // 4 KiB
	if err := os.WriteFile(filepath.Join(dir, "img"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name       string
		args       []string
		wantCode   int
		wantStdout string // substring
		wantStderr string // substring
	}{
		{"check without a Checker", []string{"check", "-f", "nocheck", "img"}, 63, "", "imgloop: This image format does not support checks\n"},
		{"check with a Checker", []string{"check", "-f", "fakecheck", "img"}, 3, "2 leaked clusters were found on the image.", "Leaked cluster 1 refcount=1 reference=0"},
		{"check JSON", []string{"check", "-f", "fakecheck", "--output=json", "img"}, 3, `"leaks": 2`, ""},
		{"convert to a format without streaming", []string{"convert", "-O", "nocheck", "-f", "raw", "img", "out"}, 1, "", "-O nocheck: output format not supported yet (raw or fakestream or qcow2)"},
		{"convert with bad options", []string{"convert", "-O", "fakestream", "-o", "bad=1", "-f", "raw", "img", "out"}, 1, "", "fakestream: option bad is bad"},
		{"convert by streaming", []string{"convert", "-O", "fakestream", "-f", "raw", "img", "out"}, 0, "", ""},
		{"header", []string{"info", "--header", "-f", "fakeinspect", "img"}, 0, "magic: FAKE\nsize: 4096\n", ""},
		{"header of a format without one", []string{"info", "--header", "-f", "nocheck", "img"}, 1, "", "--header: not a qcow2 image"},
		{"offset", []string{"map", "--offset", "1000", "-f", "fakeinspect", "img"}, 0, "offset: 1000\ncluster_type: normal\ncluster_offset: 512\noffset_in_cluster: 488\n", ""},
		{"offset of a format without locations", []string{"map", "--offset", "1000", "-f", "nocheck", "img"}, 0, "offset: 1000\nstart: 0\nlength: 4096\n", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := runHere(t, dir, tc.args...)
			if r.code != tc.wantCode || !strings.Contains(r.stdout, tc.wantStdout) || !strings.Contains(r.stderr, tc.wantStderr) {
				t.Errorf("imgloop %v: exit %d, stdout %q, stderr %q; want %d, %q, %q",
					tc.args, r.code, r.stdout, r.stderr, tc.wantCode, tc.wantStdout, tc.wantStderr)
			}
		})
	}
	// The streamed image holds the source's clusters.
	if got, err := os.ReadFile(filepath.Join(dir, "out")); err != nil || !bytes.Equal(got, data) {
		t.Errorf("streamed image: %d bytes, %v; want the source's %d", len(got), err, len(data))
	}
}
