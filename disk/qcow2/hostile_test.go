package qcow2_test

// Hostile images: good images built with qemu-img/qemu-io, then patched at
// named offsets (docs/interop/qcow2.txt, big-endian fields) so that they
// are malformed, unsupported or malicious. Each must be refused with the
// right error class, quickly, without a panic or a huge allocation, and a
// corrupt mapping must never read as zeros.

import (
	"bytes"
	"compress/flate"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"

	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/disk/hostfile/hostfiletest"
	"github.com/imgloop/imgloop/internal/imagetest"
	"github.com/imgloop/imgloop/internal/qemutest"
)

// Header field offsets (docs/interop/qcow2.txt, "Header").
const (
	hMagic                 = 0
	hVersion               = 4
	hBackingFileOffset     = 8
	hBackingFileSize       = 16
	hClusterBits           = 20
	hSize                  = 24
	hCryptMethod           = 32
	hL1Size                = 36
	hL1TableOffset         = 40
	hRefcountTableOffset   = 48
	hRefcountTableClusters = 56
	hNbSnapshots           = 60
	hSnapshotsOffset       = 64
	hIncompatibleFeatures  = 72
	hCompatibleFeatures    = 80
	hAutoclearFeatures     = 88
	hRefcountOrder         = 96
	hHeaderLength          = 100
	hCompressionType       = 104
)

// hostileTimeout bounds each open and read of a hostile image.
const hostileTimeout = 10 * time.Second

// rawHeader holds the header fields the corrupters need.
type rawHeader struct {
	clusterBits uint32
	l1Offset    int64
	l1Size      uint32
	extendedL2  bool
	fileSize    int64
}

func readRawHeader(t testing.TB, path string) rawHeader {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	be := binary.BigEndian
	h := rawHeader{
		clusterBits: be.Uint32(b[hClusterBits:]),
		l1Offset:    int64(be.Uint64(b[hL1TableOffset:])),
		l1Size:      be.Uint32(b[hL1Size:]),
		fileSize:    int64(len(b)),
	}
	if be.Uint32(b[hVersion:]) >= 3 {
		h.extendedL2 = be.Uint64(b[hIncompatibleFeatures:])&(1<<4) != 0
	}
	return h
}

func readU64(t testing.TB, path string, off int64) uint64 {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var b [8]byte
	if _, err := f.ReadAt(b[:], off); err != nil {
		t.Fatal(err)
	}
	return binary.BigEndian.Uint64(b[:])
}

// l1EntryAt returns the file offset of the L1 entry covering guest offset
// guest, and the entry.
func l1EntryAt(t testing.TB, path string, guest int64) (int64, uint64) {
	t.Helper()
	h := readRawHeader(t, path)
	entryBytes := int64(8)
	if h.extendedL2 {
		entryBytes = 16
	}
	l2Entries := (int64(1) << h.clusterBits) / entryBytes
	idx := (guest >> h.clusterBits) / l2Entries
	at := h.l1Offset + 8*idx
	return at, readU64(t, path, at)
}

// l2EntryAt returns the file offset of the L2 entry for guest offset guest
// (the first word of an extended entry), and that word; the L2 table must
// be allocated.
func l2EntryAt(t testing.TB, path string, guest int64) (int64, uint64) {
	t.Helper()
	h := readRawHeader(t, path)
	entryBytes := int64(8)
	if h.extendedL2 {
		entryBytes = 16
	}
	l2Entries := (int64(1) << h.clusterBits) / entryBytes
	_, l1 := l1EntryAt(t, path, guest)
	l2Off := int64(l1 & 0x00ff_ffff_ffff_fe00)
	if l2Off == 0 {
		t.Fatalf("%s: no L2 table for guest offset %d", path, guest)
	}
	at := l2Off + entryBytes*((guest>>h.clusterBits)%l2Entries)
	return at, readU64(t, path, at)
}

// compressedAt returns the L2 entry offset, host offset and byte span
// (sectors the descriptor covers, from the host offset on) of the
// compressed cluster at guest offset guest.
func compressedAt(t testing.TB, path string, guest int64) (entryAt, host, span int64) {
	t.Helper()
	h := readRawHeader(t, path)
	at, e := l2EntryAt(t, path, guest)
	if e&(1<<62) == 0 {
		t.Fatalf("%s: cluster at guest %d is not compressed (L2 entry %#x)", path, guest, e)
	}
	x := 62 - (h.clusterBits - 8)
	host = int64(e & (1<<x - 1))
	sectors := int64((e>>x)&(1<<(h.clusterBits-8)-1)) + 1
	span = sectors*512 - host%512
	return at, host, span
}

// fileSize returns the size of the file at path.
func fileSize(t testing.TB, path string) int64 {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Size()
}

// roundUp rounds n up to a multiple of m (a power of two).
func roundUp(n, m int64) int64 { return (n + m - 1) &^ (m - 1) }

