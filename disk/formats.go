package disk

import (
	"bytes"
	"encoding/binary"
	"strings"
)

// knownFormat is an image format QEMU detects that has no imgloop driver:
// Probe recognises it by QEMU's own test, so that such an image is
// refused by name instead of being read as raw (which would copy a VHD
// container, say, as if it were the disk).
type knownFormat struct {
	name  string // QEMU's driver name, as qemu-img -f takes it
	title string // what the format is usually called
	// probe scores s as QEMU's probe function for the format does (the
	// function is named in each entry's comment).
	probe func(s *Sample) int
}

// knownFormats lists every format QEMU 7.2's block drivers probe for,
// but raw and qcow2, which have drivers. Each probe follows QEMU's
// function of the same format to the byte: which magic, at which offset,
// which versions, which score. A format gets a driver by registering
// one of the same name, which then takes the entry's place.
var knownFormats = []knownFormat{
	// block/vmdk.c vmdk_probe: the sparse extent magics ("KDMV" of
	// VMDK4, "COWD" of VMDK3, big-endian), or a text descriptor.
	{"vmdk", "VMDK", probeVMDK},
	// block/vpc.c vpc_probe: "conectix" at the start of the file (the
	// copy of the footer that dynamic and differencing VHDs begin with).
	// A fixed VHD has its footer only in its last sector: QEMU does not
	// look there and detects it as raw; so does imgloop (see Sample).
	{"vpc", "VHD", func(s *Sample) int { return score(bytes.HasPrefix(s.Head, []byte("conectix")), 100) }},
	// block/vhdx.c vhdx_probe: the file type identifier "vhdxfile".
	{"vhdx", "VHDX", func(s *Sample) int { return score(bytes.HasPrefix(s.Head, []byte("vhdxfile")), 100) }},
	// block/vdi.c vdi_probe: the signature 0xbeda107f (little-endian)
	// after the 64-byte text field of the header.
	{"vdi", "VDI", func(s *Sample) int { return score(le32(s.Head, 0x40) == 0xbeda107f, 100) }},
	// block/qed.c bdrv_qed_probe: QED_MAGIC ('Q' | 'E'<<8 | 'D'<<16,
	// little-endian).
	{"qed", "QED", func(s *Sample) int { return score(le32(s.Head, 0) == 0x00444551, 100) }},
	// block/parallels.c parallels_probe: either header magic and
	// version 2 (little-endian).
	{"parallels", "Parallels", func(s *Sample) int {
		m := string(s.Head[:16])
		return score((m == "WithoutFreeSpace" || m == "WithouFreSpacExt") && le32(s.Head, 16) == 2, 100)
	}},
	// block/bochs.c bochs_probe: magic, type "Redolog", subtype
	// "Growing" (strcmp on the header's fixed fields: each must end with
	// a NUL) and version 1 or 2.
	{"bochs", "Bochs", func(s *Sample) int {
		v := le32(s.Head, 64)
		return score(cstring(s.Head[0:32]) == "Bochs Virtual HD Image" &&
			cstring(s.Head[32:48]) == "Redolog" && cstring(s.Head[48:64]) == "Growing" &&
			(v == 0x00020000 || v == 0x00010000), 100)
	}},
	// block/cloop.c cloop_probe: the V2.0 shell-script preamble; score
	// 2, just above raw.
	{"cloop", "compressed loop", func(s *Sample) int { return score(bytes.HasPrefix(s.Head, []byte(cloopMagic)), 2) }},
	// block/dmg.c dmg_probe: a file name ending in ".dmg" (at least one
	// character before it), score 2. QEMU looks at nothing else: the
	// UDIF trailer is read by dmg_open, at the end of the file.
	{"dmg", "DMG", func(s *Sample) int { return score(len(s.Name) > 4 && strings.HasSuffix(s.Name, ".dmg"), 2) }},
	// block/crypto.c block_crypto_probe_luks (crypto/block-luks.c
	// qcrypto_block_luks_has_format): the LUKS magic and version 1
	// (big-endian). QEMU reads no LUKS2 headers.
	{"luks", "LUKS", func(s *Sample) int {
		return score(bytes.HasPrefix(s.Head, []byte("LUKS\xba\xbe")) && binary.BigEndian.Uint16(s.Head[6:]) == 1, 100)
	}},
	// block/qcow.c qcow_probe: the qcow magic "QFI\xfb" and version 1;
	// the qcow2 driver claims every other version.
	{"qcow", "qcow version 1", func(s *Sample) int {
		return score(binary.BigEndian.Uint32(s.Head) == 0x514649fb && binary.BigEndian.Uint32(s.Head[4:]) == 1, 100)
	}},
}

// cloopMagic is the start of a cloop V2.0 image (block/cloop.c).
const cloopMagic = "#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"

// probeVMDK is vmdk_probe: a sparse extent's magic, or a descriptor
// whose first line that is neither a comment nor blank is "version=1",
// "version=2" or "version=3" (with \n or \r\n). As in QEMU, a blank line
// must hold at least one space: an empty line ends the search.
func probeVMDK(s *Sample) int {
	b := s.Head
	if m := string(b[:4]); m == "KDMV" || m == "COWD" {
		return 100
	}
	p := 0
	for p < len(b) {
		switch b[p] {
		case '#': // a comment line
			for p < len(b) && b[p] != '\n' {
				p++
			}
			p++
			continue
		case ' ': // a blank line
			for p < len(b) && b[p] == ' ' {
				p++
			}
			if p < len(b) && b[p] == '\r' {
				p++
			}
			if p == len(b) || b[p] != '\n' {
				return 0
			}
			p++
			continue
		}
		for _, v := range []string{"version=1\n", "version=2\n", "version=3\n", "version=1\r\n", "version=2\r\n", "version=3\r\n"} {
			if bytes.HasPrefix(b[p:], []byte(v)) {
				return 100
			}
		}
		return 0
	}
	return 0
}

// score returns n if ok, else 0.
func score(ok bool, n int) int {
	if ok {
		return n
	}
	return 0
}

// le32 returns the little-endian uint32 at off in b.
func le32(b []byte, off int) uint32 { return binary.LittleEndian.Uint32(b[off:]) }

// cstring returns b up to its first NUL, or "\xff" (which no probed
// string equals) if b holds none: C's strcmp on a fixed-size field
// would read past it.
func cstring(b []byte) string {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		return string(b[:i])
	}
	return "\xff"
}
