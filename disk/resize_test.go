package disk_test

import (
	"errors"
	"testing"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/disk/disktest"
)

// resizable is a model image that can change size.
type resizable struct {
	*disktest.Model
	size int64
}

func (r *resizable) Resize(size int64) error { r.size = size; return nil }

func TestResizeHelper(t *testing.T) {
	tests := []struct {
		name    string
		img     disk.Image
		wantErr error
	}{
		{"not a Resizer", bareImage{size: 4096}, disk.ErrNotSupported}, // disktest.Model resizes
		{"Resizer", &resizable{Model: disktest.NewModel(4096)}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := disk.Resize(tt.img, 8192)
			if !errors.Is(err, tt.wantErr) || (tt.wantErr == nil && err != nil) {
				t.Fatalf("Resize = %v, want %v", err, tt.wantErr)
			}
			if r, ok := tt.img.(*resizable); ok && r.size != 8192 {
				t.Errorf("Resize did not reach the image: size %d", r.size)
			}
		})
	}
}
