package disk_test

import (
	"bytes"
	"errors"
	"slices"
	"testing"

	"github.com/imgloop/imgloop/disk"
)

// fakeDriver scores headers that start with magic, and opens by calling
// open (an error if nil).
type fakeDriver struct {
	name  string
	magic string
	score int
	open  func(f disk.File, opts disk.OpenOptions) (disk.Image, error)
}

func (d *fakeDriver) Name() string { return d.name }

func (d *fakeDriver) Probe(h []byte) int {
	if bytes.HasPrefix(h, []byte(d.magic)) {
		return d.score
	}
	return 0
}

func (d *fakeDriver) Open(f disk.File, opts disk.OpenOptions) (disk.Image, error) {
	if d.open == nil {
		return nil, &disk.FormatError{Format: d.name, Offset: 0, What: "fake driver refuses"}
	}
	return d.open(f, opts)
}

// register registers drivers for the duration of t.
func register(t *testing.T, ds ...disk.Driver) {
	t.Helper()
	for _, d := range ds {
		if err := disk.Register(d); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { disk.Unregister(d.Name()) })
	}
}

func TestRegisterLookupUnregister(t *testing.T) {
	d := &fakeDriver{name: "fake-a"}
	register(t, d)
	if err := disk.Register(&fakeDriver{name: "fake-a"}); err == nil {
		t.Fatal("registering a duplicate name succeeded")
	}
	got, err := disk.Lookup("fake-a")
	if err != nil || got != disk.Driver(d) {
		t.Fatalf("Lookup = %v, %v", got, err)
	}
	if !slices.Contains(disk.Drivers(), "fake-a") {
		t.Fatalf("Drivers() = %v lacks fake-a", disk.Drivers())
	}
	if !disk.Unregister("fake-a") {
		t.Fatal("Unregister of a registered driver returned false")
	}
	if disk.Unregister("fake-a") {
		t.Fatal("second Unregister returned true")
	}
	if _, err := disk.Lookup("fake-a"); !errors.Is(err, disk.ErrUnknownFormat) {
		t.Fatalf("Lookup after Unregister = %v, want ErrUnknownFormat", err)
	}
	if _, err := disk.Lookup("no-such-format"); !errors.Is(err, disk.ErrUnknownFormat) {
		t.Fatalf("Lookup(unknown) = %v, want ErrUnknownFormat", err)
	}
	// The name is free again.
	register(t, &fakeDriver{name: "fake-a"})
}

func TestMustRegisterPanicsOnDuplicate(t *testing.T) {
	register(t, &fakeDriver{name: "fake-dup"})
	defer func() {
		if recover() == nil {
			t.Fatal("MustRegister of a duplicate did not panic")
		}
	}()
	disk.MustRegister(&fakeDriver{name: "fake-dup"})
}

func TestDrivers(t *testing.T) {
	register(t, &fakeDriver{name: "fake-z"}, &fakeDriver{name: "fake-b"}, &fakeDriver{name: "fake-m"})
	names := disk.Drivers()
	if !slices.IsSorted(names) {
		t.Fatalf("Drivers() = %v, not sorted", names)
	}
	for _, n := range []string{"fake-b", "fake-m", "fake-z"} {
		if !slices.Contains(names, n) {
			t.Fatalf("Drivers() = %v lacks %s", names, n)
		}
	}
}

func TestDetect(t *testing.T) {
	register(t,
		&fakeDriver{name: "fallback", magic: "", score: 1},
		&fakeDriver{name: "magic-lo", magic: "MAG", score: 50},
		&fakeDriver{name: "magic-hi", magic: "MAGIC", score: 100},
		&fakeDriver{name: "tie-b", magic: "TIE", score: 60},
		&fakeDriver{name: "tie-a", magic: "TIE", score: 60},
		&fakeDriver{name: "tie-c", magic: "TIE", score: 60},
	)
	cases := []struct {
		header string
		want   string
	}{
		{"MAGIC header", "magic-hi"},
		{"MAGNET", "magic-lo"},
		{"TIE", "tie-a"}, // equal scores: the name that sorts first
		{"anything", "fallback"},
		{"", "fallback"},
	}
	for _, c := range cases {
		for range 5 { // deterministic, whatever the map order
			d, err := disk.Detect([]byte(c.header))
			if err != nil || d.Name() != c.want {
				t.Fatalf("Detect(%q) = %v, %v; want %s", c.header, d, err, c.want)
			}
		}
	}
	disk.Unregister("fallback")
	if _, err := disk.Detect([]byte("nothing matches")); !errors.Is(err, disk.ErrUnknownFormat) {
		t.Fatalf("Detect with no match = %v, want ErrUnknownFormat", err)
	}
}
