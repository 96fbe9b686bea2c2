// Package wire holds the NBD protocol's numbers and the encoding of its
// fixed-size messages, shared by imgloop's NBD server (export/nbd) and
// client (export/nbd/client). It follows doc/proto.md of the
// NetworkBlockDevice/nbd repository, with the extended headers of its
// extension-ext-header branch (what QEMU 8.2 and libnbd 1.18 speak),
// and QEMU's qemu:allocation-depth metadata context
// (docs/interop/nbd.txt of QEMU).
//
// Names keep the spec's, in MixedCaps without the NBD_ prefix
// (NBD_OPT_GO is OptGo). All integers are big-endian on the wire.
package wire

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// Magic numbers.
const (
	MagicNBD               = 0x4e42444d41474943 // "NBDMAGIC"
	MagicIHaveOpt          = 0x49484156454F5054 // "IHAVEOPT"
	MagicOptReply          = 0x3e889045565a9
	MagicRequest           = 0x25609513
	MagicExtendedRequest   = 0x21e41c71
	MagicSimpleReply       = 0x67446698
	MagicStructuredReply   = 0x668e33ef
	MagicExtendedReply     = 0x6e8a278c
	MagicOldstyleCliserv   = 0x00420281861253 // not served: oldstyle
	DefaultPort            = 10809
	MaxStringLen           = 4096    // a string's limit in the spec
	MaxOptionLen           = 1 << 16 // bound on option data a server reads (names, queries)
	DefaultMaxPayload      = 32 << 20
	MaxBlockStatusExtents  = 1 << 20 // per chunk, as the spec asks
	handshakeZeroPadLength = 124
)

// Handshake flags (server) and client flags.
const (
	FlagFixedNewstyle   uint16 = 1 << 0
	FlagNoZeroes        uint16 = 1 << 1
	FlagCFixedNewstyle  uint32 = 1 << 0
	FlagCNoZeroes       uint32 = 1 << 1
	KnownClientFlags           = FlagCFixedNewstyle | FlagCNoZeroes
	HandshakeZeroPadLen        = handshakeZeroPadLength
)

// Transmission flags.
const (
	FlagHasFlags           uint16 = 1 << 0
	FlagReadOnly           uint16 = 1 << 1
	FlagSendFlush          uint16 = 1 << 2
	FlagSendFUA            uint16 = 1 << 3
	FlagRotational         uint16 = 1 << 4
	FlagSendTrim           uint16 = 1 << 5
	FlagSendWriteZeroes    uint16 = 1 << 6
	FlagSendDF             uint16 = 1 << 7
	FlagCanMultiConn       uint16 = 1 << 8
	FlagSendResize         uint16 = 1 << 9
	FlagSendCache          uint16 = 1 << 10
	FlagSendFastZero       uint16 = 1 << 11
	FlagBlockStatusPayload uint16 = 1 << 12
)

// Options.
const (
	OptExportName      uint32 = 1
	OptAbort           uint32 = 2
	OptList            uint32 = 3
	OptPeekExport      uint32 = 4
	OptStartTLS        uint32 = 5
	OptInfo            uint32 = 6
	OptGo              uint32 = 7
	OptStructuredReply uint32 = 8
	OptListMetaContext uint32 = 9
	OptSetMetaContext  uint32 = 10
	OptExtendedHeaders uint32 = 11
)

// Option reply types.
const (
	RepAck              uint32 = 1
	RepServer           uint32 = 2
	RepInfo             uint32 = 3
	RepMetaContext      uint32 = 4
	RepFlagError        uint32 = 1 << 31
	RepErrUnsup                = RepFlagError | 1
	RepErrPolicy               = RepFlagError | 2
	RepErrInvalid              = RepFlagError | 3
	RepErrPlatform             = RepFlagError | 4
	RepErrTLSReqd              = RepFlagError | 5
	RepErrUnknown              = RepFlagError | 6
	RepErrShutdown             = RepFlagError | 7
	RepErrBlockSizeReqd        = RepFlagError | 8
	RepErrTooBig               = RepFlagError | 9
	RepErrExtHeaderReqd        = RepFlagError | 10
)

