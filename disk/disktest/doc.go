// Package disktest is the conformance suite that every disk.Image must
// pass (drivers directly, exports through a client), and a plain byte
// model of a disk for differential tests.
//
// A driver's test calls Run with a function that opens a fresh image and
// Options saying what to expect of it; Run checks sizes, reads against the
// expected content or against themselves, parallel reads and writes,
// round trips, Discard and WriteZeroes, the extent map, range checks, and
// behaviour after Close. RandomOps applies the same seeded random
// operations to an image and to a Model and compares every read.
//
// # Concurrency
//
// Model is safe for concurrent use. Run starts goroutines of its own and
// so, run under -race, also checks the image for data races.
package disktest
