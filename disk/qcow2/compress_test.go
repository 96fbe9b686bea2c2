package qcow2

import (
	"bytes"
	"errors"
	"sync"
	"testing"

	"github.com/klauspost/compress/flate"
	"github.com/klauspost/compress/zstd"

	"github.com/imgloop/imgloop/internal/qemutest"
)

func deflateRaw(t testing.TB, data []byte) []byte {
	var b bytes.Buffer
	w, err := flate.NewWriter(&b, flate.DefaultCompression)
	if err != nil {
		t.Fatal(err)
	}
	w.Write(data)
	w.Close()
	return b.Bytes()
}

func zstdFrame(t testing.TB, data []byte) []byte {
	enc, err := zstd.NewWriter(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer enc.Close()
	return enc.EncodeAll(data, nil)
}

// zstdStream compresses data with the streaming encoder, whose frames do
// not record the content size.
func zstdStream(t testing.TB, data []byte) []byte {
	var b bytes.Buffer
	enc, err := zstd.NewWriter(&b)
	if err != nil {
		t.Fatal(err)
	}
	enc.Write(data[:1])
	enc.Flush() // the header goes out before the size is known
	enc.Write(data[1:])
	enc.Close()
	var h zstd.Header
	if err := h.Decode(b.Bytes()); err != nil || h.HasFCS {
		t.Fatalf("streamed frame: %v, has content size %v", err, h.HasFCS)
	}
	return b.Bytes()
}

func TestInflate(t *testing.T) {
	const cs = 64 << 10
	cluster := qemutest.Compressible(1, cs)
	other := qemutest.Compressible(2, cs)
	tests := []struct {
		name    string
		typ     uint8
		src     []byte
		wantErr bool
	}{
		{"deflate", compressionZlib, deflateRaw(t, cluster), false},
		{"deflate with trailing bytes", compressionZlib, append(deflateRaw(t, cluster), deflateRaw(t, other)...), false},
		{"deflate longer than a cluster", compressionZlib, deflateRaw(t, append(cluster, other...)), false},
		{"deflate short", compressionZlib, deflateRaw(t, cluster[:cs-1]), true},
		{"deflate truncated", compressionZlib, deflateRaw(t, cluster)[:1000], true},
		{"deflate garbage", compressionZlib, bytes.Repeat([]byte{0xff}, 4096), true},
		{"deflate empty", compressionZlib, nil, true},
		{"zstd", compressionZstd, zstdFrame(t, cluster), false},
		{"zstd with trailing bytes", compressionZstd, append(zstdFrame(t, cluster), 0xde, 0xad, 0xbe, 0xef, 1, 2, 3), false},
		{"zstd followed by a frame", compressionZstd, append(zstdFrame(t, cluster), zstdFrame(t, other)...), false},
		{"zstd stream", compressionZstd, zstdStream(t, cluster), false},
		{"zstd stream then a frame", compressionZstd, append(zstdStream(t, cluster), zstdStream(t, other)...), false},
		{"zstd stream long", compressionZstd, zstdStream(t, append(cluster, other...)), true},
		{"zstd stream short", compressionZstd, zstdStream(t, cluster[:cs-1]), true},
		{"zstd stream truncated", compressionZstd, zstdStream(t, cluster)[:2000], true},
		{"zstd long", compressionZstd, zstdFrame(t, append(cluster, other...)), true},
		{"zstd short", compressionZstd, zstdFrame(t, cluster[:cs-100]), true},
		{"zstd truncated", compressionZstd, zstdFrame(t, cluster)[:1000], true},
		{"zstd garbage", compressionZstd, bytes.Repeat([]byte{0x5a}, 4096), true},
		{"zstd empty", compressionZstd, nil, true},
	}
	for _, tc := range tests {
		inflate, err := inflaterFor(tc.typ)
		if err != nil {
			t.Fatal(err)
		}
		dst := make([]byte, cs)
		err = inflate(dst, tc.src)
		if (err != nil) != tc.wantErr {
			t.Errorf("%s: err = %v, want error %v", tc.name, err, tc.wantErr)
			continue
		}
		if err == nil && !bytes.Equal(dst, cluster) {
			t.Errorf("%s: wrong data", tc.name)
		}
	}
	if _, err := inflaterFor(2); err == nil {
		t.Error("inflaterFor(2) succeeded")
	}
}

func TestInflateShortError(t *testing.T) {
	for _, typ := range []uint8{compressionZlib, compressionZstd} {
		inflate, _ := inflaterFor(typ)
		var src []byte
		if typ == compressionZlib {
			src = deflateRaw(t, []byte("short"))
		} else {
			src = zstdFrame(t, []byte("short"))
		}
		if err := inflate(make([]byte, 4096), src); !errors.Is(err, errShortCluster) {
			t.Errorf("type %d: err = %v, want errShortCluster", typ, err)
		}
	}
}

// TestInflateParallel inflates from several goroutines (run with -race):
// the pooled decompressors must not be shared.
func TestInflateParallel(t *testing.T) {
	const cs = 16 << 10
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			data := qemutest.Compressible(int64(g), cs)
			srcs := [][]byte{deflateRaw(t, data), zstdFrame(t, data)}
			dst := make([]byte, cs)
			for i := range 200 {
				inflate, _ := inflaterFor(uint8(i % 2))
				clear(dst)
				if err := inflate(dst, srcs[i%2]); err != nil || !bytes.Equal(dst, data) {
					t.Errorf("goroutine %d round %d: %v", g, i, err)
					return
				}
			}
		}()
	}
	wg.Wait()
}

func BenchmarkInflate(b *testing.B) {
	const cs = 64 << 10
	data := qemutest.Compressible(1, cs)
	for _, tc := range []struct {
		name string
		typ  uint8
		src  []byte
	}{{"deflate", compressionZlib, deflateRaw(b, data)}, {"zstd", compressionZstd, zstdFrame(b, data)}} {
		b.Run(tc.name, func(b *testing.B) {
			inflate, _ := inflaterFor(tc.typ)
			dst := make([]byte, cs)
			b.SetBytes(cs)
			b.ReportAllocs()
			for b.Loop() {
				if err := inflate(dst, tc.src); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
