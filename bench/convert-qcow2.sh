#!/usr/bin/env bash
# bench/convert-qcow2.sh: time `imgloop convert -O qcow2 [-c]` against
# `qemu-img convert -O qcow2 [-c]` on a 1 GiB compressible raw image (base64
# text of random bytes: it does not repeat, but compresses to ~75%).
# Modes: plain (no compression), zlib (-c), zstd (-c -o compression_type=zstd).
# Each tool runs RUNS times (default 3), alternating, with the page cache
# dropped before every run when /proc/sys/vm/drop_caches is writable (set
# DROP_CACHES=0 to run warm). Both tools run with -t unsafe (no sync of the
# output; qemu-img's default). The table shows medians of the wall-clock
# time and of the CPU time (user + system: on a machine shared with other
# work the wall clock is noisy, the CPU time much less), output sizes and
# the ratio imgloop/qemu-img of each (lower is better). The source is kept
# in BENCH_DIR (default: a new temporary folder) and reused when present.
set -euo pipefail

RUNS=${RUNS:-3}
SIZE_MIB=${SIZE_MIB:-1024}
DROP_CACHES=${DROP_CACHES:-1}
MODES=${MODES:-plain zlib zstd}
IMGLOOP_FLAGS=${IMGLOOP_FLAGS:-}
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
build_imgloop
imgloop=$dir/imgloop

src=$dir/compressible.raw
if [[ ! -s $src ]]; then
	echo "creating $src ..." >&2
	# The first head and base64 die of SIGPIPE when the last head is done.
	(set +o pipefail; head -c $((SIZE_MIB * 1024 * 1024 * 3 / 4 + 4096)) /dev/urandom | base64 -w 0 | head -c $((SIZE_MIB * 1024 * 1024)) >"$src")
fi

# timed CMD... prints "WALL CPU" in seconds (CPU: user + system, of CMD
# and its children).
timed() {
	local start end cpu
	start=$(date +%s.%N)
	cpu=$( { TIMEFORMAT='%U %S'; time "$@" >/dev/null 2>&1; } 2>&1 | awk '{ printf "%.3f", $1 + $2 }')
	end=$(date +%s.%N)
	awk -v s="$start" -v e="$end" -v c="$cpu" 'BEGIN { printf "%.3f %s\n", e - s, c }'
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
echo "median seconds of $RUNS runs (wall clock; CPU = user + system); ratio imgloop/qemu-img: lower is better"
printf '%-6s %9s %9s %6s %9s %9s %6s %12s %12s\n' mode "qemu wall" "ours wall" ratio "qemu CPU" "ours CPU" ratio "qemu size" "ours size"
for mode in $MODES; do
	declare -A walls=() cpus=()
	for ((i = 0; i < RUNS; i++)); do
		order=(qemu imgloop)
		((i % 2 == 1)) && order=(imgloop qemu)
		for tool in "${order[@]}"; do
			res=$(run_tool "$tool" "$mode")
			read -r wall cpu <<<"$res"
			walls[$tool]+="$wall "
			cpus[$tool]+="$cpu "
		done
	done
	med() { tr ' ' '\n' <<<"$1" | grep . | median; }
	awk -v q="$(med "${walls[qemu]}")" -v m="$(med "${walls[imgloop]}")" \
		-v qc="$(med "${cpus[qemu]}")" -v mc="$(med "${cpus[imgloop]}")" -v mode="$mode" \
		-v qs="$(cat "$dir/size.qemu.$mode")" -v ms="$(cat "$dir/size.imgloop.$mode")" \
		'BEGIN { printf "%-6s %9.2f %9.2f %6.2f %9.2f %9.2f %6.2f %12d %12d\n", mode, q, m, m / q, qc, mc, mc / qc, qs, ms }'
	echo "  $mode wall: qemu-img: ${walls[qemu]} imgloop: ${walls[imgloop]}; CPU: qemu-img: ${cpus[qemu]} imgloop: ${cpus[imgloop]}" >&2
done
