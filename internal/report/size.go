package report

import (
	"fmt"
	"math"
)

// Size formats n bytes as QEMU's size_to_str does ("1 GiB", "196 KiB",
// "0.977 KiB"): three significant digits, switching to the next binary
// unit once the number would reach 1000.
func Size(n uint64) string {
	suffixes := []string{"", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"}
	_, exp := math.Frexp(float64(n) / (1000.0 / 1024.0))
	i := max(0, (exp-1)/10)
	i = min(i, len(suffixes)-1)
	div := float64(uint64(1) << (10 * i))
	return fmt.Sprintf("%.3g %sB", float64(n)/div, suffixes[i])
}