// Information types of NBD_OPT_INFO and NBD_OPT_GO.
const (
	InfoExport      uint16 = 0
	InfoName        uint16 = 1
	InfoDescription uint16 = 2
	InfoBlockSize   uint16 = 3
)

// Commands.
const (
	CmdRead        uint16 = 0
	CmdWrite       uint16 = 1
	CmdDisc        uint16 = 2
	CmdFlush       uint16 = 3
	CmdTrim        uint16 = 4
	CmdCache       uint16 = 5
	CmdWriteZeroes uint16 = 6
	CmdBlockStatus uint16 = 7
	CmdResize      uint16 = 8 // the experimental resize extension; not served
)

// Command flags.
const (
	CmdFlagFUA        uint16 = 1 << 0
	CmdFlagNoHole     uint16 = 1 << 1
	CmdFlagDF         uint16 = 1 << 2
	CmdFlagReqOne     uint16 = 1 << 3
	CmdFlagFastZero   uint16 = 1 << 4
	CmdFlagPayloadLen uint16 = 1 << 5
)

// Reply flags and structured reply types.
const (
	ReplyFlagDone           uint16 = 1 << 0
	ReplyTypeNone           uint16 = 0
	ReplyTypeOffsetData     uint16 = 1
	ReplyTypeOffsetHole     uint16 = 2
	ReplyTypeBlockStatus    uint16 = 5
	ReplyTypeBlockStatusExt uint16 = 6
	ReplyTypeFlagError      uint16 = 1 << 15
	ReplyTypeError                 = ReplyTypeFlagError | 1
	ReplyTypeErrorOffset           = ReplyTypeFlagError | 2
)

// Error values.
const (
	EPERM     uint32 = 1
	EIO       uint32 = 5
	ENOMEM    uint32 = 12
	EINVAL    uint32 = 22
	ENOSPC    uint32 = 28
	EOVERFLOW uint32 = 75
	ENOTSUP   uint32 = 95
	ESHUTDOWN uint32 = 108
)

// Metadata contexts and their flags.
const (
	ContextBaseAllocation = "base:allocation"
	// ContextAllocationDepth is QEMU's qemu:allocation-depth: the status
	// is the depth of the backing chain layer defining the extent (1
	// for the image itself, 2 for its backing file, ...), 0 when no
	// layer does.
	ContextAllocationDepth = "qemu:allocation-depth"

	StateHole uint32 = 1 << 0
	StateZero uint32 = 1 << 1
)

// ErrorName returns the spec's name of an NBD error value.
func ErrorName(e uint32) string {
	switch e {
	case 0:
		return "success"
	case EPERM:
		return "EPERM"
	case EIO:
		return "EIO"
	case ENOMEM:
		return "ENOMEM"
	case EINVAL:
		return "EINVAL"
	case ENOSPC:
		return "ENOSPC"
	case EOVERFLOW:
		return "EOVERFLOW"
	case ENOTSUP:
		return "ENOTSUP"
	case ESHUTDOWN:
		return "ESHUTDOWN"
	}
	return fmt.Sprintf("error %d", e)
}

// ErrProtocol is matched by the errors of malformed messages.
var ErrProtocol = errors.New("nbd: protocol error")

// protocolError returns an error matching ErrProtocol.
func protocolError(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrProtocol, fmt.Sprintf(format, args...))
}

// Option is an option request's header (the data follows).
type Option struct {
	Option uint32
	Length uint32
}

// OptionHeaderSize is the size of an option request header.
const OptionHeaderSize = 16

// ReadOption reads an option header.
func ReadOption(r io.Reader) (Option, error) {
	var b [OptionHeaderSize]byte
	if _, err := io.ReadFull(r, b[:]); err != nil {
		return Option{}, err
	}
	if m := binary.BigEndian.Uint64(b[:]); m != MagicIHaveOpt {
		return Option{}, protocolError("option magic %#x", m)
	}
	return Option{Option: binary.BigEndian.Uint32(b[8:]), Length: binary.BigEndian.Uint32(b[12:])}, nil
}

