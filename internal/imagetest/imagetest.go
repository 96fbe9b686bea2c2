// Package imagetest builds disk images for tests, byte by byte, where
// qemu-img cannot make them: formats it only reads (Bochs, cloop, DMG),
// and LUKS headers, which qemu-img makes only after benchmarking PBKDF2
// against the CPU clock (crypto/pbkdf.c qcrypto_pbkdf2_count_iters), a
// step that fails under load with "Unable to get accurate CPU usage".
//
// Each builder follows the QEMU driver that reads the format (block/*.c,
// crypto/block-luks.c), and its test has qemu-img open the result, so
// that what imgloop's tests refuse is what QEMU accepts as that format.
package imagetest

import (
	"bytes"
	"compress/zlib"
	"encoding/base64"
	"encoding/binary"
	"fmt"
	"os"
)

var (
	be = binary.BigEndian
	le = binary.LittleEndian
)

// Bochs returns a Bochs "Redolog"/"Growing" image (block/bochs.c,
// header version 2) of a virtual disk of size bytes (a multiple of its
// 64 KiB extents), with no extent allocated: it reads as zeros.
func Bochs(size int64) []byte {
	const headerSize, extent = 512, 64 << 10
	if size <= 0 || size%extent != 0 {
		panic(fmt.Sprintf("imagetest: Bochs size %d is not a positive multiple of %d", size, extent))
	}
	catalog := int(size / extent)
	b := make([]byte, headerSize+4*catalog)
	copy(b[0:32], "Bochs Virtual HD Image") // magic[32], NUL-padded
	copy(b[32:48], "Redolog")               // type[16]
	copy(b[48:64], "Growing")               // subtype[16]
	le.PutUint32(b[64:], 0x00020000)        // version (HEADER_VERSION)
	le.PutUint32(b[68:], headerSize)        // header: size of the header
	le.PutUint32(b[72:], uint32(catalog))   // catalog: number of entries
	le.PutUint32(b[76:], 512)               // bitmap: bitmap size
	le.PutUint32(b[80:], extent)            // extent: extent size
	le.PutUint64(b[88:], uint64(size))      // disk: disk size (after reserved)
	for i := range catalog {
		le.PutUint32(b[headerSize+4*i:], 0xffffffff) // not allocated
	}
	return b
}

// CloopMagic is the preamble of a cloop V2.0 image (block/cloop.c).
const CloopMagic = "#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"

// Cloop returns a cloop V2.0 image (block/cloop.c) of data, cut into
// zlib-compressed blocks of blockSize bytes (a multiple of 512 that
// divides len(data)).
func Cloop(data []byte, blockSize int) []byte {
	if blockSize <= 0 || blockSize%512 != 0 || len(data)%blockSize != 0 {
		panic(fmt.Sprintf("imagetest: cloop block size %d does not fit %d bytes", blockSize, len(data)))
	}
	n := len(data) / blockSize
	var b bytes.Buffer
	b.WriteString(CloopMagic)
	b.Write(make([]byte, 128-b.Len()))
	b.Write(be.AppendUint32(nil, uint32(blockSize)))
	b.Write(be.AppendUint32(nil, uint32(n)))
	// n+1 offsets (big-endian) of the compressed blocks, the last one
	// where the last block ends.
	var blocks bytes.Buffer
	off := uint64(136 + 8*(n+1))
	offsets := []uint64{off}
	for i := range n {
		start := blocks.Len()
		w := zlib.NewWriter(&blocks)
		w.Write(data[i*blockSize : (i+1)*blockSize])
		w.Close()
		off += uint64(blocks.Len() - start)
		offsets = append(offsets, off)
	}
	for _, o := range offsets {
		b.Write(be.AppendUint64(nil, o))
	}
	b.Write(blocks.Bytes())
	return b.Bytes()
}

// DMG returns an Apple UDIF disk image (block/dmg.c) holding data (a
// multiple of 512 bytes) as one uncompressed (UDRW) chunk: the data
// fork, an XML property list with one base64 "mish" block, and the
// 512-byte "koly" trailer that ends the file. QEMU detects DMG by file
// name only: save it under a name ending in ".dmg".
func DMG(data []byte) []byte {
	if len(data) == 0 || len(data)%512 != 0 {
		panic(fmt.Sprintf("imagetest: DMG data of %d bytes is not a positive multiple of 512", len(data)))
	}
	sectors := uint64(len(data) / 512)
	// The mish block: 204 bytes of header, then 40-byte chunk entries.
	mish := make([]byte, 204+2*40)
	be.PutUint32(mish[0:], 0x6d697368) // "mish"
	be.PutUint32(mish[4:], 1)          // version
	be.PutUint64(mish[8:], 0)          // first sector: chunk sectors are relative to it
	be.PutUint64(mish[16:], sectors)   // sector count
	be.PutUint64(mish[0x18:], 0)       // data offset in the data fork
	be.PutUint32(mish[200:], 2)        // number of chunk entries
	chunk := mish[204:]
	be.PutUint32(chunk[0:], 1)                    // type UDRW: raw data
	be.PutUint64(chunk[8:], 0)                    // first sector
	be.PutUint64(chunk[0x10:], sectors)           // sector count
	be.PutUint64(chunk[0x18:], 0)                 // offset in the data fork
	be.PutUint64(chunk[0x20:], uint64(len(data))) // length in the data fork
	be.PutUint32(chunk[40:], 0xffffffff)          // UDLE: last entry
	plist := "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<plist version=\"1.0\">\n<dict>\n" +
		"<key>resource-fork</key>\n<dict>\n<key>blkx</key>\n<array>\n<dict>\n<key>Data</key>\n<data>" +
		base64.StdEncoding.EncodeToString(mish) +
		"</data>\n</dict>\n</array>\n</dict>\n</dict>\n</plist>\n"
	b := append(append([]byte{}, data...), plist...)
	koly := make([]byte, 512)
	copy(koly, "koly")
	be.PutUint32(koly[4:], 4)                     // version
	be.PutUint32(koly[8:], 512)                   // header size
	be.PutUint64(koly[0x18:], 0)                  // DataForkOffset
	be.PutUint64(koly[0x20:], uint64(len(data)))  // DataForkLength
	be.PutUint64(koly[0xd8:], uint64(len(data)))  // XMLOffset
	be.PutUint64(koly[0xe0:], uint64(len(plist))) // XMLLength
	be.PutUint32(koly[0x1e8:], 1)                 // image variant
	be.PutUint64(koly[0x1ec:], sectors)           // SectorCount
	return append(b, koly...)
}

