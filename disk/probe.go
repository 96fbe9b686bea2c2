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
type Sample struct {
	// Name is the file's name as it was opened (File.Name).
	Name string
	// Size is the file's length in bytes.
	Size int64
	// Head holds the first ProbeSize bytes of the file, zero-padded past
	// the end of a shorter file, as QEMU (7.1 and later) probes.
	Head []byte
}

// Probe detects the format of the image held in f and returns its
// driver: the registered driver whose Probe scores the file's first
// ProbeSize bytes highest (ties go to the name that sorts first). An
// empty file is raw, as in QEMU. Probe is the one place that reads a
// file to detect its format: Open, the CLI and the drivers (a backing
// file named without a format) all call it.
//
// Errors: ErrUnknownFormat if no driver claims the file (raw, which
// claims everything, is not registered), and the host file's read error.
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
// Errors: ErrUnknownFormat if no driver scores above 0.
func Detect(header []byte) (Driver, error) {
	return detect(&Sample{Head: padHead(header), Size: int64(len(header))})
}

// readSample reads what detection looks at in f.
func readSample(f File) (*Sample, error) {
	size, err := f.Size()
	if err != nil {
		return nil, fmt.Errorf("disk: size of %s: %w", f.Name(), err)
	}
	s := &Sample{Name: f.Name(), Size: size, Head: make([]byte, ProbeSize)}
	n := int(min(size, ProbeSize))
	if m, err := f.ReadAt(s.Head[:n], 0); m < n {
		if err == nil || errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return nil, fmt.Errorf("disk: reading %s to detect its format: %w", f.Name(), err)
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
		if sc := d.Probe(s.Head); sc > bestScore {
			best, bestScore = d, sc
		}
	}
	if best == nil {
		return nil, fmt.Errorf("%w: no driver recognises the image", ErrUnknownFormat)
	}
	return best, nil
}