// Base images for the corrupters.

// plainImage: v3, 64 KiB clusters, 1 MiB, data at [0,64k) and [192k,256k).
func plainImage(t *testing.T, dir string) string {
	p := mkqcow2(t, filepath.Join(dir, "plain.qcow2"), "", "1M")
	qio(t, p, "write -P 0x11 0 64k", "write -P 0x22 192k 64k")
	return p
}

// compressedImage: 4 KiB clusters, the first 64 KiB compressed with the
// given compression type ("zlib" or "zstd").
func compressedImage(ctype string) func(t *testing.T, dir string) string {
	return func(t *testing.T, dir string) string {
		p := mkqcow2(t, filepath.Join(dir, "c.qcow2"), "cluster_size=4k,compression_type="+ctype, "1M")
		src := filepath.Join(dir, "pat")
		writeFile(t, src, qemutest.Compressible(11, 64<<10))
		qio(t, p, "write -c -s "+src+" 0 64k")
		return p
	}
}

// extendedImage: extended L2 entries, 64 KiB clusters, a 4 KiB write at
// subclusters 2-3 of cluster 0.
func extendedImage(t *testing.T, dir string) string {
	p := mkqcow2(t, filepath.Join(dir, "xl2.qcow2"), "extended_l2=on,cluster_size=64k", "1M")
	qio(t, p, "write -P 0x11 4k 4k")
	return p
}

// stage says when a hostile image must be refused.
type stage int

const (
	atOpen       stage = iota // Open must fail
	atOpenOrRead              // Open, or else ReadAt of [readOff, readOff+readLen), must fail
	atSnapshot                // Open with opts.Snapshot must fail
	// Open with opts.Snapshot may fail, or else reads anywhere in the
	// view (the end, past what its L1 table covers) must not panic and
	// may fail only with the wanted errors (QEMU reads such clusters as
	// unallocated).
	atSnapshotOrLenient
)

type hostileCase struct {
	name    string
	base    func(t *testing.T, dir string) string
	corrupt func(t *testing.T, path string)
	opts    disk.OpenOptions // Format defaults to "qcow2", ReadOnly is set
	stage   stage
	readOff int64
	readLen int64   // default 4096
	want    []error // the error must match one of these (errors.Is)
	msg     []string
	// mapFails: with atOpenOrRead, Map of the range must fail too (the
	// corruption is in the mapping, not in the data).
	mapFails bool
}

var (
	errFormat      = []error{disk.ErrFormat}
	errCorrupt     = []error{disk.ErrFormat, disk.ErrCorrupt}
	errUnsupported = []error{disk.ErrNotSupported}
	errEither      = []error{disk.ErrFormat, disk.ErrNotSupported}
)

