package convert

import (
	"os"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Prefetch defaults.
const (
	// prefetchStep is the size of one readahead request: large requests
	// keep a cold disk streaming where the kernel's own readahead (128 KiB
	// windows here) loses track of several interleaved readers.
	prefetchStep = 8 << 20
	// DefaultPrefetchWindow is how far ahead of the copy Prefetch reads.
	DefaultPrefetchWindow = 64 << 20
)

// Prefetcher reads a host file into the page cache ahead of a copy that
// consumes it roughly in file order (as converting an image does: qemu-img
// writes images in disk order), with large readahead requests
// (posix_fadvise WILLNEED). Reads by other file descriptors (the driver's)
// then find the data cached. It only advises the kernel: errors are
// ignored, and the copy stays correct whatever the file's layout.
type Prefetcher struct {
	stop chan struct{}
	done chan struct{}
}

// Prefetch starts prefetching the file at path. progress reports how far
// the copy has got, as a fraction from 0 to 1 (an estimate is fine);
// Prefetch keeps window bytes (DefaultPrefetchWindow if 0) ahead of that
// point of the file. Call Stop, once, when the copy ends. A file that
// cannot be opened yields a Prefetcher that does nothing.
func Prefetch(path string, window int64, progress func() float64) *Prefetcher {
	p := &Prefetcher{stop: make(chan struct{}), done: make(chan struct{})}
	f, err := os.Open(path)
	if err != nil {
		close(p.done)
		return p
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		close(p.done)
		return p
	}
	if window <= 0 {
		window = DefaultPrefetchWindow
	}
	size := fi.Size()
	go p.run(f, size, window, func() int64 { return int64(progress() * float64(size)) })
	return p
}

func (p *Prefetcher) run(f *os.File, size, window int64, position func() int64) {
	defer close(p.done)
	defer f.Close()
	tick := time.NewTicker(2 * time.Millisecond)
	defer tick.Stop()
	for off := int64(0); off < size; {
		if off < position()+window {
			n := min(int64(prefetchStep), size-off)
			_ = unix.Fadvise(int(f.Fd()), off, n, unix.FADV_WILLNEED)
			off += n
			continue
		}
		select {
		case <-p.stop:
			return
		case <-tick.C:
		}
	}
}

// Stop ends the prefetching and waits for it to finish. Call it once.
func (p *Prefetcher) Stop() {
	select {
	case <-p.done:
	default:
		close(p.stop)
		<-p.done
	}
}

// startPrefetch starts prefetching opts.Prefetch for a copy of a disk of
// size bytes, and returns the progress function the copy calls (it feeds
// the prefetchers, then opts.Progress; never nil) and a function that
// stops the prefetchers.
func startPrefetch(opts Options, size int64) (progress func(int64), stop func()) {
	progress = opts.Progress
	var prefetchers []*Prefetcher
	if len(opts.Prefetch) > 0 && size > 0 {
		var done atomic.Int64
		userProgress := progress
		progress = func(n int64) {
			done.Add(n)
			if userProgress != nil {
				userProgress(n)
			}
		}
		fraction := func() float64 { return float64(done.Load()) / float64(size) }
		for _, path := range opts.Prefetch {
			prefetchers = append(prefetchers, Prefetch(path, 0, fraction))
		}
	}
	if progress == nil {
		progress = func(int64) {}
	}
	return progress, func() {
		for _, p := range prefetchers {
			p.Stop()
		}
	}
}
