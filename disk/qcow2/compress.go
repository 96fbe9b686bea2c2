package qcow2

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/klauspost/compress/flate"
	"github.com/klauspost/compress/zstd"
)

// Compressed clusters (docs/interop/qcow2.txt, "Compressed Clusters
// Descriptor" and the compression_type header field). Decompression stops
// once it has produced one cluster: the compressed bytes a descriptor
// spans may end with the start of the next compressed cluster.

const (
	compressionZlib = 0 // raw deflate (QEMU's zlib type uses windowBits -12)
	compressionZstd = 1
)

// zstdMaxWindow bounds the window a zstd frame may ask for. QEMU
// compresses one cluster (at most 2 MiB) per frame, so its frames never
// need more; a hostile frame asking for more is refused rather than being
// allowed to allocate hundreds of MiB.
const zstdMaxWindow = 8 << 20

// errShortCluster is returned when a compressed stream ends before it has
// produced a whole cluster.
var errShortCluster = errors.New("compressed data ends before a full cluster")

// inflater decompresses one cluster: it fills dst (exactly one cluster)
// from src, which may hold trailing bytes past the end of the stream.
type inflater func(dst, src []byte) error

// inflaterFor returns the decompressor of a compression_type value.
func inflaterFor(compressionType uint8) (inflater, error) {
	switch compressionType {
	case compressionZlib:
		return inflateDeflate, nil
	case compressionZstd:
		return inflateZstd, nil
	}
	return nil, fmt.Errorf("compression type %d", compressionType)
}

type deflateReader struct {
	src bytes.Reader
	r   io.ReadCloser // a flate decompressor, reset for each use
}

var deflatePool = sync.Pool{New: func() any {
	d := &deflateReader{}
	d.r = flate.NewReader(&d.src)
	return d
}}

// inflateDeflateGo decompresses a raw deflate stream (no zlib header) in
// pure Go. It is the decoder of default builds, and the fallback of
// libdeflate builds for streams that go on past one cluster.
func inflateDeflateGo(dst, src []byte) error {
	d := deflatePool.Get().(*deflateReader)
	defer deflatePool.Put(d)
	d.src.Reset(src)
	if err := d.r.(flate.Resetter).Reset(&d.src, nil); err != nil {
		return err
	}
	_, err := io.ReadFull(d.r, dst)
	d.src.Reset(nil)
	return shortClusterError(err)
}

// zstdDecoder is shared by all images: DecodeAll is safe for concurrent
// use and runs up to GOMAXPROCS decodes in parallel.
var zstdDecoder = sync.OnceValues(func() (*zstd.Decoder, error) {
	return zstd.NewReader(nil,
		zstd.WithDecoderConcurrency(0),
		zstd.WithDecodeAllCapLimit(true),
		zstd.WithDecoderMaxWindow(zstdMaxWindow),
		zstd.WithDecoderMaxMemory(zstdMaxWindow))
})

// errLongCluster is returned for a zstd frame that holds more than one
// cluster of data.
var errLongCluster = errors.New("compressed frame holds more than a cluster")

// inflateZstd decompresses the zstd frame at the start of src, which must
// hold exactly one cluster of data: like QEMU, it refuses a frame that
// goes on after the cluster is full. The frame's end is found by walking
// its block headers, so that the bytes after it (the next compressed
// cluster, or sector padding) are not decoded.
func inflateZstd(dst, src []byte) error {
	dec, err := zstdDecoder()
	if err != nil {
		return err
	}
	n, err := zstdFrameLen(src)
	if err != nil {
		return err
	}
	out, err := dec.DecodeAll(src[:n], dst[:0:len(dst)])
	switch {
	case errors.Is(err, zstd.ErrDecoderSizeExceeded):
		return errLongCluster
	case err != nil:
		return err
	case len(out) < len(dst):
		return errShortCluster
	}
	if &out[0] != &dst[0] {
		copy(dst, out)
	}
	return nil
}

// zstdFrameLen returns the length of the zstd frame at the start of src
// (RFC 8878 section 3.1.1: frame header, blocks, optional checksum).
func zstdFrameLen(src []byte) (int, error) {
	var h zstd.Header
	if err := h.Decode(src); err != nil {
		return 0, shortClusterError(err)
	}
	if h.Skippable {
		return 0, errors.New("skippable zstd frame")
	}
	pos := h.HeaderSize
	for {
		if len(src)-pos < 3 {
			return 0, errShortCluster
		}
		bh := uint32(src[pos]) | uint32(src[pos+1])<<8 | uint32(src[pos+2])<<16
		pos += 3
		size := int(bh >> 3)
		switch (bh >> 1) & 3 {
		case 1: // RLE: one byte repeated
			size = 1
		case 3:
			return 0, errors.New("reserved zstd block type")
		}
		if len(src)-pos < size {
			return 0, errShortCluster
		}
		pos += size
		if bh&1 != 0 { // last block
			break
		}
	}
	if h.HasCheckSum {
		if len(src)-pos < 4 {
			return 0, errShortCluster
		}
		pos += 4
	}
	return pos, nil
}

func shortClusterError(err error) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return errShortCluster
	}
	return err
}
