package wire

import (
	"encoding/binary"
	"fmt"
)

// The payloads of option requests and replies and of reply chunks, for
// the server and the client alike. Decoders take the whole payload, whose
// length the caller has bounded, and fail with an error matching
// ErrProtocol when it is malformed.

// AppendInfoRequest appends the data of an NBD_OPT_INFO or NBD_OPT_GO
// request: the export name and the information types asked for.
func AppendInfoRequest(b []byte, name string, infos []uint16) []byte {
	b = AppendString(b, name)
	b = binary.BigEndian.AppendUint16(b, uint16(len(infos)))
	for _, i := range infos {
		b = binary.BigEndian.AppendUint16(b, i)
	}
	return b
}

// DecodeInfoRequest decodes the data of an NBD_OPT_INFO or NBD_OPT_GO
// request.
func DecodeInfoRequest(p []byte) (name string, infos []uint16, err error) {
	name, rest, err := ReadString(p)
	if err != nil {
		return "", nil, err
	}
	if len(rest) < 2 {
		return "", nil, protocolError("info request: no count of information requests")
	}
	n := int(binary.BigEndian.Uint16(rest))
	rest = rest[2:]
	if len(rest) != 2*n {
		return "", nil, protocolError("info request: %d information requests in %d bytes", n, len(rest))
	}
	for i := 0; i < n; i++ {
		infos = append(infos, binary.BigEndian.Uint16(rest[2*i:]))
	}
	return name, infos, nil
}

// AppendMetaContextRequest appends the data of an
// NBD_OPT_LIST_META_CONTEXT or NBD_OPT_SET_META_CONTEXT request.
func AppendMetaContextRequest(b []byte, name string, queries []string) []byte {
	b = AppendString(b, name)
	b = binary.BigEndian.AppendUint32(b, uint32(len(queries)))
	for _, q := range queries {
		b = AppendString(b, q)
	}
	return b
}

// DecodeMetaContextRequest decodes the data of an
// NBD_OPT_LIST_META_CONTEXT or NBD_OPT_SET_META_CONTEXT request.
func DecodeMetaContextRequest(p []byte) (name string, queries []string, err error) {
	name, rest, err := ReadString(p)
	if err != nil {
		return "", nil, err
	}
	if len(rest) < 4 {
		return "", nil, protocolError("meta context request: no count of queries")
	}
	n := binary.BigEndian.Uint32(rest)
	rest = rest[4:]
	// Each query takes at least its 4-byte length: the count is bounded
	// by the data before anything is allocated for it.
	if uint64(n)*4 > uint64(len(rest)) {
		return "", nil, protocolError("meta context request: %d queries in %d bytes", n, len(rest))
	}
	for i := uint32(0); i < n; i++ {
		var q string
		if q, rest, err = ReadString(rest); err != nil {
			return "", nil, err
		}
		queries = append(queries, q)
	}
	if len(rest) != 0 {
		return "", nil, protocolError("meta context request: %d bytes after the queries", len(rest))
	}
	return name, queries, nil
}

// MaxOptReplyLen bounds the data of any option reply a client reads: the
// longest, NBD_REP_SERVER, holds a name and a description, each a string
// of at most MaxStringLen bytes.
const MaxOptReplyLen = 4 + 2*MaxStringLen

// AppendRepServer appends the data of an NBD_REP_SERVER reply.
func AppendRepServer(b []byte, name, description string) []byte {
	return append(AppendString(b, name), description...)
}

// DecodeRepServer decodes the data of an NBD_REP_SERVER reply.
func DecodeRepServer(p []byte) (name, description string, err error) {
	name, rest, err := ReadString(p)
	if err != nil {
		return "", "", fmt.Errorf("NBD_REP_SERVER: %w", err)
	}
	if len(rest) > MaxStringLen {
		return "", "", protocolError("NBD_REP_SERVER: description of %d bytes", len(rest))
	}
	return name, string(rest), nil
}

// AppendRepMetaContext appends the data of an NBD_REP_META_CONTEXT reply.
func AppendRepMetaContext(b []byte, id uint32, name string) []byte {
	b = binary.BigEndian.AppendUint32(b, id)
	return append(b, name...)
}

// DecodeRepMetaContext decodes the data of an NBD_REP_META_CONTEXT reply.
func DecodeRepMetaContext(p []byte) (id uint32, name string, err error) {
	if len(p) < 4 {
		return 0, "", protocolError("NBD_REP_META_CONTEXT of %d bytes", len(p))
	}
	if len(p)-4 > MaxStringLen {
		return 0, "", protocolError("NBD_REP_META_CONTEXT: name of %d bytes", len(p)-4)
	}
	return binary.BigEndian.Uint32(p), string(p[4:]), nil
}

