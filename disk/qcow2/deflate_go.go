//go:build !(cgo && libdeflate)

package qcow2

// inflateDeflate decompresses a raw deflate stream. Builds with the
// "libdeflate" tag (and cgo) use libdeflate instead, about 1.7 times as
// fast as this decoder or zlib.
func inflateDeflate(dst, src []byte) error { return inflateDeflateGo(dst, src) }
