package report

import (
	"slices"
	"testing"
)

// TestQDictOrder checks the order against qemu-img 7.2's own output.
func TestQDictOrder(t *testing.T) {
	tests := []struct {
		keys []string // in QAPI (insertion) order
		want []string // as qemu-img prints them
	}{
		{
			[]string{"compat", "data-file", "data-file-raw", "extended-l2", "lazy-refcounts", "corrupt", "refcount-bits", "compression-type"},
			[]string{"compat", "compression-type", "lazy-refcounts", "refcount-bits", "data-file", "data-file-raw", "corrupt", "extended-l2"},
		},
		{
			[]string{"filename", "format", "dirty-flag", "actual-size", "virtual-size", "cluster-size", "backing-filename", "full-backing-filename", "backing-filename-format", "snapshots", "format-specific"},
			[]string{"backing-filename-format", "snapshots", "virtual-size", "filename", "cluster-size", "format", "actual-size", "format-specific", "full-backing-filename", "backing-filename", "dirty-flag"},
		},
		{
			[]string{"id", "name", "vm-state-size", "date-sec", "date-nsec", "vm-clock-sec", "vm-clock-nsec", "icount"},
			[]string{"icount", "vm-clock-nsec", "name", "date-sec", "date-nsec", "vm-clock-sec", "id", "vm-state-size"},
		},
	}
	for _, tt := range tests {
		var got []string
		for _, i := range qdictOrder(tt.keys) {
			got = append(got, tt.keys[i])
		}
		if !slices.Equal(got, tt.want) {
			t.Errorf("order %v\nwant %v", got, tt.want)
		}
	}
}
