package qcow2

import (
	"fmt"
	"io"
	"sync"

	"github.com/imgloop/imgloop/disk"
)

// maxInflateBatch bounds how many compressed clusters of one read are
// inflated in parallel (QEMU runs up to 8 cluster tasks of a request at
// once, QCOW2_MAX_WORKERS).
const maxInflateBatch = 8

// inflateJob is a compressed cluster of a read waiting to be inflated.
type inflateJob struct {
	at  int // offset in the caller's buffer
	buf []byte
	r   run
	err error
}

// jobPool holds the inflateJob arrays of reads: they escape to the
// goroutines that inflate, so a stack array would cost every read an
// allocation.
var jobPool = sync.Pool{New: func() any { return new([maxInflateBatch]inflateJob) }}

// ReadAt reads len(p) bytes of the virtual disk at off. A request reaching
// past Size fails whole with an error matching disk.ErrOutOfRange; on
// success n == len(p). Runs of clusters stored contiguously on the host
// are read with one host read; zero and unallocated clusters are filled in
// without I/O (or read from the backing image); compressed clusters are
// inflated, several at once when a read spans more than one. See the
// package documentation for the errors.
func (img *Image) ReadAt(p []byte, off int64) (int, error) {
	t, err := img.enter()
	if err != nil {
		return 0, err
	}
	defer img.exit(t)
	if err := disk.CheckRange(off, int64(len(p)), img.size.Load()); err != nil {
		return 0, fmt.Errorf("qcow2: read: %w", err)
	}
	return img.readAt(p, off)
}

// readAt is ReadAt for a caller already admitted (see enter). It holds
// the shared side of img.reuse while it maps and reads, so that no host
// cluster it reads is freed and given to other data meanwhile.
func (img *Image) readAt(p []byte, off int64) (int, error) {
	rt := img.reuse.Enter()
	defer img.reuse.Exit(rt)
	var jobs []inflateJob // from jobPool once the read meets a compressed cluster
	defer func() {
		if jobs != nil {
			clear(jobs)
			jobPool.Put((*[maxInflateBatch]inflateJob)(jobs))
		}
	}()
	pending := 0
	done := 0
	for done < len(p) {
		r, err := img.lookup(off+int64(done), int64(len(p)-done))
		if err != nil {
			return img.finishRead(jobs[:pending], done, err)
		}
		buf := p[done : done+int(r.length)]
		switch r.kind {
		case kindZero, kindZeroAlloc:
			clear(buf)
		case kindUnallocated:
			err = img.readBacking(buf, off+int64(done))
		case kindNormal:
			err = img.readData(buf, r.host)
		case kindCompressed:
			if jobs == nil {
				jobs = jobPool.Get().(*[maxInflateBatch]inflateJob)[:]
			}
			jobs[pending] = inflateJob{at: done, buf: buf, r: r}
			if pending++; pending == len(jobs) {
				if n, err := img.finishRead(jobs[:pending], done+len(buf), nil); err != nil {
					return n, err
				}
				pending = 0
			}
		}
		if err != nil {
			return img.finishRead(jobs[:pending], done, err)
		}
		done += len(buf)
	}
	return img.finishRead(jobs[:pending], done, nil)
}

// finishRead inflates the pending compressed clusters of a read, in
// parallel when there are several, and returns the read's result: n bytes
// done and err, or the position and error of the first cluster that failed.
func (img *Image) finishRead(jobs []inflateJob, n int, err error) (int, error) {
	switch len(jobs) {
	case 0:
	case 1:
		jobs[0].err = img.readCompressed(jobs[0].buf, jobs[0].r)
	default:
		var wg sync.WaitGroup
		for i := 1; i < len(jobs); i++ {
			wg.Add(1)
			go func(j *inflateJob) {
				defer wg.Done()
				j.err = img.readCompressed(j.buf, j.r)
			}(&jobs[i])
		}
		jobs[0].err = img.readCompressed(jobs[0].buf, jobs[0].r)
		wg.Wait()
	}
	for i := range jobs {
		if jobs[i].err != nil {
			return jobs[i].at, jobs[i].err
		}
	}
	return n, err
}

// readData reads guest data stored uncompressed at host offset off of the
// image or data file. The data's start must lie inside the file; bytes of
// its last cluster past the end of the file read as zeros (QEMU leaves a
// partly written last cluster short).
func (img *Image) readData(p []byte, off int64) error {
	if off >= img.geo.dataSize {
		return img.corrupt(-1, fmt.Sprintf("data at %#x lies past the end of the file (size %#x)", off, img.geo.dataSize))
	}
	n, err := img.data.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == io.EOF {
		clear(p[n:])
		return nil
	}
	if err == nil {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("qcow2: reading data at %#x: %w", off, err)
}

// readCompressed fills p with part of a compressed cluster: r.length bytes
// from r.inCluster. A whole cluster is inflated straight into p; a part
// of one goes through a small cache of inflated clusters, so that small
// sequential reads inflate each cluster once.
func (img *Image) readCompressed(p []byte, r run) error {
	cs := img.geo.clusterSize()
	if r.inCluster == 0 && int64(len(p)) == cs {
		return img.inflateCluster(p, r)
	}
	img.inflatedOnce.Do(func() {
		img.inflated = newL2Cache(max(inflatedCacheSize, 2*cs), int(cs))
	})
	out, err := img.inflated.get(uint64(r.host), func(buf []byte) error { return img.inflateCluster(buf, r) })
	if err != nil {
		return err
	}
	copy(p, out[r.inCluster:])
	return nil
}

// inflatedCacheSize is the size of the cache of inflated clusters (at
// least 16 clusters).
const inflatedCacheSize = 4 << 20

// inflateCluster reads the compressed cluster of r and inflates it into
// out (one cluster).
func (img *Image) inflateCluster(out []byte, r run) error {
	clen := min(r.csize, img.geo.fileSize-r.host)
	inPtr := img.compressedPool.Get().(*[]byte)
	defer img.compressedPool.Put(inPtr)
	in := (*inPtr)[:clen]
	if n, err := img.f.ReadAt(in, r.host); n < len(in) {
		if err == nil || err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return fmt.Errorf("qcow2: reading compressed cluster at %#x: %w", r.host, err)
	}
	if err := img.inflate(out, in); err != nil {
		return &disk.FormatError{Format: formatName, Offset: r.host, Corrupt: true,
			What: fmt.Sprintf("compressed cluster of %d bytes does not inflate to one cluster", clen), Err: err}
	}
	return nil
}
