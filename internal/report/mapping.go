package report

import (
	"bufio"
	"errors"
	"fmt"
	"io"

	"github.com/imgloop/imgloop/disk"
)

// ErrNoHostOffset is returned by WriteMapHuman for a data extent without a
// host offset, which qemu-img's human map format cannot show.
var ErrNoHostOffset = errors.New("file contains external, encrypted or compressed clusters")

// MapEntry is one element of `qemu-img map --output=json`.
type MapEntry struct {
	Start   int64  `json:"start"`
	Length  int64  `json:"length"`
	Depth   int    `json:"depth"`
	Present bool   `json:"present"`
	Zero    bool   `json:"zero"`
	Data    bool   `json:"data"`
	Offset  *int64 `json:"offset,omitempty"`
	// File is the host file of the layer (human output only).
	File string `json:"-"`
}

// Entry converts an extent to qemu-img's map entry.
func Entry(e disk.Extent) MapEntry {
	m := MapEntry{
		Start:   e.Offset,
		Length:  e.Length,
		Depth:   e.Depth,
		Present: e.Status&disk.StatusAllocated != 0,
		Zero:    e.Status&disk.StatusZero != 0,
		Data:    e.Status&disk.StatusData != 0,
		File:    e.HostFile,
	}
	if e.HostOffset >= 0 {
		off := e.HostOffset
		m.Offset = &off
	}
	return m
}

// Mergeable reports whether qemu-img map would print b as part of a
// (entry_mergeable): same flags, depth and file, and contiguous host
// offsets when there are any.
func Mergeable(a, b MapEntry) bool {
	if a.Length == 0 || a.Start+a.Length != b.Start {
		return false
	}
	if a.Zero != b.Zero || a.Data != b.Data || a.Depth != b.Depth || a.Present != b.Present || a.File != b.File {
		return false
	}
	if (a.Offset == nil) != (b.Offset == nil) {
		return false
	}
	return a.Offset == nil || *a.Offset+a.Length == *b.Offset
}

// Merge merges runs of mergeable entries, as qemu-img map does before
// printing.
func Merge(entries []MapEntry) []MapEntry {
	var out []MapEntry
	for _, e := range entries {
		if n := len(out); n > 0 && Mergeable(out[n-1], e) {
			out[n-1].Length += e.Length
			continue
		}
		out = append(out, e)
	}
	return out
}

// MapPrinter prints map entries as they come, merging runs qemu-img
// would merge, in qemu-img map's human or JSON format. Memory use does not
// grow with the number of entries.
type MapPrinter struct {
	w       *bufio.Writer
	json    bool
	pending MapEntry
	have    bool // pending holds an entry
	printed int  // entries printed
	err     error
}

// NewMapPrinter returns a printer writing to w in JSON (as `qemu-img map
// --output=json`) or human format (as `qemu-img map`).
func NewMapPrinter(w io.Writer, json bool) *MapPrinter {
	p := &MapPrinter{w: bufio.NewWriterSize(w, 64<<10), json: json}
	if json {
		p.w.WriteString("[")
	} else {
		fmt.Fprintf(p.w, "%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to", "File")
	}
	return p
}

// Add adds the next entry (entries must come in disk order).
func (p *MapPrinter) Add(e MapEntry) error {
	if p.err != nil {
		return p.err
	}
	if p.have && Mergeable(p.pending, e) {
		p.pending.Length += e.Length
		return nil
	}
	if p.have {
		p.print(p.pending)
	}
	p.pending, p.have = e, true
	return p.err
}

// Close prints the last entry and the end of the output, and flushes. It
// returns the first error: ErrNoHostOffset (human format) or the writer's.
func (p *MapPrinter) Close() error {
	if p.have {
		p.print(p.pending)
		p.have = false
	}
	if p.json && p.err == nil {
		p.w.WriteString("]\n")
	}
	if err := p.w.Flush(); p.err == nil {
		p.err = err
	}
	return p.err
}

// Flush writes out what has been printed so far, without the pending
// entry or the end of the output: for stopping after an error, as qemu-img
// map does.
func (p *MapPrinter) Flush() error {
	return p.w.Flush()
}

func (p *MapPrinter) print(e MapEntry) {
	if p.err != nil {
		return
	}
	if p.json {
		if p.printed > 0 {
			p.w.WriteString(",\n")
		}
		fmt.Fprintf(p.w, `{ "start": %d, "length": %d, "depth": %d, "present": %t, "zero": %t, "data": %t`,
			e.Start, e.Length, e.Depth, e.Present, e.Zero, e.Data)
		if e.Offset != nil {
			fmt.Fprintf(p.w, `, "offset": %d`, *e.Offset)
		}
		p.w.WriteString("}")
	} else {
		if e.Data && e.Offset == nil {
			p.err = fmt.Errorf("report: extent at %d: %w", e.Start, ErrNoHostOffset)
			return
		}
		if e.Data && !e.Zero {
			fmt.Fprintf(p.w, "%-16s%-16s%-16s%s\n", hex(e.Start), hex(e.Length), hex(*e.Offset), e.File)
		}
	}
	p.printed++
}

// WriteMapJSON writes entries, merged, exactly as `qemu-img map
// --output=json` prints them.
func WriteMapJSON(w io.Writer, entries []MapEntry) error {
	return writeMap(w, entries, true)
}

// WriteMapHuman writes entries, merged, as `qemu-img map` does: a header,
// then one line per extent holding non-zero data, with its host offset
// and file. A data extent without a host offset yields ErrNoHostOffset,
// after the lines before it.
func WriteMapHuman(w io.Writer, entries []MapEntry) error {
	return writeMap(w, entries, false)
}

func writeMap(w io.Writer, entries []MapEntry, json bool) error {
	p := NewMapPrinter(w, json)
	for _, e := range entries {
		if err := p.Add(e); err != nil {
			p.Close()
			return err
		}
	}
	return p.Close()
}

// hex formats n as C's "%#"PRIx64 does: "0" for zero, "0x..." otherwise.
func hex(n int64) string {
	if n == 0 {
		return "0"
	}
	return fmt.Sprintf("%#x", n)
}
