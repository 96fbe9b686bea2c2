#!/usr/bin/env bash
# read.sh — imgloop vs qemu-img bench: 4 KiB reads of qcow2 images.
#
# Runs BenchmarkRead (disk/qcow2/bench_test.go), which times imgloop's
# reads and `qemu-img bench` on the same images in the same run, and
# prints, per image (normal / zlib / zstd clusters) and access pattern,
# the median ns/op of each and the speed-up (qemu ns/op / imgloop ns/op;
# > 1 means imgloop is faster).
#
# Usage: bench/read.sh [count [benchtime [size-MiB]]]
#   count      runs of each benchmark, the median is kept (default 5)
#   benchtime  go test -benchtime (default 1s)
#   size-MiB   image size (default 64)
# Pairs: seq/stride (1 reader) vs qemu-img bench -d 1; *-parallel
# (8 goroutines) vs qemu-img bench -d 8; stride uses -S 7919*4096;
# seq-64k: 64 KiB reads, one reader, vs qemu-img bench -s 65536 -d 1.
set -euo pipefail
count=${1:-5}
benchtime=${2:-1s}
export IMGLOOP_BENCH_MIB=${3:-64}
cd "$(dirname "$0")/.."
out=$(go test -run '^$' -bench '^BenchmarkRead$' -benchtime "$benchtime" -count "$count" ./disk/qcow2/)
printf '%s\n' "$out" | grep -E '^(goos|goarch|cpu|Benchmark)' >&2
printf '%s\n' "$out" | awk -v mib="$IMGLOOP_BENCH_MIB" '
/^BenchmarkRead\// {
	name = $1; sub(/^BenchmarkRead\//, "", name); sub(/-[0-9]+$/, "", name)
	for (i = 2; i <= NF; i++) if ($(i+1) == "ns/op") { v = $i; break }
	n[name]++; vals[name, n[name]] = v
}
function median(k,   m, i, j, t, a) {
	m = n[k]; if (m == 0) return -1
	for (i = 1; i <= m; i++) a[i] = vals[k, i]
	for (i = 1; i <= m; i++) for (j = i + 1; j <= m; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
	return (m % 2) ? a[(m + 1) / 2] : (a[m / 2] + a[m / 2 + 1]) / 2
}
END {
	printf "4 KiB reads of a %d MiB qcow2 image; median ns/op of %s runs\n", mib, n["normal/seq"]
	printf "%-24s %14s %14s %9s\n", "image/pattern", "imgloop", "qemu-img", "speed-up"
	split("normal zlib zstd", kinds, " ")
	split("seq:qemu-seq stride:qemu-stride seq-parallel:qemu-seq-d8 stride-parallel:qemu-stride-d8 seq-64k:qemu-seq-64k", pairs, " ")
	for (k = 1; k <= 3; k++) for (p = 1; p <= 5; p++) {
		split(pairs[p], ab, ":")
		a = median(kinds[k] "/" ab[1]); q = median(kinds[k] "/" ab[2])
		if (a <= 0 || q <= 0) continue
		printf "%-24s %14.0f %14.0f %8.2fx\n", kinds[k] "/" ab[1], a, q, q / a
	}
	for (k = 1; k <= 3; k++) {
		a = median(kinds[k] "/rand"); b = median(kinds[k] "/rand-parallel")
		if (a > 0) printf "%-24s %14.0f %14s\n", kinds[k] "/rand", a, "-"
		if (b > 0) printf "%-24s %14.0f %14s\n", kinds[k] "/rand-parallel", b, "-"
	}
}'
