// Package convert copies the virtual disk of a disk.Image into a raw,
// sparse destination: the engine behind `imgloop convert -O raw`.
//
// Raw walks the source's allocation map (disk.Extents), skips ranges the
// source reports as zero, reads the rest in aligned chunks on several
// goroutines, and writes only the parts of each chunk that are not all
// zeros (at SparseSize granularity, as `qemu-img convert -S` does), so the
// destination keeps holes wherever the source reads as zeros.
//
// Parallel ReadAt calls are what make this fast: a compressed qcow2 source
// inflates each cluster inside its ReadAt, so N workers inflate N chunks at
// once. WriteBehind, a destination wrapper for files, starts each written
// range's write-back at once, so that the device works during the copy
// rather than all in the final fsync.
//
// # Concurrency
//
// Raw calls src.ReadAt and dst.WriteAt from Options.Workers goroutines at
// once, on non-overlapping ranges; both must be safe for that (disk.Image
// always is, *os.File is). Options.Progress is called from those goroutines
// too.
//
// # Errors
//
// Raw returns the first error of the map walk, of a read or of a write,
// wrapped with the offset it happened at, or ctx.Err() when ctx is
// cancelled first. Once an error occurs the remaining work is abandoned;
// the destination then holds a partial copy.
package convert
