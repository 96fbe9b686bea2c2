// Command writebench is imgloop's side of bench/write.sh: it opens an
// image read-write through the library, writes -c blocks of -s bytes, the
// i-th at offset (-o + i*-S) mod the disk size (qemu-img bench -w's walk),
// with -d goroutines sharing that sequence, then closes the image (which
// makes every write durable), and prints the wall time of the whole run,
// open and close included.
//
//	writebench -c 4096 -s 4096 -S 518979584 -d 1 --pattern 165 image.qcow2
package main

import (
	"flag"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/imgloop/imgloop/disk"
	_ "github.com/imgloop/imgloop/disk/qcow2"
	_ "github.com/imgloop/imgloop/disk/raw"
)

func main() {
	count := flag.Int64("c", 75000, "number of writes")
	bs := flag.Int64("s", 4096, "bytes per write")
	step := flag.Int64("S", 0, "offset step between writes (0: the write size)")
	offset := flag.Int64("o", 0, "offset of the first write")
	depth := flag.Int("d", 1, "goroutines writing at once")
	pattern := flag.Int("pattern", 0, "byte value written")
	format := flag.String("f", "", "image format (probed when empty)")
	flag.Parse()
	if flag.NArg() != 1 || *count < 0 || *bs <= 0 || *depth <= 0 || *step < 0 || *offset < 0 {
		fmt.Fprintln(os.Stderr, "usage: writebench [-c count] [-s size] [-S step] [-o offset] [-d depth] [--pattern byte] [-f fmt] image")
		os.Exit(2)
	}
	if *step == 0 {
		*step = *bs
	}
	start := time.Now()
	if err := run(flag.Arg(0), *format, *count, *bs, *step, *offset, *depth, byte(*pattern)); err != nil {
		fmt.Fprintln(os.Stderr, "writebench:", err)
		os.Exit(1)
	}
	fmt.Printf("Run completed in %.6f seconds.\n", time.Since(start).Seconds())
}

// run does the writes (see the package comment).
func run(path, format string, count, bs, step, offset int64, depth int, pattern byte) error {
	img, err := disk.Open(path, disk.OpenOptions{Format: format})
	if err != nil {
		return err
	}
	size := img.Size()
	if bs > size {
		img.Close()
		return fmt.Errorf("write size %d exceeds the disk size %d", bs, size)
	}
	var next atomic.Int64
	var wg sync.WaitGroup
	errs := make([]error, depth)
	for g := range depth {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, bs)
			for i := range buf {
				buf[i] = pattern
			}
			for {
				i := next.Add(1) - 1
				if i >= count {
					return
				}
				// qemu-img 7.2 wraps modulo the size; keep the
				// write inside the disk.
				off := (offset + i*step) % size
				off = min(off, size-bs)
				if _, err := img.WriteAt(buf, off); err != nil {
					errs[g] = fmt.Errorf("write %d at %#x: %w", i, off, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	cerr := img.Close()
	for _, e := range errs {
		if e != nil {
			return e
		}
	}
	return cerr
}
