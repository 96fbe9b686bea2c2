package report

import (
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/imgloop/imgloop/disk"
)

// Image is what `imgloop info` reports: the driver's description plus the
// facts about the host file that qemu-img info adds.
type Image struct {
	disk.Info
	// Filename is the image's name as the user gave it.
	Filename string
	// ActualSize is the space allocated on the host ("actual-size"),
	// -1 if unknown.
	ActualSize int64
}

// WriteInfoJSON writes img as `qemu-img info --output=json` does.
func WriteInfoJSON(w io.Writer, img Image) error {
	v, err := infoValue(img)
	if err != nil {
		return err
	}
	if err := writeJSON(w, v); err != nil {
		return err
	}
	_, err = io.WriteString(w, "\n")
	return err
}

func infoValue(img Image) (*value, error) {
	v, err := toValue(img.Info)
	if err != nil {
		return nil, fmt.Errorf("report: encoding info: %w", err)
	}
	v.set("filename", scalar(img.Filename))
	if img.ActualSize >= 0 {
		v.set("actual-size", scalar(img.ActualSize))
	}
	return v, nil
}

// WriteInfoHuman writes img as `qemu-img info` does (bdrv_image_info_dump).
func WriteInfoHuman(w io.Writer, img Image) error {
	var b strings.Builder
	diskSize := "unavailable"
	if img.ActualSize >= 0 {
		diskSize = Size(uint64(img.ActualSize))
	}
	fmt.Fprintf(&b, "image: %s\nfile format: %s\nvirtual size: %s (%d bytes)\ndisk size: %s\n",
		img.Filename, img.Format, Size(uint64(img.VirtualSize)), img.VirtualSize, diskSize)
	if img.ClusterSize != 0 {
		fmt.Fprintf(&b, "cluster_size: %d\n", img.ClusterSize)
	}
	if img.DirtyFlag {
		b.WriteString("cleanly shut down: no\n")
	}
	if img.BackingFilename != "" {
		fmt.Fprintf(&b, "backing file: %s", img.BackingFilename)
		switch img.FullBackingFilename {
		case "":
			b.WriteString(" (cannot determine actual path)")
		case img.BackingFilename:
		default:
			fmt.Fprintf(&b, " (actual path: %s)", img.FullBackingFilename)
		}
		b.WriteString("\n")
		if img.BackingFormat != "" {
			fmt.Fprintf(&b, "backing file format: %s\n", img.BackingFormat)
		}
	}
	if len(img.Snapshots) > 0 {
		b.WriteString("Snapshot list:\n")
		fmt.Fprintf(&b, "%-10s%-17s%8s%20s%13s%11s\n", "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT")
		for _, s := range img.Snapshots {
			b.WriteString(SnapshotLine(s))
			b.WriteString("\n")
		}
	}
	if fs := img.FormatSpecific; fs != nil && fs.Data != nil {
		v, err := toValue(fs.Data)
		if err != nil {
			return fmt.Errorf("report: encoding format specific data: %w", err)
		}
		b.WriteString("Format specific information:\n")
		dumpHuman(&b, v, 1)
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// SnapshotLine formats one row of qemu-img's snapshot table
// (bdrv_snapshot_dump), dates in local time.
func SnapshotLine(s disk.Snapshot) string {
	date := time.Unix(s.DateSec, 0).Format("2006-01-02 15:04:05")
	clockNsec := s.VMClockSec*1_000_000_000 + s.VMClockNsec
	secs := clockNsec / 1_000_000_000
	clock := fmt.Sprintf("%02d:%02d:%02d.%03d", secs/3600, (secs/60)%60, secs%60, (clockNsec/1_000_000)%1000)
	icount := ""
	if s.ICount != nil {
		icount = fmt.Sprint(*s.ICount)
	}
	return fmt.Sprintf("%-9s %-16s %8s%20s%13s%11s", s.ID, s.Name, Size(s.VMStateSize), date, clock, icount)
}