var hostileCases = []hostileCase{
	{name: "bad-magic", base: plainImage, stage: atOpen, want: errFormat,
		corrupt: func(t *testing.T, p string) { patchBytes(t, p, hMagic, []byte("QFI\x00")) }},
	{name: "version-1", base: plainImage, stage: atOpen, want: errEither,
		corrupt: func(t *testing.T, p string) { patchU32(t, p, hVersion, 1) }},
	{name: "version-4", base: plainImage, stage: atOpen, want: errEither,
		corrupt: func(t *testing.T, p string) { patchU32(t, p, hVersion, 4) }},
	{name: "cluster-bits-8", base: plainImage, stage: atOpen, want: errFormat,
		corrupt: func(t *testing.T, p string) { patchU32(t, p, hClusterBits, 8) }},
	{name: "cluster-bits-22", base: plainImage, stage: atOpen, want: errEither,
		corrupt: func(t *testing.T, p string) { patchU32(t, p, hClusterBits, 22) }},
	{name: "cluster-bits-64", base: plainImage, stage: atOpen, want: errEither,
		corrupt: func(t *testing.T, p string) { patchU32(t, p, hClusterBits, 64) }},
	{name: "cluster-bits-max", base: plainImage, stage: atOpen, want: errEither,
		corrupt: func(t *testing.T, p string) { patchU32(t, p, hClusterBits, 0xffffffff) }},
	{name: "l1-size-huge", base: plainImage, stage: atOpen, want: errFormat,
		corrupt: func(t *testing.T, p string) { patchU32(t, p, hL1Size, 0xffffffff) }},
	{name: "l1-size-past-qemu-limit", base: plainImage, stage: atOpen, want: errFormat,
		// 2^22+1 entries: one more than QEMU's 32 MiB L1 limit.
		corrupt: func(t *testing.T, p string) { patchU32(t, p, hL1Size, 1<<22+1) }},
	{name: "l1-size-beyond-eof", base: plainImage, stage: atOpen, want: errFormat,
		// 1M entries (8 MiB): within limits, but the file is far smaller.
		corrupt: func(t *testing.T, p string) { patchU32(t, p, hL1Size, 1<<20) }},
	{name: "l1-too-small-for-size", base: plainImage, stage: atOpen, want: errFormat,
		corrupt: func(t *testing.T, p string) { patchU64(t, p, hSize, 1<<40) }},
	{name: "size-negative", base: plainImage, stage: atOpen, want: errFormat,
		corrupt: func(t *testing.T, p string) { patchU64(t, p, hSize, 1<<63) }},
	{name: "l1-offset-beyond-eof", base: plainImage, stage: atOpen, want: errFormat,
		corrupt: func(t *testing.T, p string) {
			patchU64(t, p, hL1TableOffset, uint64(roundUp(fileSize(t, p), 1<<16)+1<<20))
		}},
	{name: "l1-offset-unaligned", base: plainImage, stage: atOpen, want: errFormat,
		corrupt: func(t *testing.T, p string) {
			patchU64(t, p, hL1TableOffset, uint64(readRawHeader(t, p).l1Offset+512))
		}},
	{name: "l1-offset-zero", mapFails: true, base: plainImage, stage: atOpenOrRead, want: errCorrupt,
		corrupt: func(t *testing.T, p string) { patchU64(t, p, hL1TableOffset, 0) }},
	{name: "refcount-table-beyond-eof", base: plainImage, stage: atOpen, want: errFormat,
		corrupt: func(t *testing.T, p string) {
			patchU64(t, p, hRefcountTableOffset, uint64(roundUp(fileSize(t, p), 1<<16)+1<<20))
		}},
	{name: "refcount-table-clusters-huge", base: plainImage, stage: atOpen, want: errFormat,
		corrupt: func(t *testing.T, p string) { patchU32(t, p, hRefcountTableClusters, 0xffffffff) }},
	{name: "refcount-order-7", base: plainImage, stage: atOpen, want: errEither,
		corrupt: func(t *testing.T, p string) { patchU32(t, p, hRefcountOrder, 7) }},
	{name: "header-length-short", base: plainImage, stage: atOpen, want: errFormat,
		corrupt: func(t *testing.T, p string) { patchU32(t, p, hHeaderLength, 100) }},
	{name: "header-length-past-cluster", base: plainImage, stage: atOpen, want: errFormat,
		corrupt: func(t *testing.T, p string) { patchU32(t, p, hHeaderLength, 1<<17) }},
	{name: "extension-length-past-cluster", base: plainImage, stage: atOpen, want: errFormat,
		corrupt: func(t *testing.T, p string) {
			hl := int64(binary.BigEndian.Uint32(readFileAt(t, p, hHeaderLength, 4)))
			patchU32(t, p, hl+4, 0xfffffff0)
		}},
	{name: "backing-name-too-long", base: plainImage, stage: atOpen, want: errFormat,
		corrupt: func(t *testing.T, p string) {
			setBackingName(t, p, strings.Repeat("b", 2000))
		}},
	{name: "backing-name-past-eof", base: plainImage, stage: atOpen, want: errFormat,
		corrupt: func(t *testing.T, p string) {
			patchU64(t, p, hBackingFileOffset, uint64(fileSize(t, p)+4096))
			patchU32(t, p, hBackingFileSize, 100)
		}},
	{name: "l1-entry-past-eof", mapFails: true, base: plainImage, stage: atOpenOrRead, want: errCorrupt,
		corrupt: func(t *testing.T, p string) {
			at, _ := l1EntryAt(t, p, 0)
			patchU64(t, p, at, 1<<63|uint64(roundUp(fileSize(t, p), 1<<16)+1<<30))
		}},
	{name: "l1-entry-unaligned", mapFails: true, base: plainImage, stage: atOpenOrRead, want: errCorrupt,
		corrupt: func(t *testing.T, p string) {
			at, e := l1EntryAt(t, p, 0)
			patchU64(t, p, at, e+512)
		}},
	{name: "l1-entry-reserved-bits", mapFails: true, base: plainImage, stage: atOpenOrRead, want: errCorrupt,
		corrupt: func(t *testing.T, p string) {
			at, e := l1EntryAt(t, p, 0)
			patchU64(t, p, at, e|1<<56)
		}},
	{name: "l2-entry-past-eof", mapFails: true, base: plainImage, stage: atOpenOrRead, want: errCorrupt,
		corrupt: func(t *testing.T, p string) {
			at, _ := l2EntryAt(t, p, 0)
			patchU64(t, p, at, 1<<63|uint64(roundUp(fileSize(t, p), 1<<16)+1<<30))
		}},
	{name: "l2-entry-reserved-low-bits", mapFails: true, base: plainImage, stage: atOpenOrRead, want: errCorrupt,
		corrupt: func(t *testing.T, p string) {
			at, e := l2EntryAt(t, p, 0)
			patchU64(t, p, at, e|1<<8)
		}},
	{name: "l2-entry-reserved-high-bits", mapFails: true, base: plainImage, stage: atOpenOrRead, want: errCorrupt,
		readOff: 192 << 10,
		corrupt: func(t *testing.T, p string) {
			at, e := l2EntryAt(t, p, 192<<10)
			patchU64(t, p, at, e|1<<60)
		}},
	{name: "l2-entry-unaligned", mapFails: true, base: plainImage, stage: atOpenOrRead, want: errCorrupt,
		corrupt: func(t *testing.T, p string) {
			at, e := l2EntryAt(t, p, 0)
			patchU64(t, p, at, e+512)
		}},
	{name: "zlib-stream-garbage", base: compressedImage("zlib"), stage: atOpenOrRead, want: errCorrupt,
		corrupt: func(t *testing.T, p string) {
			_, host, span := compressedAt(t, p, 0)
			patchBytes(t, p, host, bytes.Repeat([]byte{0xff}, int(span))) // BTYPE 11: reserved
		}},
	{name: "zlib-stream-zeros", base: compressedImage("zlib"), stage: atOpenOrRead, want: errCorrupt,
		corrupt: func(t *testing.T, p string) {
			_, host, span := compressedAt(t, p, 0)
			patchBytes(t, p, host, make([]byte, span)) // empty stored blocks, no final block
		}},
	{name: "zlib-stream-short", base: compressedImage("zlib"), stage: atOpenOrRead, want: errCorrupt,
		// A valid deflate stream of 100 bytes: less than a cluster.
		corrupt: func(t *testing.T, p string) {
			_, host, _ := compressedAt(t, p, 0)
			patchBytes(t, p, host, deflateBytes(t, bytes.Repeat([]byte("x"), 100)))
		}},
	{name: "zstd-stream-garbage", base: compressedImage("zstd"), stage: atOpenOrRead, want: errCorrupt,
		corrupt: func(t *testing.T, p string) {
			_, host, span := compressedAt(t, p, 0)
			patchBytes(t, p, host, bytes.Repeat([]byte{0xff}, int(span)))
		}},
	{name: "zstd-stream-short", base: compressedImage("zstd"), stage: atOpenOrRead, want: errCorrupt,
		corrupt: func(t *testing.T, p string) {
			_, host, _ := compressedAt(t, p, 0)
			patchBytes(t, p, host, zstdBytes(t, bytes.Repeat([]byte("x"), 100)))
		}},
	{name: "zstd-stream-too-long", base: compressedImage("zstd"), stage: atOpenOrRead, want: errCorrupt,
		// A valid zstd frame of 2 clusters of data in the sectors of a
		// cluster: it inflates past one cluster, which QEMU refuses (EIO)
		// for zstd (for zlib it ignores the excess).
		corrupt: func(t *testing.T, p string) {
			_, host, span := compressedAt(t, p, 0)
			z := zstdBytes(t, bytes.Repeat([]byte("y"), 8192))
			if int64(len(z)) > span {
				t.Fatalf("frame of %d bytes does not fit in %d", len(z), span)
			}
			patchBytes(t, p, host, z)
		}},
	{name: "zstd-stream-too-long-no-content-size", base: compressedImage("zstd"), stage: atOpenOrRead, want: errCorrupt,
		// The same as a streamed frame, whose header does not record the
		// content size: the excess shows only while inflating.
		corrupt: func(t *testing.T, p string) {
			_, host, span := compressedAt(t, p, 0)
			z := zstdRLEFrame('y', 8192)
			if int64(len(z)) > span {
				t.Fatalf("frame of %d bytes does not fit in %d", len(z), span)
			}
			patchBytes(t, p, host, z)
		}},
	{name: "compressed-span-past-eof", base: compressedImage("zlib"), stage: atOpenOrRead, want: errCorrupt,
		corrupt: func(t *testing.T, p string) {
			h := readRawHeader(t, p)
			at, _, _ := compressedAt(t, p, 0)
			x := 62 - (h.clusterBits - 8)
			host := uint64(fileSize(t, p) - 100)
			sectors := uint64(1)<<(h.clusterBits-8) - 1
			patchU64(t, p, at, 1<<62|sectors<<x|host)
		}},
	{name: "compressed-offset-past-eof", mapFails: true, base: compressedImage("zlib"), stage: atOpenOrRead, want: errCorrupt,
		corrupt: func(t *testing.T, p string) {
			at, _, _ := compressedAt(t, p, 0)
			patchU64(t, p, at, 1<<62|uint64(fileSize(t, p)+512))
		}},
	{name: "extended-l2-alloc-and-zero", mapFails: true, base: extendedImage, stage: atOpenOrRead, want: errCorrupt,
		readOff: 4096,
		corrupt: func(t *testing.T, p string) {
			at, _ := l2EntryAt(t, p, 0)
			// Subcluster 2 both allocated (bit 2) and zero (bit 34).
			bm := readU64(t, p, at+8)
			patchU64(t, p, at+8, bm|1<<2|1<<34)
		}},
	{name: "extended-l2-alloc-without-cluster", mapFails: true, base: extendedImage, stage: atOpenOrRead, want: errCorrupt,
		readOff: 65536,
		corrupt: func(t *testing.T, p string) {
			// Cluster 1 has no host offset but claims allocated subclusters.
			at, _ := l2EntryAt(t, p, 65536)
			patchU64(t, p, at+8, 0xffffffff)
		}},
	{name: "extended-l2-cluster-bits-13", base: extendedImage, stage: atOpen, want: errEither,
		corrupt: func(t *testing.T, p string) { patchU32(t, p, hClusterBits, 13) }},
	{name: "compression-type-unknown", base: plainImage, stage: atOpen, want: errEither,
		corrupt: func(t *testing.T, p string) {
			patchU64(t, p, hIncompatibleFeatures, 1<<3)
			patchBytes(t, p, hCompressionType, []byte{7})
		}},
	{name: "compression-type-bit-without-type", base: plainImage, stage: atOpen, want: errFormat,
		corrupt: func(t *testing.T, p string) {
			patchU64(t, p, hIncompatibleFeatures, 1<<3)
			patchBytes(t, p, hCompressionType, []byte{0})
		}},
	{name: "compression-type-without-bit", base: plainImage, stage: atOpen, want: errEither,
		corrupt: func(t *testing.T, p string) { patchBytes(t, p, hCompressionType, []byte{1}) }},
	{name: "incompatible-bit-unnamed", base: plainImage, stage: atOpen, want: errUnsupported,
		msg: []string{"bit 6", "0x40", "bit6", "(6)", " 6"},
		corrupt: func(t *testing.T, p string) {
			patchU64(t, p, hIncompatibleFeatures, 1<<6)
			rewriteExtensions(t, p, func(es []hdrExt) []hdrExt {
				for i := range es { // drop any name QEMU might have for bit 6
					if es[i].typ == extFeatureNames {
						var keep []byte
						for j := 0; j+48 <= len(es[i].data); j += 48 {
							if !(es[i].data[j] == 0 && es[i].data[j+1] == 6) {
								keep = append(keep, es[i].data[j:j+48]...)
							}
						}
						es[i].data = keep
					}
				}
				return es
			})
		}},
	{name: "incompatible-bit-named", base: plainImage, stage: atOpen, want: errUnsupported,
		msg: []string{"frobnication"},
		corrupt: func(t *testing.T, p string) {
			patchU64(t, p, hIncompatibleFeatures, 1<<5)
			rewriteExtensions(t, p, func(es []hdrExt) []hdrExt {
				for i := range es {
					if es[i].typ == extFeatureNames {
						es[i].data = append(es[i].data, featureName(0, 5, "frobnication")...)
						return es
					}
				}
				return append(es, hdrExt{extFeatureNames, featureName(0, 5, "frobnication")})
			})
		}},
	{name: "incompatible-bit-63-named-in-new-table", base: plainImage, stage: atOpen, want: errUnsupported,
		msg: []string{"quantum entanglement"},
		corrupt: func(t *testing.T, p string) {
			patchU64(t, p, hIncompatibleFeatures, 1<<63)
			rewriteExtensions(t, p, func(es []hdrExt) []hdrExt {
				out := es[:0]
				for _, e := range es {
					if e.typ != extFeatureNames {
						out = append(out, e)
					}
				}
				return append(out, hdrExt{extFeatureNames, featureName(0, 63, "quantum entanglement")})
			})
		}},
	// Built by hand: qemu-img create -o encrypt.format=luks benchmarks
	// PBKDF2 against the CPU clock and fails under load ("Unable to get
	// accurate CPU usage"), whatever encrypt.iter-time says.
	{name: "encrypted-luks", stage: atOpen, want: errUnsupported, msg: []string{"encrypt", "luks"},
		base: func(t *testing.T, dir string) string {
			p := mkqcow2(t, filepath.Join(dir, "luks.qcow2"), "", "1M")
			if err := imagetest.EncryptQcow2(p); err != nil {
				t.Fatal(err)
			}
			return p
		}},
	{name: "encrypted-aes", stage: atOpen, want: errUnsupported, msg: []string{"encrypt", "aes"},
		base: func(t *testing.T, dir string) string {
			p := filepath.Join(dir, "aes.qcow2")
			qemutest.Img(t, "create", "-q", "-f", "qcow2", "--object", "secret,id=sec0,data=123456",
				"-o", "encrypt.format=aes,encrypt.key-secret=sec0", p, "1M")
			return p
		}},
	{name: "crypt-method-unknown", base: plainImage, stage: atOpen, want: errEither,
		corrupt: func(t *testing.T, p string) { patchU32(t, p, hCryptMethod, 9) }},
	{name: "backing-loop", stage: atOpen, want: errFormat,
		base: func(t *testing.T, dir string) string {
			a := mkqcow2(t, filepath.Join(dir, "a.qcow2"), "", "1M")
			mkqcow2(t, filepath.Join(dir, "b.qcow2"), "", "1M", "-b", "a.qcow2", "-F", "qcow2")
			qemutest.Img(t, "rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", a)
			return a
		}},
	{name: "backing-self-loop", stage: atOpen, want: errFormat,
		base: func(t *testing.T, dir string) string {
			s := mkqcow2(t, filepath.Join(dir, "s.qcow2"), "", "1M")
			qemutest.Img(t, "rebase", "-u", "-b", "s.qcow2", "-F", "qcow2", s)
			return s
		}},
	{name: "backing-self-loop-probed", stage: atOpen, want: errFormat,
		base: func(t *testing.T, dir string) string {
			s := mkqcow2(t, filepath.Join(dir, "s.qcow2"), "", "1M")
			setBackingName(t, s, "./s.qcow2")
			return s
		}},
	{name: "backing-chain-too-deep", stage: atOpen, want: errFormat,
		base: func(t *testing.T, dir string) string {
			// disk.MaxChainDepth+10 copies of one image, each backed by
			// the next, the last by nothing.
			tmpl := mkqcow2(t, filepath.Join(dir, "tmpl.qcow2"), "", "1M")
			b, err := os.ReadFile(tmpl)
			if err != nil {
				t.Fatal(err)
			}
			n := disk.MaxChainDepth + 10
			for i := n - 1; i >= 0; i-- {
				p := filepath.Join(dir, fmt.Sprintf("c%d.qcow2", i))
				writeFile(t, p, b)
				if i < n-1 {
					setBackingName(t, p, fmt.Sprintf("c%d.qcow2", i+1))
				}
			}
			return filepath.Join(dir, "c0.qcow2")
		}},
	{name: "backing-missing", stage: atOpen, want: []error{fs.ErrNotExist},
		base: func(t *testing.T, dir string) string {
			base := mkqcow2(t, filepath.Join(dir, "base.qcow2"), "", "1M")
			p := mkqcow2(t, filepath.Join(dir, "top.qcow2"), "", "1M", "-b", "base.qcow2", "-F", "qcow2")
			if err := os.Remove(base); err != nil {
				t.Fatal(err)
			}
			return p
		}},
	{name: "data-file-missing", stage: atOpen, want: []error{fs.ErrNotExist},
		base: func(t *testing.T, dir string) string {
			p := mkqcow2(t, filepath.Join(dir, "d.qcow2"), "data_file="+filepath.Join(dir, "d.data"), "1M")
			if err := os.Remove(filepath.Join(dir, "d.data")); err != nil {
				t.Fatal(err)
			}
			return p
		}},
	{name: "backing-protocol-nbd", base: plainImage, stage: atOpen, want: errUnsupported,
		corrupt: func(t *testing.T, p string) { setBackingName(t, p, "nbd://localhost:10809/export") }},
	{name: "backing-protocol-json", base: plainImage, stage: atOpen, want: errUnsupported,
		corrupt: func(t *testing.T, p string) {
			setBackingName(t, p, `json:{"driver":"file","filename":"/etc/passwd"}`)
		}},
	{name: "corrupt-backing", stage: atOpenOrRead, want: errCorrupt, readOff: 192 << 10,
		base: func(t *testing.T, dir string) string {
			base := plainImage(t, dir)
			at, e := l2EntryAt(t, base, 192<<10)
			patchU64(t, base, at, e|1<<56)
			return mkqcow2(t, filepath.Join(dir, "top.qcow2"), "", "1M", "-b", "plain.qcow2", "-F", "qcow2")
		}},
	{name: "snapshot-virtual-size-too-big-for-l1", stage: atSnapshotOrLenient, want: errFormat,
		opts: disk.OpenOptions{Snapshot: "s1"},
		base: func(t *testing.T, dir string) string {
			p := plainImage(t, dir)
			qemutest.Img(t, "snapshot", "-c", "s1", p)
			return p
		},
		corrupt: func(t *testing.T, p string) {
			// Extra data of the first snapshot table entry: bytes 48-55
			// hold the snapshot's virtual disk size.
			off := int64(readU64(t, p, hSnapshotsOffset))
			if extra := binary.BigEndian.Uint32(readFileAt(t, p, off+36, 4)); extra < 16 {
				t.Fatalf("snapshot entry has %d bytes of extra data, want >= 16", extra)
			}
			patchU64(t, p, off+48, 1<<50)
		}},
	{name: "snapshot-table-past-eof", base: plainImage, stage: atSnapshot, want: errFormat,
		opts: disk.OpenOptions{Snapshot: "1"},
		corrupt: func(t *testing.T, p string) {
			patchU32(t, p, hNbSnapshots, 1)
			patchU64(t, p, hSnapshotsOffset, uint64(roundUp(fileSize(t, p), 1<<16)+1<<20))
		}},
	{name: "snapshot-count-huge", base: plainImage, stage: atSnapshot, want: errFormat,
		opts: disk.OpenOptions{Snapshot: "1"},
		corrupt: func(t *testing.T, p string) {
			patchU32(t, p, hNbSnapshots, 0xffffffff)
			patchU64(t, p, hSnapshotsOffset, 1<<16)
		}},
	{name: "snapshot-l1-past-eof", stage: atSnapshot, want: errCorrupt,
		opts: disk.OpenOptions{Snapshot: "s1"},
		base: func(t *testing.T, dir string) string {
			p := plainImage(t, dir)
			qemutest.Img(t, "snapshot", "-c", "s1", p)
			return p
		},
		corrupt: func(t *testing.T, p string) {
			// The first snapshot table entry starts with its L1 offset.
			off := int64(readU64(t, p, hSnapshotsOffset))
			patchU64(t, p, off, uint64(roundUp(fileSize(t, p), 1<<16)+1<<20))
		}},
}

