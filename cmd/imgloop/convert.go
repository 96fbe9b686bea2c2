package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"

	"github.com/imgloop/imgloop/convert"
	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/disk/hostfile"
	"github.com/imgloop/imgloop/internal/report"
)

func newConvertCmd() *cobra.Command {
	var src imageFlags
	var outFormat, cache, backing, backingFmt string
	var progress, compress bool
	var optionArgs []string
	var workers, chunk int
	var sparse int64
	cmd := &cobra.Command{
		Use:   "convert [-f FMT] [--snapshot ID|NAME] [-O raw|qcow2] [-c] [-o OPTIONS] [-B BACKING -F BACKING_FMT] [-p] [-j N] [-S BYTES] [-t CACHE] SRC DST",
		Short: "Copy an image's disk into a sparse raw file or a new qcow2 image (as qemu-img convert)",
		Long: "convert writes the virtual disk of SRC to DST as a raw image (-O raw, the\n" +
			"default) or a qcow2 image (-O qcow2). Ranges that read as zeros are left\n" +
			"as holes in a raw DST and unallocated in a qcow2 DST. DST is synced to disk\n" +
			"before convert returns, unless -t unsafe.\n\n" +
			"With -O qcow2, -c compresses the clusters (those that shrink) with the\n" +
			"image's compression type, and -o takes qemu-img's creation options as\n" +
			"name=value pairs separated by commas (cluster_size, compat, refcount_bits,\n" +
			"lazy_refcounts, extended_l2, compression_type, backing_file, backing_fmt;\n" +
			"data files and preallocation are not supported).\n\n" +
			"-B BACKING -F BACKING_FMT (-O qcow2) gives DST that backing file, taken to\n" +
			"hold what SRC's backing chain holds (as qemu-img convert -B): only what\n" +
			"SRC's own layer defines is copied; the rest reads through BACKING. A\n" +
			"relative BACKING is stored as given and resolved against DST's folder.\n\n" +
			"On failure or interruption a qcow2 DST is removed.",
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			var createOpts map[string]string
			switch outFormat {
			case "raw":
				if compress {
					return fmt.Errorf("-c: compression is not supported with -O raw")
				}
				if len(optionArgs) > 0 {
					return fmt.Errorf("-o: no options are supported with -O raw")
				}
				if backing != "" || backingFmt != "" {
					return fmt.Errorf("-B/-F: a backing file needs -O qcow2")
				}
			default:
				d, err := disk.Lookup(outFormat)
				if err != nil {
					return fmt.Errorf("-O: %w", err)
				}
				if _, ok := d.(disk.StreamCreator); !ok {
					return fmt.Errorf("-O %s: output format not supported yet (%s)", outFormat, strings.Join(outputFormats(), " or "))
				}
				if createOpts, err = parseCreateOptions(optionArgs); err != nil {
					return err
				}
				if err := mergeBacking(createOpts, backing, backingFmt); err != nil {
					return err
				}
			}
			opts := convert.Options{Workers: workers, ChunkSize: chunk, SparseSize: int(sparse)}
			if sparse == 0 {
				opts.SparseSize = -1 // as qemu-img: -S 0 turns zero detection off
			} else if sparse < 0 || sparse > convert.MaxChunkSize {
				return fmt.Errorf("-S: sparse size %d out of range", sparse)
			}
			if workers < 0 {
				return fmt.Errorf("-j: %d workers", workers)
			}
			if err := opts.Validate(); err != nil {
				return err
			}
			if cache != cacheWriteback && cache != cacheUnsafe {
				return fmt.Errorf("-t: unknown cache mode %q (want writeback or unsafe)", cache)
			}
			var bar io.Writer
			if progress {
				bar = cmd.ErrOrStderr()
			}
			if outFormat != "raw" {
				return convertStream(cmd.Context(), args[0], args[1], src.options(), opts, outFormat, createOpts, compress, cache == cacheWriteback, bar)
			}
			return convertRaw(cmd.Context(), args[0], args[1], src.options(), opts, cache == cacheWriteback, bar)
		},
	}
	addImageFlags(cmd, &src)
	cmd.Flags().StringVarP(&outFormat, "output-format", "O", "raw", "output format (raw or qcow2)")
	cmd.Flags().BoolVarP(&compress, "compress", "c", false, "compress the output's clusters (-O qcow2)")
	cmd.Flags().StringArrayVarP(&optionArgs, "options", "o", nil, "output image `OPTIONS` (-O qcow2), name=value pairs separated by commas")
	cmd.Flags().StringVarP(&backing, "backing", "B", "", "backing file of DST (-O qcow2); only what SRC's top layer defines is copied")
	cmd.Flags().StringVarP(&backing, "backing-file", "b", "", "same as -B (qemu-img 10.1 spelling)")
	_ = cmd.Flags().MarkHidden("backing-file")
	cmd.Flags().StringVarP(&backingFmt, "backing-format", "F", "", "format of the backing file (needed with -B)")
	cmd.Flags().BoolVarP(&progress, "progress", "p", false, "show a progress bar on stderr")
	cmd.Flags().IntVarP(&workers, "jobs", "j", 0, "parallel readers (default: 2 per CPU, at least 4)")
	cmd.Flags().Int64VarP(&sparse, "sparse-size", "S", convert.DefaultSparseSize, "leave all-zero runs of this many `bytes` as holes (0: off; a qcow2 DST is then fully allocated)")
	cmd.Flags().StringVarP(&cache, "cache", "t", cacheWriteback,
		"destination cache mode: writeback (written back during the copy, fsync at the end) or unsafe (no sync, as qemu-img's default)")
	cmd.Flags().IntVar(&chunk, "chunk-size", 0, "read size in bytes (default 1 MiB)")
	_ = cmd.Flags().MarkHidden("chunk-size")
	return cmd
}

