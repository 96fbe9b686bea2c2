package main

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"

	"github.com/imgloop/imgloop/internal/report"
)

// TestMapOracle compares `imgloop map` with `qemu-img map`: the JSON
// entries after merging both the way qemu-img does, then the texts.
func TestMapOracle(t *testing.T) {
	dir, imgs := sharedImages(t)
	for _, img := range imgs {
		t.Run(img.name, func(t *testing.T) {
			args := append(append([]string{"map", "--output=json"}, img.openArgs()...), img.name)
			gotText, wantText := mustRun(t, dir, args...), qemuImg(t, dir, args...)
			var got, want []report.MapEntry
			if err := json.Unmarshal([]byte(gotText), &got); err != nil {
				t.Fatalf("imgloop map: %v\n%s", err, gotText)
			}
			if err := json.Unmarshal([]byte(wantText), &want); err != nil {
				t.Fatalf("qemu-img map: %v", err)
			}
			got, want = report.Merge(got), report.Merge(want)
			for i := range max(len(got), len(want)) {
				if i >= len(got) || i >= len(want) || entryString(got[i]) != entryString(want[i]) {
					t.Fatalf("entry %d differs:\nimgloop:  %s\nqemu-img: %s", i, entryAt(got, i), entryAt(want, i))
				}
			}
			if gotText != wantText {
				t.Errorf("JSON text differs:\n--- imgloop\n%s--- qemu-img\n%s", gotText, wantText)
			}
			// Human output (qemu-img refuses compressed images there).
			args = append([]string{"map"}, args[2:]...)
			r := imgloop(t, dir, args...)
			if strings.HasPrefix(img.name, "z") {
				checkFailure(t, r, args)
				return
			}
			if w := qemuImg(t, dir, args...); r.stdout != w || r.code != 0 {
				t.Errorf("human output differs (exit %d, %s):\n--- imgloop\n%s--- qemu-img\n%s", r.code, r.stderr, r.stdout, w)
			}
		})
	}
}

func entryString(e report.MapEntry) string {
	off := "none"
	if e.Offset != nil {
		off = fmt.Sprint(*e.Offset)
	}
	return fmt.Sprintf("start %d length %d depth %d present %t zero %t data %t offset %s",
		e.Start, e.Length, e.Depth, e.Present, e.Zero, e.Data, off)
}

func entryAt(es []report.MapEntry, i int) string {
	if i >= len(es) {
		return "(none)"
	}
	return entryString(es[i])
}

// TestMapOffset checks `map --offset` for each kind of qcow2 cluster and
// for raw images.
func TestMapOffset(t *testing.T) {
	dir, _ := sharedImages(t)
	tests := []struct {
		image  string
		offset string
		want   []string // lines expected in the output
	}{
		{"plain.qcow2", "100", []string{"offset: 100", "cluster_type: normal", "offset_in_cluster: 100", "depth: 0", "file: plain.qcow2"}},
		{"plain.qcow2", "1048576", []string{"cluster_type: zero", "depth: 0"}},
		{"plain.qcow2", "3145728", []string{"cluster_type: unallocated", "cluster_offset: none", "depth: 0"}},
		{"zlib.qcow2", "1048576", []string{"cluster_type: compressed", "depth: 0"}},
		{"top.qcow2", "65537", []string{"cluster_type: normal", "offset_in_cluster: 1", "depth: 1", "file: base.qcow2"}},
		{"top.qcow2", "262144", []string{"cluster_type: normal", "depth: 0", "file: top.qcow2"}},
		{"top.qcow2", "6291456", []string{"cluster_type: unallocated", "depth: 1"}},
		{"disk.raw", "1048576", []string{"offset: 1048576", "start: 1048576", "length: 131072", "data: true", "host_offset: 1048576"}},
	}
	for _, tt := range tests {
		t.Run(tt.image+"@"+tt.offset, func(t *testing.T) {
			out := mustRun(t, dir, "map", "--offset", tt.offset, tt.image)
			for _, w := range tt.want {
				if !strings.Contains("\n"+out, "\n"+w+"\n") {
					t.Errorf("output lacks %q:\n%s", w, out)
				}
			}
		})
	}
}