// TestHostileAllocations opens, one at a time, the hostile images whose
// header fields claim huge tables, and checks that refusing them
// allocates little: the error must come before any allocation sized by
// the hostile field.
func TestHostileAllocations(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	names := map[string]bool{
		"l1-size-huge": true, "l1-size-past-qemu-limit": true, "l1-size-beyond-eof": true,
		"l1-too-small-for-size": true, "size-negative": true, "refcount-table-clusters-huge": true,
		"snapshot-count-huge": true, "snapshot-table-past-eof": true, "extension-length-past-cluster": true,
	}
	for _, c := range hostileCases {
		if !names[c.name] {
			continue
		}
		t.Run(c.name, func(t *testing.T) {
			path := c.base(t, t.TempDir())
			c.corrupt(t, path)
			opts := c.opts
			opts.Format, opts.ReadOnly = "qcow2", true
			var before, after runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&before)
			img, err := disk.Open(path, opts)
			runtime.ReadMemStats(&after)
			if err == nil {
				img.Close()
				t.Fatalf("Open succeeded")
			}
			if d := after.TotalAlloc - before.TotalAlloc; d > 8<<20 {
				t.Errorf("refusing the image allocated %d KiB (%v)", d>>10, err)
			}
		})
	}
}

// readFileAt returns n bytes at off of the file at path.
func readFileAt(t testing.TB, path string, off int64, n int) []byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, n)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	return b
}