// BlockSize is the payload of NBD_INFO_BLOCK_SIZE: the export's size
// constraints ("Size constraints" in the spec).
type BlockSize struct {
	Minimum   uint32 // minimum block size: a power of two, at most 64 KiB
	Preferred uint32 // preferred block size: a power of two, at least max(Minimum, 512)
	Maximum   uint32 // maximum payload size: at least Preferred (0xffffffff: no limit)
}

// Check reports whether the sizes keep the spec's rules.
func (s BlockSize) Check() error {
	pow2 := func(v uint32) bool { return v != 0 && v&(v-1) == 0 }
	switch {
	case !pow2(s.Minimum) || s.Minimum > 64<<10:
		return protocolError("minimum block size %d is not a power of two up to 65536", s.Minimum)
	case !pow2(s.Preferred) || s.Preferred < max(s.Minimum, 512):
		return protocolError("preferred block size %d is not a power of two at least max(minimum %d, 512)", s.Preferred, s.Minimum)
	case s.Maximum < s.Preferred:
		return protocolError("maximum payload %d is less than the preferred block size %d", s.Maximum, s.Preferred)
	}
	return nil
}

// Info payload lengths (the 2-byte type included).
const (
	InfoExportLen    = 12
	InfoBlockSizeLen = 14
)

// AppendInfoExport appends the data of an NBD_REP_INFO reply of type
// NBD_INFO_EXPORT.
func AppendInfoExport(b []byte, size uint64, flags uint16) []byte {
	b = binary.BigEndian.AppendUint16(b, InfoExport)
	b = binary.BigEndian.AppendUint64(b, size)
	return binary.BigEndian.AppendUint16(b, flags)
}

// AppendInfoString appends the data of an NBD_REP_INFO reply of type
// NBD_INFO_NAME or NBD_INFO_DESCRIPTION.
func AppendInfoString(b []byte, typ uint16, s string) []byte {
	b = binary.BigEndian.AppendUint16(b, typ)
	return append(b, s...)
}

// AppendInfoBlockSize appends the data of an NBD_REP_INFO reply of type
// NBD_INFO_BLOCK_SIZE.
func AppendInfoBlockSize(b []byte, s BlockSize) []byte {
	b = binary.BigEndian.AppendUint16(b, InfoBlockSize)
	b = binary.BigEndian.AppendUint32(b, s.Minimum)
	b = binary.BigEndian.AppendUint32(b, s.Preferred)
	return binary.BigEndian.AppendUint32(b, s.Maximum)
}

// Info is a decoded NBD_REP_INFO reply: Type says which fields are set.
// Types the spec does not define are returned with no field set.
type Info struct {
	Type      uint16
	Size      uint64    // NBD_INFO_EXPORT
	Flags     uint16    // NBD_INFO_EXPORT: the transmission flags
	Text      string    // NBD_INFO_NAME, NBD_INFO_DESCRIPTION
	BlockSize BlockSize // NBD_INFO_BLOCK_SIZE (not checked: see BlockSize.Check)
}

// DecodeInfo decodes the data of an NBD_REP_INFO reply.
func DecodeInfo(p []byte) (Info, error) {
	if len(p) < 2 {
		return Info{}, protocolError("NBD_REP_INFO of %d bytes", len(p))
	}
	i := Info{Type: binary.BigEndian.Uint16(p)}
	switch i.Type {
	case InfoExport:
		if len(p) != InfoExportLen {
			return Info{}, protocolError("NBD_INFO_EXPORT of %d bytes, want %d", len(p), InfoExportLen)
		}
		i.Size, i.Flags = binary.BigEndian.Uint64(p[2:]), binary.BigEndian.Uint16(p[10:])
	case InfoName, InfoDescription:
		if len(p)-2 > MaxStringLen {
			return Info{}, protocolError("NBD_REP_INFO type %d: string of %d bytes", i.Type, len(p)-2)
		}
		i.Text = string(p[2:])
	case InfoBlockSize:
		if len(p) != InfoBlockSizeLen {
			return Info{}, protocolError("NBD_INFO_BLOCK_SIZE of %d bytes, want %d", len(p), InfoBlockSizeLen)
		}
		i.BlockSize = BlockSize{binary.BigEndian.Uint32(p[2:]), binary.BigEndian.Uint32(p[6:]), binary.BigEndian.Uint32(p[10:])}
	}
	return i, nil
}

