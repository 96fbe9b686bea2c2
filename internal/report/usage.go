package report

import (
	"fmt"
	"os"
	"syscall"

	"github.com/imgloop/imgloop/disk"
)

// DiskUsage returns the bytes allocated on the host for the named files
// (st_blocks*512, summed), what qemu-img info calls "actual-size".
// Errors: the *fs.PathError of stat.
func DiskUsage(paths ...string) (int64, error) {
	var total int64
	for _, p := range paths {
		fi, err := os.Stat(p)
		if err != nil {
			return 0, err
		}
		st, ok := fi.Sys().(*syscall.Stat_t)
		if !ok {
			return 0, fmt.Errorf("report: %s: no block count", p)
		}
		total += st.Blocks * 512
	}
	return total, nil
}

// DataFile returns the external data file name from a format-specific
// object ("data-file", as qcow2 reports it), or "" if there is none.
func DataFile(fs *disk.FormatSpecific) string {
	if fs == nil || fs.Data == nil {
		return ""
	}
	v, err := toValue(fs.Data)
	if err != nil || !v.isObject() {
		return ""
	}
	if x := v.get("data-file"); x != nil && x.raw != "" {
		return x.text()
	}
	return ""
}