// AppendOption appends an option request (header and data).
func AppendOption(b []byte, opt uint32, data []byte) []byte {
	b = binary.BigEndian.AppendUint64(b, MagicIHaveOpt)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

// OptReply is an option reply's header (the data follows).
type OptReply struct {
	Option uint32
	Type   uint32
	Length uint32
}

// OptReplyHeaderSize is the size of an option reply header.
const OptReplyHeaderSize = 20

// AppendOptReply appends an option reply (header and data).
func AppendOptReply(b []byte, opt, typ uint32, data []byte) []byte {
	b = binary.BigEndian.AppendUint64(b, MagicOptReply)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, typ)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

// ReadOptReply reads an option reply header.
func ReadOptReply(r io.Reader) (OptReply, error) {
	var b [OptReplyHeaderSize]byte
	if _, err := io.ReadFull(r, b[:]); err != nil {
		return OptReply{}, err
	}
	if m := binary.BigEndian.Uint64(b[:]); m != MagicOptReply {
		return OptReply{}, protocolError("option reply magic %#x", m)
	}
	return OptReply{Option: binary.BigEndian.Uint32(b[8:]), Type: binary.BigEndian.Uint32(b[12:]),
		Length: binary.BigEndian.Uint32(b[16:])}, nil
}

// Request is a transmission request, compact or extended. Length is the
// payload length of a write (and of any request with CmdFlagPayloadLen),
// else the effect length.
type Request struct {
	Flags  uint16
	Type   uint16
	Cookie uint64
	Offset uint64
	Length uint64
}

// Request header sizes.
const (
	RequestSize         = 28
	ExtendedRequestSize = 32
)

// DecodeRequest decodes a request header from b (RequestSize bytes,
// or ExtendedRequestSize with extended headers).
func DecodeRequest(b []byte, extended bool) (Request, error) {
	m := binary.BigEndian.Uint32(b)
	var r Request
	r.Flags = binary.BigEndian.Uint16(b[4:])
	r.Type = binary.BigEndian.Uint16(b[6:])
	r.Cookie = binary.BigEndian.Uint64(b[8:])
	r.Offset = binary.BigEndian.Uint64(b[16:])
	switch {
	case extended && m == MagicExtendedRequest:
		r.Length = binary.BigEndian.Uint64(b[24:])
	case !extended && m == MagicRequest:
		r.Length = uint64(binary.BigEndian.Uint32(b[24:]))
	default:
		return Request{}, protocolError("request magic %#x", m)
	}
	return r, nil
}

// AppendRequest appends a request header.
func AppendRequest(b []byte, r Request, extended bool) []byte {
	if extended {
		b = binary.BigEndian.AppendUint32(b, MagicExtendedRequest)
	} else {
		b = binary.BigEndian.AppendUint32(b, MagicRequest)
	}
	b = binary.BigEndian.AppendUint16(b, r.Flags)
	b = binary.BigEndian.AppendUint16(b, r.Type)
	b = binary.BigEndian.AppendUint64(b, r.Cookie)
	b = binary.BigEndian.AppendUint64(b, r.Offset)
	if extended {
		return binary.BigEndian.AppendUint64(b, r.Length)
	}
	return binary.BigEndian.AppendUint32(b, uint32(r.Length))
}

// Reply header sizes.
const (
	SimpleReplySize     = 16
	StructuredReplySize = 20
	ExtendedReplySize   = 32
)

// AppendSimpleReply appends a simple reply header.
func AppendSimpleReply(b []byte, errno uint32, cookie uint64) []byte {
	b = binary.BigEndian.AppendUint32(b, MagicSimpleReply)
	b = binary.BigEndian.AppendUint32(b, errno)
	return binary.BigEndian.AppendUint64(b, cookie)
}

// Chunk is a structured or extended reply chunk's header. Offset is the
// request's offset (extended replies only carry it).
type Chunk struct {
	Flags  uint16
	Type   uint16
	Cookie uint64
	Offset uint64
	Length uint64
}

// AppendChunk appends a structured (or, extended, an extended) reply
// chunk header.
func AppendChunk(b []byte, c Chunk, extended bool) []byte {
	if extended {
		b = binary.BigEndian.AppendUint32(b, MagicExtendedReply)
	} else {
		b = binary.BigEndian.AppendUint32(b, MagicStructuredReply)
	}
	b = binary.BigEndian.AppendUint16(b, c.Flags)
	b = binary.BigEndian.AppendUint16(b, c.Type)
	b = binary.BigEndian.AppendUint64(b, c.Cookie)
	if extended {
		b = binary.BigEndian.AppendUint64(b, c.Offset)
		return binary.BigEndian.AppendUint64(b, c.Length)
	}
	return binary.BigEndian.AppendUint32(b, uint32(c.Length))
}

// Reply is a decoded reply header of any kind: a simple reply (Simple
// set, Errno its error) or a chunk.
type Reply struct {
	Simple bool
	Errno  uint32 // simple replies
	Chunk         // structured and extended replies
}

// ReadReply reads the next reply header. Without extended headers the
// magic tells a simple reply from a structured chunk; with them every
// reply is an extended chunk.
func ReadReply(r io.Reader, extended bool) (Reply, error) {
	var b [ExtendedReplySize]byte
	if _, err := io.ReadFull(r, b[:4]); err != nil {
		return Reply{}, err
	}
	m := binary.BigEndian.Uint32(b[:])
	switch {
	case m == MagicSimpleReply && !extended:
		if _, err := io.ReadFull(r, b[4:SimpleReplySize]); err != nil {
			return Reply{}, err
		}
		return Reply{Simple: true, Errno: binary.BigEndian.Uint32(b[4:]), Chunk: Chunk{Cookie: binary.BigEndian.Uint64(b[8:])}}, nil
	case m == MagicStructuredReply && !extended:
		if _, err := io.ReadFull(r, b[4:StructuredReplySize]); err != nil {
			return Reply{}, err
		}
		return Reply{Chunk: Chunk{Flags: binary.BigEndian.Uint16(b[4:]), Type: binary.BigEndian.Uint16(b[6:]),
			Cookie: binary.BigEndian.Uint64(b[8:]), Length: uint64(binary.BigEndian.Uint32(b[16:]))}}, nil
	case m == MagicExtendedReply && extended:
		if _, err := io.ReadFull(r, b[4:ExtendedReplySize]); err != nil {
			return Reply{}, err
		}
		return Reply{Chunk: Chunk{Flags: binary.BigEndian.Uint16(b[4:]), Type: binary.BigEndian.Uint16(b[6:]),
			Cookie: binary.BigEndian.Uint64(b[8:]), Offset: binary.BigEndian.Uint64(b[16:]),
			Length: binary.BigEndian.Uint64(b[24:])}}, nil
	}
	return Reply{}, protocolError("reply magic %#x", m)
}

// AppendString appends a 32-bit length and the string.
func AppendString(b []byte, s string) []byte {
	b = binary.BigEndian.AppendUint32(b, uint32(len(s)))
	return append(b, s...)
}

// ReadString takes a 32-bit length and that many bytes from the front of
// b, returning the string and the rest; it fails when b is too short or
// the string is longer than MaxStringLen.
func ReadString(b []byte) (string, []byte, error) {
	if len(b) < 4 {
		return "", nil, protocolError("string length cut short")
	}
	n := binary.BigEndian.Uint32(b)
	if n > MaxStringLen {
		return "", nil, protocolError("string of %d bytes, over the limit of %d", n, MaxStringLen)
	}
	if uint64(len(b)-4) < uint64(n) {
		return "", nil, protocolError("string of %d bytes in %d", n, len(b)-4)
	}
	return string(b[4 : 4+n]), b[4+n:], nil
}