// deflateBytes returns a raw deflate stream of data (qcow2's "zlib").
func deflateBytes(t testing.TB, data []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	w, err := flate.NewWriter(&buf, flate.BestCompression)
	if err != nil {
		t.Fatal(err)
	}
	w.Write(data)
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// zstdBytes returns a zstd frame of data.
func zstdBytes(t testing.TB, data []byte) []byte {
	t.Helper()
	enc, err := zstd.NewWriter(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer enc.Close()
	return enc.EncodeAll(data, nil)
}

// zstdRLEFrame returns a zstd frame (RFC 8878) whose header records no
// content size (as a streaming encoder writes it): a 8 KiB window and one
// RLE block of n copies of c (n <= 8192).
func zstdRLEFrame(c byte, n int) []byte {
	f := []byte{0x28, 0xb5, 0x2f, 0xfd, // magic
		0x00,   // frame header descriptor: no content size, no checksum
		3 << 3, // window descriptor: 2^(10+3) bytes
	}
	h := uint32(1) | 1<<1 | uint32(n)<<3 // last block, RLE, size n
	return append(f, byte(h), byte(h>>8), byte(h>>16), c)
}

// within runs f in a goroutine and fails t if it does not finish within
// hostileTimeout or panics.
func within(t *testing.T, what string, f func()) {
	t.Helper()
	done := make(chan any, 1)
	go func() {
		defer func() { done <- recover() }()
		f()
	}()
	select {
	case p := <-done:
		if p != nil {
			t.Fatalf("%s panicked: %v", what, p)
		}
	case <-time.After(hostileTimeout):
		t.Fatalf("%s still running after %v (hang)", what, hostileTimeout)
	}
}

// checkErr fails t unless err matches one of want and, when msg is set,
// its text contains one of msg (case-insensitive).
func checkErr(t *testing.T, what string, err error, want []error, msg []string) {
	t.Helper()
	if err == nil {
		t.Errorf("%s succeeded, want an error matching %v", what, want)
		return
	}
	ok := false
	for _, w := range want {
		ok = ok || errors.Is(err, w)
	}
	if !ok {
		t.Errorf("%s: error %q (%T) does not match any of %v", what, err, err, want)
	}
	if len(msg) > 0 {
		text, found := strings.ToLower(err.Error()), false
		for _, m := range msg {
			found = found || strings.Contains(text, strings.ToLower(m))
		}
		if !found {
			t.Errorf("%s: error %q names none of %q", what, err, msg)
		}
	}
}

func TestHostile(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	for _, c := range hostileCases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			path := c.base(t, t.TempDir())
			if c.corrupt != nil {
				c.corrupt(t, path)
			}
			opts := c.opts
			if opts.Format == "" {
				opts.Format = "qcow2"
			}
			opts.ReadOnly = true
			n := c.readLen
			if n == 0 {
				n = 4096
			}
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			within(t, "open and read", func() {
				img, err := disk.Open(path, opts)
				if c.stage == atSnapshotOrLenient && err == nil {
					defer img.Close()
					buf := make([]byte, n)
					for _, off := range []int64{0, img.Size() - n, img.Size() / 2, 1 << 30} {
						if off < 0 || off+n > img.Size() {
							continue
						}
						if _, err := img.ReadAt(buf, off); err != nil {
							checkErr(t, fmt.Sprintf("ReadAt(%d)", off), err, c.want, c.msg)
						}
					}
					return
				}
				if c.stage != atOpenOrRead || err != nil {
					checkErr(t, "Open", err, c.want, c.msg)
					if img != nil {
						img.Close()
					}
					return
				}
				defer img.Close()
				buf := bytes.Repeat([]byte{0xa5}, int(n))
				_, err = img.ReadAt(buf, c.readOff)
				checkErr(t, fmt.Sprintf("ReadAt(off %d, len %d)", c.readOff, n), err, c.want, c.msg)
				if err == nil && bytes.Count(buf, []byte{0}) == len(buf) {
					t.Errorf("the corrupt range read as zeros")
				}
				if c.mapFails {
					e, err := disk.Map(img, c.readOff, n)
					if err == nil {
						t.Errorf("Map(%d, %d) = %+v, want an error", c.readOff, n, e)
					} else {
						checkErr(t, "Map", err, c.want, nil)
					}
				}
			})
			runtime.ReadMemStats(&after)
			// Parallel subtests share the heap: this only catches an
			// allocation sized by a hostile field (hundreds of MiB).
			if d := after.TotalAlloc - before.TotalAlloc; d > 256<<20 {
				t.Errorf("open allocated %d MiB", d>>20)
			}
		})
	}
}

