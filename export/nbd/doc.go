// Package nbd serves disk images over the network block device protocol
// (doc/proto.md of the NetworkBlockDevice/nbd repository, with the
// extended headers of its extension-ext-header branch), to QEMU, libnbd
// (nbdinfo, nbdcopy, nbdfuse), the kernel's nbd-client and
// export/nbd/client. It sees only disk.Image.
//
// A Server serves one or more named Exports on any number of listeners
// (unix sockets, TCP, systemd's sockets); all connections to an export
// share its one open image, so a flush on any connection makes every
// completed write durable, and NBD_FLAG_CAN_MULTI_CONN is advertised.
//
// Handshake: fixed newstyle only, with NBD_OPT_EXPORT_NAME, ABORT, LIST,
// STARTTLS, INFO and GO (NBD_INFO_EXPORT, NAME, DESCRIPTION and
// BLOCK_SIZE from the image's disk.Limits), STRUCTURED_REPLY,
// EXTENDED_HEADERS, LIST_META_CONTEXT and SET_META_CONTEXT with the
// base:allocation and qemu:allocation-depth contexts (as qemu-nbd -A).
// Transmission: READ (sparse: NBD_REPLY_TYPE_OFFSET_HOLE chunks for
// ranges that read as zeros, unless NBD_CMD_FLAG_DF), WRITE (+FUA),
// DISC, FLUSH, TRIM (+FUA), WRITE_ZEROES (+NO_HOLE, FAST_ZERO, FUA),
// CACHE (accepted, no effect) and BLOCK_STATUS (+REQ_ONE). How each maps
// onto the disk package is in disk/export.go.
//
// # Concurrency
//
// A Server is safe for concurrent use. Each connection has one goroutine
// reading requests, workers serving them (as many as the requests in
// flight at once, kept for the connection) and one goroutine writing the
// replies as requests complete, out of order, batched into one system
// call when several complete together. Shutdown stops accepting, answers the
// requests in flight and closes the connections; closing the images is
// the caller's.
//
// # Errors
//
// Errors of the image map onto the protocol's values in one place
// (errno.go): disk.ErrReadOnly is NBD_EPERM, disk.ErrOutOfRange
// NBD_EINVAL (NBD_ENOSPC for writes), disk.ErrSlowZero NBD_ENOTSUP, and
// anything else NBD_EIO. With structured replies the error chunk
// carries the error's message.
//
// # Security
//
// Clients are untrusted. Every length read from a connection is bounded
// before anything is allocated for it: option data by wire.MaxOptionLen,
// strings by 4096 bytes, payloads by the advertised maximum (32 MiB);
// larger ones are refused (a write's payload is drained, not buffered)
// or end the connection. Memory stays bounded whatever clients do: the
// bytes of requests in flight are capped per connection and in total
// (Options.MaxConnBytes, MaxTotalBytes; each connection also has a
// 1 MiB reserve outside the total, so that clients holding the total
// cannot stop the others), and reaching a cap stops
// reading from the connection (backpressure) rather than refusing; the
// number of connections is capped too (Options.MaxClients). A client
// that does not read its replies is disconnected after
// Options.WriteTimeout, and a handshake must finish within
// Options.HandshakeTimeout, so that neither holds its share forever.
// With Options.TLSRequired, nothing but STARTTLS (and ABORT) is answered
// before TLS.
package nbd
