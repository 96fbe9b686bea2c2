package qcow2

import "github.com/imgloop/imgloop/disk"

// The disk package's interfaces for streaming creation and inspection,
// implemented by the package's StreamWriter, Header and Locate.

var (
	_ disk.StreamCreator = Driver{}
	_ disk.StreamWriter  = (*StreamWriter)(nil)
	_ disk.HeaderFielder = (*Image)(nil)
	_ disk.Locator       = (*Image)(nil)
)

// CheckStream implements disk.StreamCreator with CheckStreamOptions.
func (Driver) CheckStream(size int64, opts map[string]string) error {
	return CheckStreamOptions(size, opts)
}

// NewStream implements disk.StreamCreator with NewStreamWriter.
func (Driver) NewStream(f disk.File, size int64, opts map[string]string) (disk.StreamWriter, error) {
	w, err := NewStreamWriter(f, size, opts)
	if err != nil {
		return nil, err
	}
	return w, nil
}

// HeaderFields returns the fields of the image's header (Header.Fields),
// for `imgloop info --header`.
func (img *Image) HeaderFields() []disk.Field {
	fs := img.Header().Fields()
	out := make([]disk.Field, len(fs))
	for i, f := range fs {
		out[i] = disk.Field{Name: f.Name, Value: f.Value}
	}
	return out
}
