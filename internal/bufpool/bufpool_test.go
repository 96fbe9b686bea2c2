package bufpool

import "testing"

func TestGetPut(t *testing.T) {
	tests := []struct {
		n       int
		wantCap int
	}{
		{0, 4096}, {1, 4096}, {4096, 4096}, {4097, 8192}, {1 << 20, 1 << 20},
		{1<<20 + 1, 2 << 20}, {32 << 20, 32 << 20}, {32<<20 + 1, 32<<20 + 1},
	}
	for _, tt := range tests {
		b := Get(tt.n)
		if len(b) != tt.n || cap(b) != tt.wantCap {
			t.Errorf("Get(%d): len %d cap %d, want len %d cap %d", tt.n, len(b), cap(b), tt.n, tt.wantCap)
		}
		Put(b)
	}
	Put(make([]byte, 100)) // foreign buffers are dropped
	if b := Get(100); cap(b) != 4096 {
		t.Errorf("Get after a foreign Put: cap %d", cap(b))
	}
}

func BenchmarkGetPut(b *testing.B) {
	for b.Loop() {
		Put(Get(64 << 10))
	}
}
