package report

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
)

// value is a decoded JSON value that keeps the order of object keys (Go's
// map[string]any loses it).
type value struct {
	keys []string // object keys; nil for arrays and scalars
	vals []*value // object values (parallel to keys) or array elements
	// raw is a scalar's JSON text ("1.1" quoted, 16, true); "" for
	// objects and arrays.
	raw     string
	isArray bool
}

func (v *value) isObject() bool { return v.raw == "" && !v.isArray }

// get returns the value of key in an object, or nil.
func (v *value) get(key string) *value {
	if i := slices.Index(v.keys, key); i >= 0 {
		return v.vals[i]
	}
	return nil
}

// set replaces or appends key in an object.
func (v *value) set(key string, x *value) {
	if i := slices.Index(v.keys, key); i >= 0 {
		v.vals[i] = x
		return
	}
	v.keys = append(v.keys, key)
	v.vals = append(v.vals, x)
}

// text returns a scalar as qemu-img's human output shows it: strings
// unquoted, numbers and booleans as written.
func (v *value) text() string {
	var s string
	if strings.HasPrefix(v.raw, `"`) && json.Unmarshal([]byte(v.raw), &s) == nil {
		return s
	}
	return v.raw
}

// scalar returns a scalar value holding x's JSON encoding.
func scalar(x any) *value {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(x); err != nil {
		return &value{raw: "null"}
	}
	return &value{raw: strings.TrimSuffix(b.String(), "\n")}
}

// toValue converts x (anything encoding/json can marshal) to a value,
// keeping the field order of structs.
func toValue(x any) (*value, error) {
	b, err := json.Marshal(x)
	if err != nil {
		return nil, err
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	return decodeValue(dec)
}

func decodeValue(dec *json.Decoder) (*value, error) {
	tok, err := dec.Token()
	if err != nil {
		return nil, err
	}
	switch t := tok.(type) {
	case json.Delim:
		v := &value{isArray: t == '['}
		for dec.More() {
			if !v.isArray {
				k, err := dec.Token()
				if err != nil {
					return nil, err
				}
				key, ok := k.(string)
				if !ok {
					return nil, errors.New("report: object key is not a string")
				}
				v.keys = append(v.keys, key)
			}
			x, err := decodeValue(dec)
			if err != nil {
				return nil, err
			}
			v.vals = append(v.vals, x)
		}
		if _, err := dec.Token(); err != nil { // closing delimiter
			return nil, err
		}
		return v, nil
	case json.Number:
		return &value{raw: t.String()}, nil
	case nil:
		return &value{raw: "null"}, nil
	default:
		return scalar(t), nil
	}
}

// writeJSON writes v as QEMU's pretty JSON writer does (4-space indent,
// objects in QDict order), without a final newline.
func writeJSON(w io.Writer, v *value) error {
	var b strings.Builder
	appendJSON(&b, v, 0)
	_, err := io.WriteString(w, b.String())
	return err
}

func appendJSON(b *strings.Builder, v *value, depth int) {
	if v.raw != "" {
		b.WriteString(v.raw)
		return
	}
	open, end := "{", "}"
	if v.isArray {
		open, end = "[", "]"
	}
	b.WriteString(open)
	order := make([]int, len(v.vals))
	for i := range order {
		order[i] = i
	}
	if !v.isArray {
		order = qdictOrder(v.keys)
	}
	for n, i := range order {
		if n > 0 {
			b.WriteString(",")
		}
		fmt.Fprintf(b, "\n%*s", 4*(depth+1), "")
		if !v.isArray {
			b.WriteString(scalar(v.keys[i]).raw)
			b.WriteString(": ")
		}
		appendJSON(b, v.vals[i], depth+1)
	}
	fmt.Fprintf(b, "\n%*s%s", 4*depth, "", end)
}

// dumpHuman writes v as qemu-img's human "Format specific information"
// block does (dump_qobject): "key: value" lines indented by 4 spaces per
// level, dashes in keys shown as spaces, list elements as "[i]:".
func dumpHuman(b *strings.Builder, v *value, indent int) {
	switch {
	case v.raw != "":
		b.WriteString(v.text())
	case v.isArray:
		for i, x := range v.vals {
			composite := x.raw == ""
			fmt.Fprintf(b, "%*s[%d]:", 4*indent, "", i)
			dumpEntry(b, x, composite, indent)
		}
	default:
		for _, i := range qdictOrder(v.keys) {
			x := v.vals[i]
			composite := x.raw == ""
			fmt.Fprintf(b, "%*s%s:", 4*indent, "", strings.ReplaceAll(v.keys[i], "-", " "))
			dumpEntry(b, x, composite, indent)
		}
	}
}

func dumpEntry(b *strings.Builder, x *value, composite bool, indent int) {
	if composite {
		b.WriteString("\n")
		dumpHuman(b, x, indent+1)
		return
	}
	b.WriteString(" ")
	dumpHuman(b, x, indent+1)
	b.WriteString("\n")
}
