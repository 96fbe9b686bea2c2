package disktest

// Range arithmetic shared by the suite and RandomOps.

// alignUp and alignDown round x to a multiple of a.
func alignUp(x, a int64) int64   { return (x + a - 1) / a * a }
func alignDown(x, a int64) int64 { return x / a * a }

// discardSpans returns, for a Discard of [off, off+n) on a disk of size
// bytes with units of align bytes, the whole units [a, b) the contract
// deallocates and the span [ea, eb) that may or may not be (the disk's
// last unit when it is partial and the range covers it from its start to
// the end of the disk: a driver may count it as whole, as QEMU does, or
// leave it). Everything else in the range must read as before.
func discardSpans(off, n, size, align int64) (a, b, ea, eb int64) {
	end := off + n
	a, b = alignUp(off, align), alignDown(end, align)
	if a > b {
		a, b = off, off
	}
	if last := alignDown(size, align); end == size && last < size && off <= last {
		ea, eb = last, size
		b = min(b, last)
		a = min(a, b)
	}
	return a, b, ea, eb
}

// nonZero returns the index of the first non-zero byte of b, or -1.
func nonZero(b []byte) int {
	for i, c := range b {
		if c != 0 {
			return i
		}
	}
	return -1
}
