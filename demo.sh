#!/usr/bin/env bash
# demo.sh: build imgloop, make a small qcow2 image with qemu-img and
# qemu-io, and run imgloop info, map and convert on it.
set -euo pipefail
root=$(cd "$(dirname "$0")" && pwd)

# The demo (and the tests) use QEMU's tools as the reference; install
# them on Debian/Ubuntu when missing and we may.
if ! command -v qemu-img >/dev/null || ! command -v qemu-io >/dev/null; then
	if [[ $(id -u) = 0 ]] && command -v apt-get >/dev/null; then
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-utils >/dev/null
	else
		echo "demo.sh: needs qemu-img and qemu-io (Debian: apt-get install qemu-utils)" >&2
		exit 1
	fi
fi
dir=$(mktemp -d /tmp/imgloop-demo.XXXXXX)
trap 'rm -rf "$dir"' EXIT

(cd "$root" && go build -o "$dir/imgloop" ./cmd/imgloop)
cd "$dir"
qemu-img create -q -f qcow2 demo.qcow2 64M
qemu-io -f qcow2 -c 'write -P 0xab 0 1M' -c 'write -z 8M 1M' -c 'write -P 0xcd 32M 64k' demo.qcow2 >/dev/null

set -x
./imgloop info demo.qcow2
./imgloop map demo.qcow2
./imgloop map --output=json demo.qcow2
./imgloop map --offset 33554433 demo.qcow2
./imgloop convert -p -O raw demo.qcow2 demo.raw
{ set +x; } 2>/dev/null
qemu-img convert -O raw demo.qcow2 qemu.raw
cmp demo.raw qemu.raw && echo "demo.raw is identical to qemu-img's output; allocated: $(du -h demo.raw | cut -f1) of 64M"
