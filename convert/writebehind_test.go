package convert

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

func TestWriteBehind(t *testing.T) {
	path := filepath.Join(t.TempDir(), "out")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	w := NewWriteBehind(f)
	data := bytes.Repeat([]byte("imgloop!"), 1024)
	for _, off := range []int64{0, 1 << 20, 4096 + 512} {
		if n, err := w.WriteAt(data, off); n != len(data) || err != nil {
			t.Fatalf("WriteAt(%d) = %d, %v", off, n, err)
		}
	}
	got := make([]byte, len(data))
	if _, err := f.ReadAt(got, 1<<20); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read back %v: data differs", err)
	}
	f.Close()
	if _, err := w.WriteAt(data, 0); err == nil {
		t.Fatal("WriteAt on a closed file succeeded")
	}
}
