package report

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/imgloop/imgloop/disk"
)

// qcow2Specific mirrors the qcow2 driver's format-specific data in QAPI
// field order.
type qcow2Specific struct {
	Compat          string `json:"compat"`
	DataFile        string `json:"data-file,omitempty"`
	DataFileRaw     *bool  `json:"data-file-raw,omitempty"`
	ExtendedL2      bool   `json:"extended-l2"`
	LazyRefcounts   bool   `json:"lazy-refcounts"`
	Corrupt         bool   `json:"corrupt"`
	RefcountBits    int    `json:"refcount-bits"`
	CompressionType string `json:"compression-type"`
}

func sampleImage() Image {
	icount := uint64(0)
	return Image{
		Info: disk.Info{
			Format:              "qcow2",
			VirtualSize:         1 << 30,
			ClusterSize:         65536,
			BackingFilename:     "base.qcow2",
			FullBackingFilename: "base.qcow2",
			BackingFormat:       "qcow2",
			Snapshots: []disk.Snapshot{{
				ID: "1", Name: "snap1", DateSec: 1795654617, DateNsec: 488341000, ICount: &icount,
			}},
			FormatSpecific: &disk.FormatSpecific{Type: "qcow2", Data: qcow2Specific{
				Compat: "1.1", RefcountBits: 16, CompressionType: "zlib",
			}},
		},
		Filename:   "top.qcow2",
		ActualSize: 339968,
	}
}

// The expected texts are qemu-img 7.2's output for the same image.
const wantHuman = `image: top.qcow2
file format: qcow2
virtual size: 1 GiB (1073741824 bytes)
disk size: 332 KiB
cluster_size: 65536
backing file: base.qcow2
backing file format: qcow2
Snapshot list:
ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT
1         snap1                 0 B 2026-11-26 00:56:57 00:00:00.000          0
Format specific information:
    compat: 1.1
    compression type: zlib
    lazy refcounts: false
    refcount bits: 16
    corrupt: false
    extended l2: false
`

const wantJSON = `{
    "backing-filename-format": "qcow2",
    "snapshots": [
        {
            "icount": 0,
            "vm-clock-nsec": 0,
            "name": "snap1",
            "date-sec": 1795654617,
            "date-nsec": 488341000,
            "vm-clock-sec": 0,
            "id": "1",
            "vm-state-size": 0
        }
    ],
    "virtual-size": 1073741824,
    "filename": "top.qcow2",
    "cluster-size": 65536,
    "format": "qcow2",
    "actual-size": 339968,
    "format-specific": {
        "type": "qcow2",
        "data": {
            "compat": "1.1",
            "compression-type": "zlib",
            "lazy-refcounts": false,
            "refcount-bits": 16,
            "corrupt": false,
            "extended-l2": false
        }
    },
    "full-backing-filename": "base.qcow2",
    "backing-filename": "base.qcow2",
    "dirty-flag": false
}
`

func TestWriteInfo(t *testing.T) {
	time.Local = time.UTC
	raw := Image{Info: disk.Info{Format: "raw", VirtualSize: 1 << 20}, Filename: "r.img", ActualSize: 4096}
	unknown := raw
	unknown.ActualSize = -1
	dirty := raw
	dirty.DirtyFlag = true
	dirty.BackingFilename = "b"
	dirty.FullBackingFilename = "/x/b"
	nested := raw
	nested.FormatSpecific = &disk.FormatSpecific{Type: "t", Data: map[string]any{
		"bitmaps": []any{map[string]any{"name": "b0", "granularity": 65536}},
	}}
	tests := []struct {
		name      string
		img       Image
		json      bool
		want      string
		wantError bool
	}{
		{"qcow2 human", sampleImage(), false, wantHuman, false},
		{"qcow2 json", sampleImage(), true, wantJSON, false},
		{"raw human", raw, false, "image: r.img\nfile format: raw\nvirtual size: 1 MiB (1048576 bytes)\ndisk size: 4 KiB\n", false},
		{"raw json", raw, true, "{\n    \"virtual-size\": 1048576,\n    \"filename\": \"r.img\",\n    \"format\": \"raw\",\n    \"actual-size\": 4096,\n    \"dirty-flag\": false\n}\n", false},
		{"unknown size", unknown, false, "image: r.img\nfile format: raw\nvirtual size: 1 MiB (1048576 bytes)\ndisk size: unavailable\n", false},
		{"dirty, backing path", dirty, false, "image: r.img\nfile format: raw\nvirtual size: 1 MiB (1048576 bytes)\ndisk size: 4 KiB\ncleanly shut down: no\nbacking file: b (actual path: /x/b)\n", false},
		{"nested", nested, false, "image: r.img\nfile format: raw\nvirtual size: 1 MiB (1048576 bytes)\ndisk size: 4 KiB\nFormat specific information:\n    bitmaps:\n        [0]:\n            name: b0\n            granularity: 65536\n", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var b strings.Builder
			var err error
			if tt.json {
				err = WriteInfoJSON(&b, tt.img)
			} else {
				err = WriteInfoHuman(&b, tt.img)
			}
			if err != nil {
				t.Fatal(err)
			}
			if b.String() != tt.want {
				t.Errorf("got\n%s\nwant\n%s", b.String(), tt.want)
			}
		})
	}
}

