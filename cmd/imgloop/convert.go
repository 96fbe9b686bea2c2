package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"

	"github.com/imgloop/imgloop/convert"
	"github.com/imgloop/imgloop/disk"
	"github.com/imgloop/imgloop/internal/report"
)

func newConvertCmd() *cobra.Command {
	var src imageFlags
	var outFormat, cache string
	var progress bool
	var workers, chunk int
	var sparse int64
	cmd := &cobra.Command{
		Use:   "convert [-f FMT] [--snapshot ID|NAME] [-O raw] [-p] [-j N] [-S BYTES] [-t CACHE] SRC DST",
		Short: "Copy an image's disk into a sparse raw file (as qemu-img convert -O raw)",
		Long: "convert writes the virtual disk of SRC to DST as a raw image. Ranges that\n" +
			"read as zeros are left as holes, so DST is sparse. DST is synced to disk\n" +
			"before convert returns, unless -t unsafe. Only -O raw is supported for now.",
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			if outFormat != "raw" {
				if _, err := disk.Lookup(outFormat); err != nil {
					return fmt.Errorf("-O: %w", err)
				}
				return fmt.Errorf("-O %s: output format not supported yet (only raw)", outFormat)
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
			return convertRaw(cmd.Context(), args[0], args[1], src.options(), opts, cache == cacheWriteback, bar)
		},
	}
	addImageFlags(cmd, &src)
	cmd.Flags().StringVarP(&outFormat, "output-format", "O", "raw", "output format (raw)")
	cmd.Flags().BoolVarP(&progress, "progress", "p", false, "show a progress bar on stderr")
	cmd.Flags().IntVarP(&workers, "jobs", "j", 0, "parallel readers (default: 2 per CPU, at least 4)")
	cmd.Flags().Int64VarP(&sparse, "sparse-size", "S", convert.DefaultSparseSize, "leave all-zero runs of this many `bytes` as holes (0: off)")
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
	f, err := os.OpenFile(dst, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Truncate(img.Size()); err != nil {
		return err
	}
	if progress != nil {
		bar := progressbar.NewOptions64(img.Size(),
			progressbar.OptionSetWriter(progress),
			progressbar.OptionShowBytes(true),
			progressbar.OptionUseIECUnits(true),
			progressbar.OptionSetDescription("converting"),
			progressbar.OptionThrottle(100*time.Millisecond),
		)
		opts.Progress = func(n int64) { _ = bar.Add64(n) }
		defer func() {
			_ = bar.Exit()
			fmt.Fprintln(progress) // end the bar's line
		}()
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
	return f.Close()
}

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
