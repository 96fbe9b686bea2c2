package report

import "testing"

func TestSize(t *testing.T) {
	tests := []struct {
		n    uint64
		want string
	}{
		{0, "0 B"},
		{1, "1 B"},
		{999, "999 B"},
		{1000, "0.977 KiB"},
		{1024, "1 KiB"},
		{4096, "4 KiB"},
		{339968, "332 KiB"},
		{1536 * 1024, "1.5 MiB"},
		{1 << 30, "1 GiB"},
		{1<<30 + 1, "1 GiB"},
		{1 << 40, "1 TiB"},
		{1 << 62, "4 EiB"},
		{1<<64 - 1, "16 EiB"},
	}
	for _, tt := range tests {
		if got := Size(tt.n); got != tt.want {
			t.Errorf("Size(%d) = %q, want %q", tt.n, got, tt.want)
		}
	}
}