// Fixed payload lengths of reply chunks.
const (
	OffsetDataHeaderLen   = 8  // NBD_REPLY_TYPE_OFFSET_DATA: the offset before the data
	OffsetHoleLen         = 12 // NBD_REPLY_TYPE_OFFSET_HOLE
	ErrorHeaderLen        = 6  // error chunks: error and message length
	ErrorOffsetLen        = 14 // NBD_REPLY_TYPE_ERROR_OFFSET without its message
	BlockStatusHeaderLen  = 4  // NBD_REPLY_TYPE_BLOCK_STATUS: the context ID
	BlockStatusExtHeadLen = 8  // NBD_REPLY_TYPE_BLOCK_STATUS_EXT: context ID and count
	DescriptorLen         = 8  // a descriptor of NBD_REPLY_TYPE_BLOCK_STATUS
	DescriptorExtLen      = 16 // a descriptor of NBD_REPLY_TYPE_BLOCK_STATUS_EXT
)

// AppendOffsetHole appends the payload of an NBD_REPLY_TYPE_OFFSET_HOLE
// chunk.
func AppendOffsetHole(b []byte, off uint64, size uint32) []byte {
	b = binary.BigEndian.AppendUint64(b, off)
	return binary.BigEndian.AppendUint32(b, size)
}

// AppendErrorPayload appends the payload of an error chunk: the error
// and the message (cut to MaxStringLen bytes); the caller appends the
// offset of an NBD_REPLY_TYPE_ERROR_OFFSET.
func AppendErrorPayload(b []byte, errno uint32, msg string) []byte {
	if len(msg) > MaxStringLen {
		msg = msg[:MaxStringLen]
	}
	b = binary.BigEndian.AppendUint32(b, errno)
	b = binary.BigEndian.AppendUint16(b, uint16(len(msg)))
	return append(b, msg...)
}

// DecodeErrorPayload decodes the start of an error chunk's payload,
// returning the error, the message and the fields after it.
func DecodeErrorPayload(p []byte) (errno uint32, msg string, rest []byte, err error) {
	if len(p) < ErrorHeaderLen {
		return 0, "", nil, protocolError("error chunk of %d bytes", len(p))
	}
	errno = binary.BigEndian.Uint32(p)
	n := int(binary.BigEndian.Uint16(p[4:]))
	if errno == 0 {
		return 0, "", nil, protocolError("error chunk with error 0")
	}
	if n > MaxStringLen || n > len(p)-ErrorHeaderLen {
		return 0, "", nil, protocolError("error chunk: message of %d bytes in %d", n, len(p)-ErrorHeaderLen)
	}
	return errno, string(p[ErrorHeaderLen : ErrorHeaderLen+n]), p[ErrorHeaderLen+n:], nil
}

// Descriptor is one block status descriptor: the length of an extent and
// its status flags (for base:allocation, StateHole and StateZero).
type Descriptor struct {
	Length uint64
	Status uint64
}

// AppendBlockStatus appends the payload of a block status chunk for
// context id: NBD_REPLY_TYPE_BLOCK_STATUS, or with extended headers
// NBD_REPLY_TYPE_BLOCK_STATUS_EXT. Compact descriptors keep the low 32
// bits of each length and status.
func AppendBlockStatus(b []byte, id uint32, ds []Descriptor, extended bool) []byte {
	b = binary.BigEndian.AppendUint32(b, id)
	if extended {
		b = binary.BigEndian.AppendUint32(b, uint32(len(ds)))
	}
	for _, d := range ds {
		if extended {
			b = binary.BigEndian.AppendUint64(b, d.Length)
			b = binary.BigEndian.AppendUint64(b, d.Status)
		} else {
			b = binary.BigEndian.AppendUint32(b, uint32(d.Length))
			b = binary.BigEndian.AppendUint32(b, uint32(d.Status))
		}
	}
	return b
}

// BlockStatusLen returns the payload length of a block status chunk of n
// descriptors.
func BlockStatusLen(n int, extended bool) uint64 {
	if extended {
		return BlockStatusExtHeadLen + DescriptorExtLen*uint64(n)
	}
	return BlockStatusHeaderLen + DescriptorLen*uint64(n)
}

// BlockStatusCount returns how many descriptors a block status chunk of
// payload length n holds, failing unless n is the length of a chunk of
// 1 to MaxBlockStatusExtents descriptors.
func BlockStatusCount(n uint64, extended bool) (int, error) {
	head, each := uint64(BlockStatusHeaderLen), uint64(DescriptorLen)
	if extended {
		head, each = BlockStatusExtHeadLen, DescriptorExtLen
	}
	if n < head+each || (n-head)%each != 0 {
		return 0, protocolError("block status chunk of %d bytes", n)
	}
	if k := (n - head) / each; k <= MaxBlockStatusExtents {
		return int(k), nil
	}
	return 0, protocolError("block status chunk of %d descriptors, over the limit of %d", (n-head)/each, MaxBlockStatusExtents)
}

