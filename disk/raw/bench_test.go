package raw

import (
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/imgloop/imgloop/disk"
)

// BenchmarkReadAt measures raw's overhead over the host file: the "os"
// cases read the file directly, the "raw" cases through the driver.
func BenchmarkReadAt(b *testing.B) {
	const size = 64 << 20
	path := filepath.Join(b.TempDir(), "bench.raw")
	makeDense(b, path, size)
	img := openPath(b, path, disk.OpenOptions{})
	defer img.Close()
	osf, err := os.Open(path)
	if err != nil {
		b.Fatal(err)
	}
	defer osf.Close()
	for _, bs := range []int{4 << 10, 1 << 20} {
		for name, r := range map[string]interface {
			ReadAt([]byte, int64) (int, error)
		}{"os": osf, "raw": img} {
			b.Run(name+"/"+sizeName(bs), func(b *testing.B) {
				buf := make([]byte, bs)
				rng := rand.New(rand.NewPCG(1, 2))
				b.SetBytes(int64(bs))
				for b.Loop() {
					off := rng.Int64N(size/int64(bs)) * int64(bs)
					if _, err := r.ReadAt(buf, off); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}

func sizeName(n int) string {
	if n >= 1<<20 {
		return "1MiB"
	}
	return "4KiB"
}
