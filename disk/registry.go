package disk

import (
	"fmt"
	"slices"
	"sync"
)

// Driver is a format driver (the seed's struct loop_file_fmt_driver).
type Driver interface {
	// Name is the format's name as users type it ("raw", "qcow2").
	Name() string
	// Probe scores how likely header (the first ProbeSize bytes of the
	// file, zero-padded past the end of a shorter file) is an image of
	// this format: 0 for "not mine", 100 for a certain match by magic;
	// raw answers 1 to everything so that it is the fallback. These are
	// QEMU's scores (block.c bdrv_probe_all).
	Probe(header []byte) int
	// Open opens the image held in f. On success the Image owns f and
	// closes it on Close; on error the caller closes f.
	Open(f File, opts OpenOptions) (Image, error)
}

var registry struct {
	sync.RWMutex
	drivers map[string]Driver
}

// Register adds a driver; it returns an error if one of that name is
// already registered.
func Register(d Driver) error {
	registry.Lock()
	defer registry.Unlock()
	if registry.drivers == nil {
		registry.drivers = make(map[string]Driver)
	}
	if _, dup := registry.drivers[d.Name()]; dup {
		return fmt.Errorf("disk: driver %q already registered", d.Name())
	}
	registry.drivers[d.Name()] = d
	return nil
}

// MustRegister is Register for init functions: it panics on a duplicate name.
func MustRegister(d Driver) {
	if err := Register(d); err != nil {
		panic(err)
	}
}

// Unregister removes the driver of that name; it reports whether there was one.
func Unregister(name string) bool {
	registry.Lock()
	defer registry.Unlock()
	_, ok := registry.drivers[name]
	delete(registry.drivers, name)
	return ok
}

// Lookup returns the driver registered under name, or an error matching
// ErrUnknownFormat.
func Lookup(name string) (Driver, error) {
	registry.RLock()
	defer registry.RUnlock()
	if d, ok := registry.drivers[name]; ok {
		return d, nil
	}
	return nil, fmt.Errorf("%w: %q", ErrUnknownFormat, name)
}

// Drivers returns the names of the registered drivers, sorted.
func Drivers() []string {
	registry.RLock()
	defer registry.RUnlock()
	return sortedNames()
}

func sortedNames() []string {
	names := make([]string, 0, len(registry.drivers))
	for n := range registry.drivers {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}