// DecodeBlockStatus decodes a block status chunk's payload (its length
// checked by BlockStatusCount).
func DecodeBlockStatus(p []byte, extended bool) (id uint32, ds []Descriptor, err error) {
	k, err := BlockStatusCount(uint64(len(p)), extended)
	if err != nil {
		return 0, nil, err
	}
	id = binary.BigEndian.Uint32(p)
	ds = make([]Descriptor, k)
	if extended {
		if c := binary.BigEndian.Uint32(p[4:]); c != uint32(k) {
			return 0, nil, protocolError("block status chunk: descriptor count %d, but %d descriptors", c, k)
		}
		for i := range ds {
			q := p[BlockStatusExtHeadLen+DescriptorExtLen*i:]
			ds[i] = Descriptor{binary.BigEndian.Uint64(q), binary.BigEndian.Uint64(q[8:])}
		}
	} else {
		for i := range ds {
			q := p[BlockStatusHeaderLen+DescriptorLen*i:]
			ds[i] = Descriptor{uint64(binary.BigEndian.Uint32(q)), uint64(binary.BigEndian.Uint32(q[4:]))}
		}
	}
	for i, d := range ds {
		if d.Length == 0 {
			return 0, nil, protocolError("block status chunk: descriptor %d has length 0", i)
		}
	}
	return id, ds, nil
}

// Names of the commands and reply types, for messages.

// CmdName returns the spec's name of a command.
func CmdName(c uint16) string {
	switch c {
	case CmdRead:
		return "NBD_CMD_READ"
	case CmdWrite:
		return "NBD_CMD_WRITE"
	case CmdDisc:
		return "NBD_CMD_DISC"
	case CmdFlush:
		return "NBD_CMD_FLUSH"
	case CmdTrim:
		return "NBD_CMD_TRIM"
	case CmdCache:
		return "NBD_CMD_CACHE"
	case CmdWriteZeroes:
		return "NBD_CMD_WRITE_ZEROES"
	case CmdBlockStatus:
		return "NBD_CMD_BLOCK_STATUS"
	case CmdResize:
		return "NBD_CMD_RESIZE"
	}
	return fmt.Sprintf("command %d", c)
}

// OptName returns the spec's name of an option.
func OptName(o uint32) string {
	names := map[uint32]string{
		OptExportName: "NBD_OPT_EXPORT_NAME", OptAbort: "NBD_OPT_ABORT", OptList: "NBD_OPT_LIST",
		OptPeekExport: "NBD_OPT_PEEK_EXPORT", OptStartTLS: "NBD_OPT_STARTTLS", OptInfo: "NBD_OPT_INFO",
		OptGo: "NBD_OPT_GO", OptStructuredReply: "NBD_OPT_STRUCTURED_REPLY",
		OptListMetaContext: "NBD_OPT_LIST_META_CONTEXT", OptSetMetaContext: "NBD_OPT_SET_META_CONTEXT",
		OptExtendedHeaders: "NBD_OPT_EXTENDED_HEADERS",
	}
	if s, ok := names[o]; ok {
		return s
	}
	return fmt.Sprintf("option %d", o)
}

// RepName returns the spec's name of an option reply type.
func RepName(r uint32) string {
	names := map[uint32]string{
		RepAck: "NBD_REP_ACK", RepServer: "NBD_REP_SERVER", RepInfo: "NBD_REP_INFO",
		RepMetaContext: "NBD_REP_META_CONTEXT", RepErrUnsup: "NBD_REP_ERR_UNSUP",
		RepErrPolicy: "NBD_REP_ERR_POLICY", RepErrInvalid: "NBD_REP_ERR_INVALID",
		RepErrPlatform: "NBD_REP_ERR_PLATFORM", RepErrTLSReqd: "NBD_REP_ERR_TLS_REQD",
		RepErrUnknown: "NBD_REP_ERR_UNKNOWN", RepErrShutdown: "NBD_REP_ERR_SHUTDOWN",
		RepErrBlockSizeReqd: "NBD_REP_ERR_BLOCK_SIZE_REQD", RepErrTooBig: "NBD_REP_ERR_TOO_BIG",
		RepErrExtHeaderReqd: "NBD_REP_ERR_EXT_HEADER_REQD",
	}
	if s, ok := names[r]; ok {
		return s
	}
	if r&RepFlagError != 0 {
		return fmt.Sprintf("error reply %d", r&^RepFlagError)
	}
	return fmt.Sprintf("reply type %d", r)
}