// LUKSPayloadOffset is where the payload of a LUKS header made by LUKS
// starts, in bytes: 4040 sectors, as qemu-img lays out a LUKS1 header
// with AES-256-XTS (8 key slots of 4000 stripes of a 64-byte key, each
// aligned to 4 KiB, after the 4 KiB of the header proper).
const LUKSPayloadOffset = 4040 * 512

// LUKS returns a LUKS1 header (crypto/block-luks.c) followed by payload
// zero bytes, laid out as qemu-img create -f luks lays it out
// (aes / xts-plain64 / sha256, 64-byte key), with fixed salt, digest and
// UUID and every key slot disabled: it opens for inspection (qemu-img
// info, which does no I/O), never for reading data. Nothing in it
// depends on the machine's speed.
func LUKS(payload int64) []byte {
	b := make([]byte, LUKSPayloadOffset+payload)
	copy(b, "LUKS\xba\xbe")
	be.PutUint16(b[6:], 1)        // version
	copy(b[8:40], "aes")          // cipher_name[32]
	copy(b[40:72], "xts-plain64") // cipher_mode[32]
	copy(b[72:104], "sha256")     // hash_spec[32]
	be.PutUint32(b[104:], 4040)   // payload_offset, in sectors
	be.PutUint32(b[108:], 64)     // key_bytes
	for i := range 20 + 32 {      // mk_digest[20], mk_digest_salt[32]
		b[112+i] = byte(i + 1)
	}
	be.PutUint32(b[164:], 1000)                              // mk_digest_iter
	copy(b[168:208], "5d3c4e1a-0b6f-4c2e-9a7d-1e2f3a4b5c6d") // uuid[40]
	for i := range 8 {
		s := b[208+48*i:]
		be.PutUint32(s[0:], 0x0000dead)       // active: disabled
		be.PutUint32(s[4:], 0)                // iterations
		be.PutUint32(s[40:], uint32(8+504*i)) // key_offset, in sectors
		be.PutUint32(s[44:], 4000)            // stripes
	}
	return b
}

// EncryptQcow2 turns the qcow2 image at path, fresh from qemu-img create
// (version 3, 64 KiB clusters, no backing file, nothing written), into
// the image qemu-img create -o encrypt.format=luks makes: crypt_method 2
// (LUKS), a full disk encryption header pointer extension first among
// the header extensions, and the LUKS header (LUKS(0)) in clusters
// appended to the file, which the refcount table's first block counts.
func EncryptQcow2(path string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	const cluster = 64 << 10
	if len(b) < 112 || string(b[:4]) != "QFI\xfb" || be.Uint32(b[4:]) != 3 || be.Uint32(b[20:]) != 16 ||
		be.Uint64(b[8:]) != 0 || be.Uint32(b[32:]) != 0 {
		return fmt.Errorf("imagetest: %s is not a fresh unencrypted qcow2 v3 image with 64 KiB clusters", path)
	}
	hdrLen := int(be.Uint32(b[100:]))
	// The extensions: insert the pointer (type 0x0537be77: offset and
	// length of the LUKS header, 16 bytes) before the others.
	end := hdrLen
	for {
		if end+8 > cluster {
			return fmt.Errorf("imagetest: %s: header extensions run past the first cluster", path)
		}
		typ, n := be.Uint32(b[end:]), int(be.Uint32(b[end+4:]))
		end += 8 + (n+7)&^7
		if typ == 0 {
			break
		}
	}
	header := LUKS(0)
	at := (int64(len(b)) + cluster - 1) &^ (cluster - 1)
	ext := be.AppendUint32(nil, 0x0537be77)
	ext = be.AppendUint32(ext, 16)
	ext = be.AppendUint64(ext, uint64(at))
	ext = be.AppendUint64(ext, uint64(len(header)))
	if end+len(ext) > cluster {
		return fmt.Errorf("imagetest: %s: no room for the encryption header pointer", path)
	}
	exts := append(ext, b[hdrLen:end]...)
	copy(b[hdrLen:], exts)
	be.PutUint32(b[32:], 2) // crypt_method: LUKS
	// Count the new clusters in the first refcount block (16-bit
	// refcounts: covers the first 2 GiB).
	if be.Uint32(b[96:]) != 4 {
		return fmt.Errorf("imagetest: %s: refcount_order is not 4", path)
	}
	rb := int(be.Uint64(b[be.Uint64(b[48:]):]))
	for c := at; c < at+int64(len(header)); c += cluster {
		be.PutUint16(b[rb+2*int(c/cluster):], 1)
	}
	b = append(b, make([]byte, at-int64(len(b)))...)
	b = append(b, header...)
	if pad := (cluster - len(b)%cluster) % cluster; pad > 0 {
		b = append(b, make([]byte, pad)...)
	}
	return os.WriteFile(path, b, 0o644)
}