func TestWriteMap(t *testing.T) {
	off := func(n int64) *int64 { return &n }
	entries := Merge([]MapEntry{
		{Start: 0, Length: 65536, Depth: 1, Present: true, Data: true, Offset: off(327680), File: "base.qcow2"},
		{Start: 65536, Length: 65536, Depth: 0, Present: true, Data: true, Offset: off(327680), File: "top.qcow2"},
		{Start: 131072, Length: 65536, Depth: 1, Zero: true},
		{Start: 196608, Length: 851968, Depth: 1, Zero: true},
		{Start: 1048576, Length: 65536, Depth: 1, Present: true, Zero: true},
		{Start: 1114112, Length: 1072627712, Depth: 1, Zero: true},
	})
	const wantJSON = `[{ "start": 0, "length": 65536, "depth": 1, "present": true, "zero": false, "data": true, "offset": 327680},
{ "start": 65536, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "offset": 327680},
{ "start": 131072, "length": 917504, "depth": 1, "present": false, "zero": true, "data": false},
{ "start": 1048576, "length": 65536, "depth": 1, "present": true, "zero": true, "data": false},
{ "start": 1114112, "length": 1072627712, "depth": 1, "present": false, "zero": true, "data": false}]
`
	const wantHuman = `Offset          Length          Mapped to       File
0               0x10000         0x50000         base.qcow2
0x10000         0x10000         0x50000         top.qcow2
`
	var b strings.Builder
	if err := WriteMapJSON(&b, entries); err != nil {
		t.Fatal(err)
	}
	if b.String() != wantJSON {
		t.Errorf("json:\n%s\nwant\n%s", b.String(), wantJSON)
	}
	b.Reset()
	if err := WriteMapHuman(&b, entries); err != nil {
		t.Fatal(err)
	}
	if b.String() != wantHuman {
		t.Errorf("human:\n%s\nwant\n%s", b.String(), wantHuman)
	}
	b.Reset()
	err := WriteMapHuman(&b, []MapEntry{{Start: 0, Length: 512, Present: true, Data: true}})
	if !errors.Is(err, ErrNoHostOffset) {
		t.Errorf("compressed extent: error %v, want ErrNoHostOffset", err)
	}
}

func TestMergeable(t *testing.T) {
	off := func(n int64) *int64 { return &n }
	base := MapEntry{Start: 0, Length: 512, Present: true, Data: true, Offset: off(1024)}
	tests := []struct {
		name string
		b    MapEntry
		want bool
	}{
		{"contiguous", MapEntry{Start: 512, Length: 512, Present: true, Data: true, Offset: off(1536)}, true},
		{"offset gap", MapEntry{Start: 512, Length: 512, Present: true, Data: true, Offset: off(4096)}, false},
		{"no offset", MapEntry{Start: 512, Length: 512, Present: true, Data: true}, false},
		{"zero", MapEntry{Start: 512, Length: 512, Present: true, Data: true, Zero: true, Offset: off(1536)}, false},
		{"depth", MapEntry{Start: 512, Length: 512, Depth: 1, Present: true, Data: true, Offset: off(1536)}, false},
		{"file", MapEntry{Start: 512, Length: 512, Present: true, Data: true, Offset: off(1536), File: "x"}, false},
		{"not adjacent", MapEntry{Start: 1024, Length: 512, Present: true, Data: true, Offset: off(1536)}, false},
	}
	for _, tt := range tests {
		if got := Mergeable(base, tt.b); got != tt.want {
			t.Errorf("%s: Mergeable = %v, want %v", tt.name, got, tt.want)
		}
	}
}

func TestDataFile(t *testing.T) {
	if got := DataFile(&disk.FormatSpecific{Type: "qcow2", Data: qcow2Specific{DataFile: "d.raw"}}); got != "d.raw" {
		t.Errorf("DataFile = %q", got)
	}
	if got := DataFile(nil); got != "" {
		t.Errorf("DataFile(nil) = %q", got)
	}
}

// TestMapPrinterFlush checks that Flush, after an error, leaves the
// entries printed so far and no closing bracket.
func TestMapPrinterFlush(t *testing.T) {
	var b strings.Builder
	p := NewMapPrinter(&b, true)
	for _, e := range []MapEntry{
		{Start: 0, Length: 512, Present: true, Data: true},
		{Start: 512, Length: 512, Zero: true},
		{Start: 1024, Length: 512, Present: true, Data: true},
	} {
		if err := p.Add(e); err != nil {
			t.Fatal(err)
		}
	}
	if err := p.Flush(); err != nil {
		t.Fatal(err)
	}
	want := `[{ "start": 0, "length": 512, "depth": 0, "present": true, "zero": false, "data": true},
{ "start": 512, "length": 512, "depth": 0, "present": false, "zero": true, "data": false}`
	if b.String() != want {
		t.Errorf("got\n%s\nwant\n%s", b.String(), want)
	}
}
