// Package client is an NBD client: it connects to a server speaking the
// network block device protocol (doc/proto.md of the NetworkBlockDevice/nbd
// repository, with the extended headers of its extension-ext-header
// branch) and presents the export as a disk.Image, so that a remote disk
// is used as a local one (imgloop's own server in export/nbd, qemu-nbd,
// nbdkit, nbd-server).
//
// Dial (or New, over a connection made elsewhere) runs the fixed
// newstyle handshake: NBD_OPT_STARTTLS when Options.TLS is set,
// NBD_OPT_EXTENDED_HEADERS or NBD_OPT_STRUCTURED_REPLY as asked (falling
// back from the first to the second, and from the second to simple
// replies, when the server refuses), NBD_OPT_SET_META_CONTEXT for
// Options.MetaContexts, then NBD_OPT_GO asking for the export's name,
// description and block sizes (NBD_OPT_EXPORT_NAME when the server does
// not know NBD_OPT_GO). List asks a server for its exports.
//
// A Conn sends NBD_CMD_READ, WRITE (+FUA), FLUSH, TRIM (+FUA),
// WRITE_ZEROES (+NO_HOLE, FAST_ZERO, FUA), CACHE and BLOCK_STATUS
// (+REQ_ONE), splitting requests larger than the server's maximum
// payload, and NBD_CMD_DISC on Close. It implements disk.Image and the
// optional interfaces of package disk (Limiter, Capabler, FUAWriter,
// Discarder, ZeroWriter, Mapper): Limits come from NBD_INFO_BLOCK_SIZE,
// Capabilities from the transmission flags, and Map from the
// base:allocation (and qemu:allocation-depth) metadata contexts.
// RawRequest sends any request as given, for tests of servers.
//
// # Concurrency
//
// A Conn is safe for concurrent use. Requests from any number of
// goroutines are in flight at once; one goroutine reads the replies and
// hands each to the request whose cookie it carries, in whatever order
// the server answers. A request whose context is cancelled returns the
// context's error at once; its reply, when it comes, is read and
// dropped, and the connection goes on serving the others. A Conn never
// keeps a caller's buffer after a call returns.
//
// # Errors
//
// An NBD error reply is an *Error carrying the NBD error value and the
// server's message. It matches disk.ErrReadOnly (NBD_EPERM),
// disk.ErrOutOfRange (NBD_EINVAL or NBD_ENOSPC for a request past the
// end), disk.ErrSlowZero (NBD_ENOTSUP to NBD_CMD_FLAG_FAST_ZERO),
// disk.ErrNotSupported (other NBD_ENOTSUP), disk.ErrClosed
// (NBD_ESHUTDOWN) and the matching syscall.Errno values. A refused
// option is an *OptionError (matching ErrTLSRequired, ErrUnknownExport
// or ErrOptionUnsupported where those apply). A server breaking the
// protocol ends the connection with an error matching ErrProtocol;
// every request then fails with an error matching ErrDisconnected, as
// it does when the connection drops. Calls after Close return
// disk.ErrClosed.
//
// # Security
//
// Servers are untrusted. Every length read from the connection is
// bounded before anything is allocated for it: option replies by
// wire.MaxOptReplyLen, the replies to one option by maxOptReplies, a
// data chunk by the request it answers, block status chunks by the
// spec's 2^20 descriptors, error chunks by maxErrorChunk. Read chunks
// must lie inside their request and cover it exactly once; block status
// descriptors must make progress and name a negotiated context; a reply
// to an unknown cookie ends the connection. Each breach is a clear
// error, never a panic, a hang or an allocation of the server's
// choosing.
package client
