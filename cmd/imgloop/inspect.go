package main

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"

	"github.com/imgloop/imgloop/disk"
)

// writeHeader prints the header fields of img (a disk.HeaderFielder: the
// QCOW2 header), one "name: value" per line (the seed's debugfs "header"
// file).
func writeHeader(w io.Writer, img disk.Image) error {
	h, ok := img.(disk.HeaderFielder)
	if !ok {
		return fmt.Errorf("--header: not a qcow2 image")
	}
	var b strings.Builder
	for _, f := range h.HeaderFields() {
		fmt.Fprintf(&b, "%s: %s\n", f.Name, f.Value)
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// writeLocation prints where byte off of img is stored, for images that
// can tell (a disk.Locator: qcow2) (the seed's debugfs "offset" file). It
// reports false, and prints nothing, for images of other formats.
func writeLocation(w io.Writer, img disk.Image, off int64, asJSON bool) (bool, error) {
	l, ok := img.(disk.Locator)
	if !ok {
		return false, nil
	}
	loc, err := l.Locate(off)
	if err != nil {
		return true, err
	}
	if asJSON {
		b, err := json.MarshalIndent(struct {
			Offset           int64  `json:"offset"`
			ClusterType      string `json:"cluster-type"`
			ClusterOffset    int64  `json:"cluster-offset"`
			OffsetInCluster  int64  `json:"offset-in-cluster"`
			CompressedLength int64  `json:"compressed-length,omitempty"`
			Depth            int    `json:"depth"`
			File             string `json:"file"`
		}{loc.Offset, loc.ClusterType, loc.HostClusterOffset, loc.OffsetInCluster, loc.CompressedLength, loc.Depth, loc.File}, "", "    ")
		if err != nil {
			return true, err
		}
		_, err = fmt.Fprintf(w, "%s\n", b)
		return true, err
	}
	var b strings.Builder
	fmt.Fprintf(&b, "offset: %d\ncluster_type: %s\n", loc.Offset, loc.ClusterType)
	if loc.HostClusterOffset >= 0 {
		fmt.Fprintf(&b, "cluster_offset: %d\n", loc.HostClusterOffset)
	} else {
		b.WriteString("cluster_offset: none\n")
	}
	fmt.Fprintf(&b, "offset_in_cluster: %d\n", loc.OffsetInCluster)
	if loc.CompressedLength > 0 {
		fmt.Fprintf(&b, "compressed_length: %d\n", loc.CompressedLength)
	}
	fmt.Fprintf(&b, "depth: %d\nfile: %s\n", loc.Depth, loc.File)
	_, err = io.WriteString(w, b.String())
	return true, err
}
