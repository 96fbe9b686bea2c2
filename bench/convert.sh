#!/usr/bin/env bash
# bench/convert.sh: time `imgloop convert -O raw` against `qemu-img convert
# -O raw` (default and its parallel mode `-m 8 -W`) on 1 GiB qcow2 images:
#   normal  uncompressed qcow2, 3/4 random data and 1/4 compressible text
#   zlib    compressed qcow2 (zlib) of compressible text
#   zstd    compressed qcow2 (zstd) of compressible text
# Each tool runs RUNS times (default 3), alternating, with the page cache
# dropped before every run when /proc/sys/vm/drop_caches is writable (set
# DROP_CACHES=0 to run warm instead); the table shows medians and ratios
# imgloop/qemu-img (lower is better), like for like: see the legend it
# prints. Images are kept in BENCH_DIR
# (default: a new temporary folder) and reused when present.
# Extra imgloop flags can be passed in IMGLOOP_FLAGS (e.g. "-j 8"), build
# tags for imgloop in BUILD_TAGS (default "libdeflate" when its header is
# installed, as in CI and the release build; BUILD_TAGS= for pure Go).
set -euo pipefail

RUNS=${RUNS:-3}
SIZE_MIB=${SIZE_MIB:-1024}
DROP_CACHES=${DROP_CACHES:-1}
IMAGES=${IMAGES:-normal zlib zstd}
IMGLOOP_FLAGS=${IMGLOOP_FLAGS:-}
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
build_imgloop
imgloop=$dir/imgloop

# compressible writes $1 MiB of base64 text (random bytes, so it does not
# repeat, but compresses to ~75%).
compressible() {
	head -c $(($1 * 1024 * 1024 * 3 / 4 + 4096)) /dev/urandom | base64 -w 0 | head -c $(($1 * 1024 * 1024))
}

make_image() {
	local name=$1 img=$dir/$1.qcow2 raw=$dir/$1.src.raw
	[[ -s $img ]] && return
	echo "creating $img ..." >&2
	case $name in
	normal)
		{
			head -c $((SIZE_MIB * 3 / 4 * 1024 * 1024)) /dev/urandom
			compressible $((SIZE_MIB - SIZE_MIB * 3 / 4))
		} >"$raw"
		qemu-img convert -O qcow2 "$raw" "$img"
		;;
	zlib)
		compressible "$SIZE_MIB" >"$raw"
		qemu-img convert -c -O qcow2 "$raw" "$img"
		;;
	zstd)
		compressible "$SIZE_MIB" >"$raw"
		qemu-img convert -c -O qcow2 -o compression_type=zstd "$raw" "$img"
		;;
	*)
		echo "unknown image $name" >&2
		exit 2
		;;
	esac
	rm -f "$raw"
}

# timed prints the wall time of a command in seconds.
timed() {
	local start end
	start=$(date +%s.%N)
	"$@" >/dev/null
	end=$(date +%s.%N)
	awk -v s="$start" -v e="$end" 'BEGIN { printf "%.3f\n", e - s }'
}

# The tools timed: qemu-img as is (its default cache mode, unsafe, leaves
# the output unsynced), in its parallel mode, and in that mode made durable
# (-t writeback flushes at the end); imgloop as is (durable: written back
# during the copy, fsync at the end) and with -t unsafe (no sync).
tools=(qemu qemu-par qemu-par-wb imgloop-unsafe imgloop)
declare -A labels=([qemu]="qemu-img" [qemu-par]="qemu -m8 -W" [qemu-par-wb]="qemu -m8 -W -t wb"
	[imgloop-unsafe]="imgloop -t unsafe" [imgloop]="imgloop")

run_tool() {
	local tool=$1 img=$2 out=$dir/out.raw
	rm -f "$out"
	drop_caches
	case $tool in
	# shellcheck disable=SC2086
	imgloop) timed "$imgloop" convert -O raw $IMGLOOP_FLAGS "$img" "$out" ;;
	# shellcheck disable=SC2086
	imgloop-unsafe) timed "$imgloop" convert -t unsafe -O raw $IMGLOOP_FLAGS "$img" "$out" ;;
	qemu) timed qemu-img convert -O raw "$img" "$out" ;;
	qemu-par) timed qemu-img convert -m 8 -W -O raw "$img" "$out" ;;
	qemu-par-wb) timed qemu-img convert -m 8 -W -t writeback -O raw "$img" "$out" ;;
	esac
	rm -f "$out"
}

if [[ $DROP_CACHES != 1 || ! -w /proc/sys/vm/drop_caches ]]; then
	echo "page cache not dropped: runs are warm" >&2
fi
echo "median seconds of $RUNS runs; ratios: lower is better"
printf '%-7s' image
for t in "${tools[@]}"; do printf ' %18s' "${labels[$t]}"; done
printf ' %9s %12s %12s\n' "ratio" "unsafe/best" "durable/wb"
for name in $IMAGES; do
	make_image "$name"
	img=$dir/$name.qcow2
	declare -A times=()
	if [[ $DROP_CACHES != 1 || ! -w /proc/sys/vm/drop_caches ]]; then
		run_tool imgloop "$img" >/dev/null # warm up
	fi
	for ((i = 0; i < RUNS; i++)); do
		# Alternate the order of the tools from run to run.
		order=("${tools[@]}")
		if ((i % 2 == 1)); then
			order=()
			for ((k = ${#tools[@]} - 1; k >= 0; k--)); do order+=("${tools[k]}"); done
		fi
		for tool in "${order[@]}"; do
			times[$tool]+="$(run_tool "$tool" "$img") "
		done
	done
	declare -A med=()
	printf '%-7s' "$name"
	for t in "${tools[@]}"; do
		med[$t]=$(tr ' ' '\n' <<<"${times[$t]}" | grep . | median)
		printf ' %18.2f' "${med[$t]}"
	done
	awk -v q="${med[qemu]}" -v qp="${med[qemu-par]}" -v qw="${med[qemu-par-wb]}" \
		-v mu="${med[imgloop-unsafe]}" -v m="${med[imgloop]}" 'BEGIN {
		best = (qp < q) ? qp : q
		printf " %9.2f %12.2f %12.2f\n", m / q, mu / best, m / qw
	}'
	for t in "${tools[@]}"; do echo "  ${labels[$t]}: ${times[$t]}" >&2; done
done
cat <<'EOT'
ratio: imgloop / qemu-img, each as is (imgloop syncs its output, qemu-img does not)
unsafe/best: imgloop -t unsafe / the faster of qemu-img and qemu-img -m8 -W (no sync on either side)
durable/wb: imgloop / qemu-img -m8 -W -t writeback (both sync their output)
EOT