// Cache modes of -t.
const (
	cacheWriteback = "writeback"
	cacheUnsafe    = "unsafe"
)

// convertRaw copies the disk of the image at src to a new sparse raw file
// at dst, made durable (write-behind, then fsync) if sync is set;
// progress, if not nil, receives a progress bar.
func convertRaw(ctx context.Context, src, dst string, open disk.OpenOptions, opts convert.Options, sync bool, progress io.Writer) error {
	img, err := disk.Open(src, open)
	if err != nil {
		return err
	}
	defer img.Close()
	files := sourceFiles(src, img)
	if err := checkDestination(dst, files); err != nil {
		return err
	}
	// Read the image file (and its external data file) ahead of the
	// workers, in large requests.
	opts.Prefetch = files[:1]
	if df := dataFile(src, img); df != "" {
		opts.Prefetch = append(opts.Prefetch, df)
	}
	// Locked as a writer of it, after a creator's locks: a file another
	// process uses is left as it is.
	hf, err := disk.CreateFile(dst)
	if err != nil {
		return err
	}
	defer hf.Close()
	f := hf.File()
	if err := f.Truncate(img.Size()); err != nil {
		return err
	}
	if progress != nil {
		var end func()
		opts.Progress, end = progressBar(progress, img.Size())
		defer end()
	}
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	var w io.WriterAt = f
	if sync {
		w = convert.NewWriteBehind(f)
	}
	if _, err := convert.Raw(ctx, img, w, opts); err != nil {
		if errors.Is(err, context.Canceled) {
			return fmt.Errorf("interrupted; %s is incomplete", dst)
		}
		return err
	}
	if sync {
		if err := f.Sync(); err != nil {
			return err
		}
	}
	return hf.Close()
}

// progressBar starts a progress bar on w for a copy of size bytes; it
// returns the Options.Progress function that advances it and a function
// that ends it.
func progressBar(w io.Writer, size int64) (func(int64), func()) {
	bar := progressbar.NewOptions64(size,
		progressbar.OptionSetWriter(w),
		progressbar.OptionShowBytes(true),
		progressbar.OptionUseIECUnits(true),
		progressbar.OptionSetDescription("converting"),
		progressbar.OptionThrottle(100*time.Millisecond),
	)
	return func(n int64) { _ = bar.Add64(n) }, func() {
		_ = bar.Exit()
		fmt.Fprintln(w) // end the bar's line
	}
}

// mergeBacking puts -B and -F into the qcow2 creation options, which
// may name the backing file too (-o backing_file=,backing_fmt=).
func mergeBacking(opts map[string]string, backing, backingFmt string) error {
	for _, o := range []struct{ flag, key, val string }{{"-B", "backing_file", backing}, {"-F", "backing_fmt", backingFmt}} {
		if o.val == "" {
			continue
		}
		if v, ok := opts[o.key]; ok && v != o.val {
			return fmt.Errorf("%s %s conflicts with -o %s=%s", o.flag, o.val, o.key, v)
		}
		opts[o.key] = o.val
	}
	if opts["backing_fmt"] != "" && opts["backing_file"] == "" {
		return fmt.Errorf("-F: a backing format needs a backing file (-B)")
	}
	return nil
}

// openBacking opens the backing file named in the creation options of
// the image to be created at dst (resolved against dst's folder),
// as qemu-img does to check it. It returns its size and the host files
// of its chain, or no files when there is no backing file.
func openBacking(dst string, qcowOpts map[string]string) (int64, []string, error) {
	name, format := qcowOpts["backing_file"], qcowOpts["backing_fmt"]
	if name == "" {
		return 0, nil, nil
	}
	full := disk.ResolveName(dst, name)
	if format == "" {
		detected := "unknown"
		if f, err := hostfile.Open(full, true); err == nil {
			d, err := disk.Probe(f)
			f.Close()
			if err == nil {
				detected = d.Name()
			}
		} else {
			return 0, nil, fmt.Errorf("backing file: %w", err)
		}
		return 0, nil, fmt.Errorf("backing file %s given without a backing format (detected %s; give -F %s)", name, detected, detected)
	}
	parent := dst
	if a, err := filepath.Abs(dst); err == nil {
		parent = a
	}
	// Shared for writing where its format allows, as qemu-img convert's
	// target opens its backing file.
	img, err := disk.Open(full, disk.OpenOptions{Format: format, ReadOnly: true, Parents: []string{parent}, ShareWrite: true})
	if err != nil {
		return 0, nil, fmt.Errorf("could not open backing file %s: %w", name, err)
	}
	defer img.Close()
	return img.Size(), sourceFiles(full, img), nil
}