// TestHostileTruncatedHeader opens every prefix of the first 512 bytes of
// tiny images: each must be refused with disk.ErrFormat (the L1 table
// lies past the end of every such prefix).
func TestHostileTruncatedHeader(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	for _, opts := range []string{"", "compat=0.10", "cluster_size=512"} {
		p := mkqcow2(t, filepath.Join(dir, "tiny.qcow2"), opts, "64k")
		qio(t, p, "write -P 0x11 0 4k")
		full, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		within(t, "truncated opens", func() {
			for n := 0; n <= 512 && n < len(full); n++ {
				f := hostfiletest.NewMemFile(p, full[:n])
				img, err := disk.OpenFile(f, disk.OpenOptions{Format: "qcow2", ReadOnly: true})
				if err == nil {
					img.Close()
					t.Errorf("%s: Open of the first %d bytes succeeded", opts, n)
					continue
				}
				f.Close()
				if !errors.Is(err, disk.ErrFormat) {
					t.Errorf("%s: Open of the first %d bytes: %v, want disk.ErrFormat", opts, n, err)
				}
			}
		})
	}
}

// TestHostileTruncatedFile truncates a small image at every 512-byte
// boundary: Open must fail with disk.ErrFormat or succeed, and then every
// read must succeed or fail with disk.ErrFormat; never panic or hang.
func TestHostileTruncatedFile(t *testing.T) {
	qemutest.Require(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	for _, build := range []func(*testing.T, string) string{compressedImage("zlib"), extendedImage} {
		p := build(t, dir)
		full, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		within(t, "truncated reads", func() {
			buf := make([]byte, 64<<10)
			for n := 0; n < len(full); n += 512 {
				f := hostfiletest.NewMemFile(p, full[:n])
				img, err := disk.OpenFile(f, disk.OpenOptions{Format: "qcow2", ReadOnly: true})
				if err != nil {
					f.Close()
					if !errors.Is(err, disk.ErrFormat) {
						t.Errorf("%s truncated to %d: Open: %v, want disk.ErrFormat", filepath.Base(p), n, err)
					}
					continue
				}
				for off := int64(0); off < img.Size(); off += int64(len(buf)) {
					b := buf[:min(int64(len(buf)), img.Size()-off)]
					if _, err := img.ReadAt(b, off); err != nil && !errors.Is(err, disk.ErrFormat) {
						t.Errorf("%s truncated to %d: ReadAt(%d): %v, want disk.ErrFormat", filepath.Base(p), n, off, err)
						break
					}
				}
				img.Close()
			}
		})
		os.Remove(p)
	}
}
