# bench/lib.sh: what the benchmark scripts share. Source it after
# `set -euo pipefail`; it sets root (the repository) and dir (BENCH_DIR,
# default a new temporary folder), and BUILD_TAGS (default "libdeflate"
# when its header is installed, as in CI and the release build;
# BUILD_TAGS= for pure Go).

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dir=${BENCH_DIR:-$(mktemp -d /tmp/imgloop-bench.XXXXXX)}
mkdir -p "$dir"
echo "bench dir: $dir" >&2

if [[ -z ${BUILD_TAGS+set} && -f /usr/include/libdeflate.h ]]; then
	BUILD_TAGS=libdeflate
fi
BUILD_TAGS=${BUILD_TAGS:-}

# build_imgloop builds the imgloop command into $dir/imgloop.
build_imgloop() {
	echo "imgloop build tags: ${BUILD_TAGS:-none}" >&2
	(cd "$root" && go build ${BUILD_TAGS:+-tags "$BUILD_TAGS"} -o "$dir/imgloop" ./cmd/imgloop)
}

# drop_caches syncs and, unless DROP_CACHES=0 or not permitted, drops the
# page cache so that every run reads from the disk.
drop_caches() {
	sync
	if [[ ${DROP_CACHES:-1} == 1 && -w /proc/sys/vm/drop_caches ]]; then
		echo 3 >/proc/sys/vm/drop_caches
	fi
}

# median prints the median of the numbers on standard input, one a line.
median() {
	sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}
