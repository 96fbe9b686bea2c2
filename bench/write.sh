#!/usr/bin/env bash
# bench/write.sh: imgloop's qcow2 write path against `qemu-img bench -w`.
#
# Workloads, each on a fresh image (qemu-img create -f qcow2 -o
# compat=1.1,cluster_size=65536) for every run:
#   rand4k  COUNT_RAND (default 4096) allocating 4 KiB writes on a 16 GiB
#           disk, write i at i*7919 clusters mod the size (qemu-img bench
#           has no random pattern; a prime stride of clusters scatters the
#           writes over the disk and makes every one allocate a cluster);
#   seq1m   COUNT_SEQ (default 1024) sequential 1 MiB writes on an 8 GiB
#           disk (all allocating).
# Both at depth 1 (one writer; qemu-img bench -d 1) and, with DEPTHS="1 8",
# also 8 goroutines against -d 8.
#
# Cache semantics, the same on both sides: the writes go through the host
# page cache (qemu-img bench -t writeback; imgloop writes a plain file) and
# the run ends with everything durable: qemu-img flushes its metadata
# caches and fdatasyncs when it closes the image, imgloop's Close flushes
# (fdatasync). Every write carries the byte 0xa5 (--pattern=165). The time
# is the wall time of the whole process (open, writes, close), measured
# around it; `sync` runs before each so that earlier runs' dirty pages are
# not written back during it. qemu-img's own "Run completed" time, which
# leaves out the open and the final flush, is shown too (qemu-own).
#
# Each tool runs RUNS times (default 3), alternating; the table shows
# medians and the ratio imgloop/qemu-img (wall time: lower is better for
# imgloop). The images of the last run are checked: `qemu-img check` must
# find imgloop's clean, and `qemu-img compare` equal to qemu-img's.
#
# Usage: bench/write.sh            (env: RUNS, COUNT_RAND, COUNT_SEQ, DEPTHS,
#                                   BENCH_DIR: where images go, default a
#                                   new temporary folder, removed at exit)
set -euo pipefail

RUNS=${RUNS:-3}
COUNT_RAND=${COUNT_RAND:-4096}
COUNT_SEQ=${COUNT_SEQ:-1024}
DEPTHS=${DEPTHS:-1}
root=$(cd "$(dirname "$0")/.." && pwd)
if [[ -n ${BENCH_DIR:-} ]]; then
	dir=$BENCH_DIR
	mkdir -p "$dir"
else
	dir=$(mktemp -d /tmp/imgloop-wbench.XXXXXX)
	trap 'rm -rf "$dir"' EXIT
fi
(cd "$root" && go build -o "$dir/writebench" ./bench/writebench)

# now_ns prints a monotonic-enough wall clock in nanoseconds.
now_ns() { date +%s%N; }

# median prints the median of its arguments.
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

# run_one TOOL SIZE COUNT BS STEP DEPTH: creates a fresh image
# ($dir/TOOL.qcow2), runs one tool on it, prints "wall-seconds own-seconds".
run_one() {
	local tool=$1 size=$2 count=$3 bs=$4 step=$5 depth=$6 out t0 t1
	local img=$dir/$tool.qcow2
	rm -f "$img"
	qemu-img create -q -f qcow2 -o compat=1.1,cluster_size=65536 "$img" "$size"
	sync
	t0=$(now_ns)
	if [[ $tool == qemu ]]; then
		out=$(qemu-img bench -w -f qcow2 -t writeback -c "$count" -d "$depth" -s "$bs" -S "$step" --pattern=165 "$img")
	else
		out=$("$dir/writebench" -f qcow2 -c "$count" -d "$depth" -s "$bs" -S "$step" --pattern 165 "$img")
	fi
	t1=$(now_ns)
	own=$(printf '%s\n' "$out" | sed -n 's/.*Run completed in \([0-9.]*\) seconds.*/\1/p')
	awk -v a="$t0" -v b="$t1" -v o="${own:-0}" 'BEGIN {printf "%.4f %.4f\n", (b-a)/1e9, o}'
}

printf 'qcow2 writes, 64 KiB clusters, fresh image per run; median of %d runs (wall seconds, open to durable close)\n' "$RUNS"
printf '%-14s %6s %10s %10s %10s %10s %10s %8s\n' workload writes imgloop qemu-img qemu-own 'MB/s(il)' 'MB/s(qemu)' ratio
for spec in "rand4k 16G $COUNT_RAND 4096 $((7919 * 65536))" "seq1m 8G $COUNT_SEQ 1048576 1048576"; do
	read -r name size count bs step <<<"$spec"
	for depth in $DEPTHS; do
		il=() qw=() qo=()
		for ((r = 0; r < RUNS; r++)); do
			read -r w _ < <(run_one imgloop "$size" "$count" "$bs" "$step" "$depth")
			il+=("$w")
			read -r w o < <(run_one qemu "$size" "$count" "$bs" "$step" "$depth")
			qw+=("$w") qo+=("$o")
		done
		if ! qemu-img check -q -f qcow2 "$dir/imgloop.qcow2"; then
			echo "qemu-img check: the image imgloop wrote ($name, depth $depth) is not clean" >&2
			exit 1
		fi
		if ! qemu-img compare -q -f qcow2 -F qcow2 "$dir/imgloop.qcow2" "$dir/qemu.qcow2"; then
			echo "qemu-img compare: imgloop's and qemu-img's images differ ($name, depth $depth)" >&2
			exit 1
		fi
		a=$(median "${il[@]}") q=$(median "${qw[@]}") o=$(median "${qo[@]}")
		awk -v n="$name-d$depth" -v c="$count" -v bs="$bs" -v a="$a" -v q="$q" -v o="$o" 'BEGIN {
			mb = c * bs / 1e6
			printf "%-14s %6d %10.3f %10.3f %10.3f %10.1f %10.1f %7.2fx\n", n, c, a, q, o, mb / a, mb / q, a / q
		}'
	done
done
