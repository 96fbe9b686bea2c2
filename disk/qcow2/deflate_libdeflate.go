//go:build cgo && libdeflate

package qcow2

/*
#cgo LDFLAGS: -ldeflate
#include <libdeflate.h>
*/
import "C"

import (
	"runtime"
	"sync"
	"unsafe"
)

// libdeflateDecompressor owns one libdeflate decompressor, which is not
// safe for concurrent use: a sync.Pool hands each to one goroutine at a
// time, and a cleanup frees it when the pool drops it.
type libdeflateDecompressor struct {
	d *C.struct_libdeflate_decompressor
}

var libdeflatePool = sync.Pool{New: func() any {
	d := C.libdeflate_alloc_decompressor()
	if d == nil {
		return nil
	}
	ld := &libdeflateDecompressor{d: d}
	runtime.AddCleanup(ld, func(d *C.struct_libdeflate_decompressor) {
		C.libdeflate_free_decompressor(d)
	}, d)
	return ld
}}

// inflateDeflate decompresses a raw deflate stream into dst (one cluster)
// with libdeflate. libdeflate decodes whole streams only: a stream that
// goes on past the cluster (which QEMU accepts, stopping at the cluster's
// end) is handed to the Go decoder, which can stop early.
func inflateDeflate(dst, src []byte) error {
	if len(dst) == 0 || len(src) == 0 {
		return inflateDeflateGo(dst, src)
	}
	ld, _ := libdeflatePool.Get().(*libdeflateDecompressor)
	if ld == nil {
		return inflateDeflateGo(dst, src)
	}
	var in, out C.size_t
	r := C.libdeflate_deflate_decompress_ex(ld.d,
		unsafe.Pointer(&src[0]), C.size_t(len(src)),
		unsafe.Pointer(&dst[0]), C.size_t(len(dst)), &in, &out)
	libdeflatePool.Put(ld)
	switch r {
	case C.LIBDEFLATE_SUCCESS:
		if int(out) < len(dst) {
			return errShortCluster
		}
		return nil
	case C.LIBDEFLATE_INSUFFICIENT_SPACE:
		return inflateDeflateGo(dst, src)
	}
	// libdeflate judges the whole stream; QEMU (zlib) stops once the
	// cluster is full and ignores what follows, and tells a stream cut
	// short from garbage. The Go decoder does both: let it decide this
	// rare case.
	return inflateDeflateGo(dst, src)
}
