// Package convert copies the virtual disk of a disk.Image into a raw,
// sparse destination (Raw: `imgloop convert -O raw`) or into an image
// written cluster by cluster in order, such as a qcow2.StreamWriter
// (Clusters: `imgloop convert -O qcow2`).
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
// Clusters classifies each destination cluster from the source's map
// (left unallocated, zero cluster, or read), reads and compresses the read
// ones on several goroutines, and hands them to the writer in order. With
// Options.Backed it follows qemu-img convert -B: what the source's top
// layer leaves to its backing file stays unallocated, and zeros it defines
// become zero clusters.
//
// # Concurrency
//
// Raw calls src.ReadAt and dst.WriteAt from Options.Workers goroutines at
// once, on non-overlapping ranges; both must be safe for that (disk.Image
// always is, *os.File is). Clusters calls src.ReadAt and the writer's
// Compress from Options.Workers goroutines, and its other methods from one
// goroutine. Options.Progress is called from several goroutines.
//
// # Errors
//
// Raw returns the first error of the map walk, of a read or of a write,
// wrapped with the offset it happened at, or ctx.Err() when ctx is
// cancelled first; Clusters returns those of the writer too. Once an error
// occurs the remaining work is abandoned; the destination then holds a
// partial copy (a qcow2.StreamWriter not closed has no header: the caller
// removes the file).
package convert