// convertStream copies the disk of the image at src to a new image of
// format at dst, created with the qemu-img options createOpts and written
// in one pass by the driver's disk.StreamWriter; compress stores clusters
// compressed where that pays. With a backing file in createOpts only what
// the source's top layer defines is copied (convert.Options.Backed). The
// image is synced at the end if sync is set; progress, if not nil,
// receives a progress bar. On failure or interruption the new image is
// removed.
func convertStream(ctx context.Context, src, dst string, open disk.OpenOptions, opts convert.Options, format string, createOpts map[string]string, compress, sync bool, progress io.Writer) (err error) {
	d, err := disk.Lookup(format)
	if err != nil {
		return err
	}
	sc, ok := d.(disk.StreamCreator)
	if !ok {
		return fmt.Errorf("-O %s: output format not supported yet", format)
	}
	img, err := disk.Open(src, open)
	if err != nil {
		return err
	}
	defer img.Close()
	files := sourceFiles(src, img)
	backingSize, backingFiles, err := openBacking(dst, createOpts)
	if err != nil {
		return err
	}
	if backingFiles != nil {
		opts.Backed, opts.BackingSize = true, backingSize
	}
	if err := checkDestination(dst, append(append([]string(nil), files...), backingFiles...)); err != nil {
		return err
	}
	if err := sc.CheckStream(img.Size(), createOpts); err != nil {
		return err
	}
	opts.Prefetch = files[:1]
	if df := dataFile(src, img); df != "" {
		opts.Prefetch = append(opts.Prefetch, df)
	}
	f, err := disk.CreateFile(dst)
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			f.Close()
			if rerr := os.Remove(dst); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
				err = fmt.Errorf("%w; the incomplete %s could not be removed: %v", err, dst, rerr)
			} else {
				err = fmt.Errorf("%w; the incomplete %s was removed", err, dst)
			}
		}
	}()
	var file disk.File = f
	if !sync {
		file = noSyncFile{f}
	}
	w, err := sc.NewStream(file, img.Size(), createOpts)
	if err != nil {
		return err
	}
	if progress != nil {
		var end func()
		opts.Progress, end = progressBar(progress, img.Size())
		defer end()
	}
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	if _, err := convert.Clusters(ctx, img, w, compress, opts); err != nil {
		if errors.Is(err, context.Canceled) {
			return errors.New("interrupted")
		}
		return err
	}
	if err := w.Close(); err != nil {
		return err
	}
	return f.Close()
}

// outputFormats lists the formats convert writes: raw, and those whose
// driver writes images in one pass (disk.StreamCreator).
func outputFormats() []string {
	var names []string
	for _, n := range disk.Drivers() {
		if d, err := disk.Lookup(n); err == nil && n != "raw" {
			if _, ok := d.(disk.StreamCreator); ok {
				names = append(names, n)
			}
		}
	}
	slices.Sort(names)
	return append([]string{"raw"}, names...)
}

// noSyncFile is a disk.File whose Sync does nothing (-t unsafe).
type noSyncFile struct{ disk.File }

// Sync does nothing.
func (noSyncFile) Sync() error { return nil }

// sourceFiles lists the host files img reads: the image at path, its data
// file, and those of every image down its backing chain.
func sourceFiles(path string, img disk.Image) []string {
	var files []string
	for depth := 0; img != nil && path != "" && depth <= disk.MaxChainDepth; depth++ {
		files = append(files, path)
		if df := dataFile(path, img); df != "" {
			files = append(files, df)
		}
		d, ok := img.(disk.Describer)
		b, ok2 := img.(disk.Backinger)
		if !ok || !ok2 {
			break
		}
		path, img = d.Info().FullBackingFilename, b.Backing()
	}
	return files
}

// dataFile returns the external data file of img (the image at path), or
// "" if it has none.
func dataFile(path string, img disk.Image) string {
	if d, ok := img.(disk.Describer); ok {
		if df := report.DataFile(d.Info().FormatSpecific); df != "" {
			return resolve(path, df)
		}
	}
	return ""
}

// checkDestination refuses a destination that is one of the source's
// files (it would be truncated before being read) or not a regular file.
func checkDestination(dst string, sources []string) error {
	di, err := os.Stat(dst)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if !di.Mode().IsRegular() {
		return fmt.Errorf("%s: destination is not a regular file", dst)
	}
	for _, src := range sources {
		if si, err := os.Stat(src); err == nil && os.SameFile(si, di) {
			return fmt.Errorf("%s: destination is a file of the source image (%s)", dst, src)
		}
	}
	return nil
}
