package disk

import (
	"errors"
	"fmt"
	"io"
)

// ProbeSize is how many leading bytes of an image detection looks at
// (QEMU's BLOCK_PROBE_BUF_SIZE).
const ProbeSize = 512

// Sample is what Probe reads of a file to detect its format.
//
// # Security
//
// A probed raw image's guest writes the file's bytes, so detection must
// not let a guest turn its disk into another format (a qcow2 header it
// planted could name a host file as "backing"). For the first sector,
// raw's write guard refuses such writes, as QEMU's raw driver does. No
// guard covers the rest of the file: the guest owns its last sector as
// much as any other. That is why no probe scores on Tail: QEMU's VHD
// probe looks only at the start of the file, and a fixed VHD, whose one
// footer is its last sector, is detected as raw by QEMU and by imgloop
// alike (open it with Format "vpc" once there is a driver). Tail is
// there for what a guest cannot forge: a driver may use it to confirm a
// match its head or its file name (which the host chooses) already
// made, never to make one.
type Sample struct {
	// Name is the file's name as it was opened (File.Name); QEMU's dmg
	// probe looks at its suffix. "" when probing bytes (Detect).
	Name string
	// Size is the file's length in bytes.
	Size int64
	// Head holds the first ProbeSize bytes of the file, zero-padded past
	// the end of a shorter file, as QEMU (7.1 and later) probes.
	Head []byte
	// Tail holds the last ProbeSize bytes of the file (all of it if it
	// is shorter), where footers and trailers live (a fixed VHD's
	// footer, a DMG's UDIF trailer); see the Security section for what
	// a probe may do with them. nil when probing bytes (Detect).
	Tail []byte
}

// SampleProber is implemented by drivers whose detection needs more than
// the first bytes: Probe calls ProbeSample, with the file's name, size
// and tail, instead of Driver.Probe. The score is Driver.Probe's, and
// the Security section of Sample says what it may rest on.
type SampleProber interface {
	ProbeSample(s *Sample) int
}

// Probe detects the format of the image held in f and returns its
// driver: the registered driver whose Probe (or ProbeSample) scores the
// file highest, ties going to the name that sorts first. Besides the
// drivers, Probe knows every format QEMU detects (VMDK, VHD, VHDX, VDI,
// QED, Parallels, Bochs, cloop, DMG, LUKS, qcow version 1) by QEMU's own
// tests and scores, so that an image of a format without a driver is
// refused by name rather than read as raw. An empty file is raw, as in
// QEMU. Probe is the one place that reads a file to detect its format:
// Open, the CLI and the drivers (a backing file named without a format)
// all call it.
//
// Errors: *UnsupportedFormatError (ErrNotSupported) naming the format
// when a format without a driver scores highest; ErrUnknownFormat if
// nothing claims the file (raw, which claims everything, is not
// registered); and the host file's error.
func Probe(f File) (Driver, error) {
	s, err := readSample(f)
	if err != nil {
		return nil, err
	}
	return detect(s)
}

// Detect returns the driver whose Probe scores header highest, as Probe
// does for a file whose first bytes are header (zero-padded to
// ProbeSize). It sees no file name: raw's probed-image write guard calls
// it on the first sector a write would leave, as QEMU's raw driver
// calls bdrv_probe_all without a file name.
//
// Errors: *UnsupportedFormatError as for Probe, and ErrUnknownFormat if
// nothing scores above 0.
func Detect(header []byte) (Driver, error) {
	return detect(&Sample{Head: padHead(header), Size: int64(len(header))})
}

// readSample reads what detection looks at in f.
func readSample(f File) (*Sample, error) {
	size, err := f.Size()
	if err != nil {
		return nil, fmt.Errorf("disk: size of %s: %w", f.Name(), err)
	}
	n := min(size, ProbeSize)
	s := &Sample{Name: f.Name(), Size: size, Head: make([]byte, ProbeSize), Tail: make([]byte, n)}
	for _, r := range []struct {
		p   []byte
		off int64
	}{{s.Head[:n], 0}, {s.Tail, size - n}} {
		if m, err := f.ReadAt(r.p, r.off); m < len(r.p) {
			if err == nil || errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return nil, fmt.Errorf("disk: reading %s to detect its format: %w", f.Name(), err)
		}
	}
	return s, nil
}

// padHead returns the first ProbeSize bytes of b, zero-padded.
func padHead(b []byte) []byte {
	head := make([]byte, ProbeSize)
	copy(head, b)
	return head
}

// detect picks the format of s.
func detect(s *Sample) (Driver, error) {
	registry.RLock()
	defer registry.RUnlock()
	if s.Size == 0 {
		// QEMU's find_image_format: an empty file is raw, whatever its
		// name.
		if d, ok := registry.drivers["raw"]; ok {
			return d, nil
		}
	}
	var best Driver
	bestScore := 0
	for _, name := range sortedNames() {
		d := registry.drivers[name]
		var sc int
		if sp, ok := d.(SampleProber); ok {
			sc = sp.ProbeSample(s)
		} else {
			sc = d.Probe(s.Head)
		}
		if sc > bestScore {
			best, bestScore = d, sc
		}
	}
	// A format without a driver must score higher than every driver to
	// win; one that has a driver is that driver's to claim.
	var known *knownFormat
	for i := range knownFormats {
		k := &knownFormats[i]
		if _, ok := registry.drivers[k.name]; ok {
			continue
		}
		if sc := k.probe(s); sc > bestScore {
			known, bestScore = k, sc
		}
	}
	switch {
	case known != nil:
		return nil, &UnsupportedFormatError{Path: s.Name, Format: known.name, Title: known.title}
	case best == nil:
		return nil, fmt.Errorf("%w: no driver recognises the image", ErrUnknownFormat)
	}
	return best, nil
}
