// Package report renders what imgloop's info and map commands print, in
// qemu-img's human and JSON formats (QEMU 7.2), so that scripts written
// for qemu-img keep working and qemu-img's output can serve as the test
// oracle.
//
// QEMU prints JSON objects (and the "Format specific information" block)
// in the iteration order of its QDict hash table, not in insertion order;
// this package reproduces that order (see qdict.go) so its output matches
// qemu-img's text.
//
// # Errors
//
// Writers return the first error of the io.Writer; WriteMapHuman also
// refuses, as qemu-img does, data extents without a host offset
// (compressed or encrypted clusters), which its format cannot show.
package report
