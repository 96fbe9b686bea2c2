#!/usr/bin/env bash
# bench/convert-qcow2.sh: time `imgloop convert -O qcow2 [-c]` against
# `qemu-img convert -O qcow2 [-c]` on a 1 GiB compressible raw image (base64
# text of random bytes: it does not repeat, but compresses to ~75%).
# Modes: plain (no compression), zlib (-c), zstd (-c -o compression_type=zstd).
# Each tool runs RUNS times (default 3), alternating, with the page cache
# dropped before every run when /proc/sys/vm/drop_caches is writable (set
# DROP_CACHES=0 to run warm). Both tools run with -t unsafe (no sync of the
# output; qemu-img's default). The table shows medians, output sizes and the
# ratio imgloop/qemu-img (lower is better). The source is kept in BENCH_DIR
# (default: a new temporary folder) and reused when present.
set -euo pipefail

RUNS=${RUNS:-3}
SIZE_MIB=${SIZE_MIB:-1024}
DROP_CACHES=${DROP_CACHES:-1}
MODES=${MODES:-plain zlib zstd}
IMGLOOP_FLAGS=${IMGLOOP_FLAGS:-}
root=$(cd "$(dirname "$0")/.." && pwd)
dir=${BENCH_DIR:-$(mktemp -d /tmp/imgloop-bench.XXXXXX)}
mkdir -p "$dir"
echo "bench dir: $dir" >&2

if [[ -z ${BUILD_TAGS+set} && -f /usr/include/libdeflate.h ]]; then
	BUILD_TAGS=libdeflate
fi
BUILD_TAGS=${BUILD_TAGS:-}
(cd "$root" && go build ${BUILD_TAGS:+-tags "$BUILD_TAGS"} -o "$dir/imgloop" ./cmd/imgloop)
imgloop=$dir/imgloop

src=$dir/compressible.raw
if [[ ! -s $src ]]; then
	echo "creating $src ..." >&2
	# The first head and base64 die of SIGPIPE when the last head is done.
	(set +o pipefail; head -c $((SIZE_MIB * 1024 * 1024 * 3 / 4 + 4096)) /dev/urandom | base64 -w 0 | head -c $((SIZE_MIB * 1024 * 1024)) >"$src")
fi

drop_caches() {
	sync
	if [[ $DROP_CACHES == 1 && -w /proc/sys/vm/drop_caches ]]; then
		echo 3 >/proc/sys/vm/drop_caches
	fi
}

timed() {
	local start end
	start=$(date +%s.%N)
	"$@" >/dev/null
	end=$(date +%s.%N)
	awk -v s="$start" -v e="$end" 'BEGIN { printf "%.3f\n", e - s }'
}

median() {
	sort -n | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}

mode_args() {
	case $1 in
	plain) ;;
	zlib) echo "-c" ;;
	zstd) echo "-c -o compression_type=zstd" ;;
	*)
		echo "unknown mode $1" >&2
		exit 2
		;;
	esac
}

# run_tool TOOL MODE prints the seconds of one conversion; the output's
# size is left in $dir/size.TOOL.MODE.
run_tool() {
	local tool=$1 mode=$2 out=$dir/out.qcow2 args
	args=$(mode_args "$mode")
	rm -f "$out"
	drop_caches
	case $tool in
	# shellcheck disable=SC2086
	imgloop) timed "$imgloop" convert -t unsafe -O qcow2 $args $IMGLOOP_FLAGS "$src" "$out" ;;
	# shellcheck disable=SC2086
	qemu) timed qemu-img convert -O qcow2 $args "$src" "$out" ;;
	esac
	stat -c %s "$out" >"$dir/size.$tool.$mode"
	qemu-img check -q "$out" >&2 || echo "qemu-img check failed on $tool $mode output" >&2
	rm -f "$out"
}

if [[ $DROP_CACHES != 1 || ! -w /proc/sys/vm/drop_caches ]]; then
	echo "page cache not dropped: runs are warm" >&2
fi
echo "median seconds of $RUNS runs; ratio imgloop/qemu-img: lower is better"
printf '%-6s %10s %10s %7s %14s %14s\n' mode qemu-img imgloop ratio "qemu size" "imgloop size"
for mode in $MODES; do
	declare -A times=()
	for ((i = 0; i < RUNS; i++)); do
		order=(qemu imgloop)
		((i % 2 == 1)) && order=(imgloop qemu)
		for tool in "${order[@]}"; do
			times[$tool]+="$(run_tool "$tool" "$mode") "
		done
	done
	q=$(tr ' ' '\n' <<<"${times[qemu]}" | grep . | median)
	m=$(tr ' ' '\n' <<<"${times[imgloop]}" | grep . | median)
	awk -v q="$q" -v m="$m" -v mode="$mode" -v qs="$(cat "$dir/size.qemu.$mode")" -v ms="$(cat "$dir/size.imgloop.$mode")" \
		'BEGIN { printf "%-6s %10.2f %10.2f %7.2f %14d %14d\n", mode, q, m, m / q, qs, ms }'
	echo "  qemu-img: ${times[qemu]}  imgloop: ${times[imgloop]}" >&2
done
