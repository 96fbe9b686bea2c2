// Package disktest is the conformance suite that every disk.Image must
// pass (drivers directly, exports through a client), and a plain byte
// model of a disk for differential tests.
//
// A driver's test calls Run with a function that opens a fresh image and
// Options saying what to expect of it. Run checks sizes, reads against the
// expected content or against themselves, range checks, round trips,
// WriteZeroes, the extent map and behaviour after Close, and the export
// API of package disk: block limits (disk.LimitsOf) and honest
// capabilities (disk.CapabilitiesOf) held to the image's behaviour, a
// read-only image refusing every write-like call, fast zero
// (disk.ZeroFast, disk.ErrSlowZero), forced unit access, the discard
// contract (whole units only, never allocating), resize notification and
// the context-aware helpers. A case for a capability the image does not
// claim skips, saying so. RandomOps applies the same seeded random
// operations to an image and to a Model and compares every read.
//
// # Concurrency
//
// Model is safe for concurrent use. Run starts goroutines of its own and
// so, run under -race, also checks the image for data races; its
// concurrency cases hold the image to disk.Image's rules: parallel writes
// over an area large enough to grow a driver's metadata
// (Options.ParallelSize), reads racing writes, write-zeroes and discards
// that must never return another range's data, Resize and Close with
// calls in flight.
package disktest
