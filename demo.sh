#!/usr/bin/env bash
# demo.sh: build imgloop; create a small qcow2 image and an overlay on
# it, write to them with qemu-io, and run imgloop info, map, resize,
# convert (to compressed qcow2 and to raw) and check on them, comparing
# the result with qemu-img's; then serve the overlay over NBD with
# imgloop serve and read and write it with qemu-img, qemu-io and nbdinfo.
set -euo pipefail
root=$(cd "$(dirname "$0")" && pwd)

# The demo (and the tests) use QEMU's tools as the reference; install
# them on Debian/Ubuntu when missing and we may.
if ! command -v qemu-img >/dev/null || ! command -v qemu-io >/dev/null || ! command -v nbdinfo >/dev/null; then
	if [[ $(id -u) = 0 ]] && command -v apt-get >/dev/null; then
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-utils libnbd-bin >/dev/null
	else
		echo "demo.sh: needs qemu-img, qemu-io and nbdinfo (Debian: apt-get install qemu-utils libnbd-bin)" >&2
		exit 1
	fi
fi
dir=$(mktemp -d /tmp/imgloop-demo.XXXXXX)
trap 'if [[ -n $server ]]; then kill $server 2>/dev/null || true; fi; rm -rf "$dir"' EXIT
server=

(cd "$root" && go build -o "$dir/imgloop" ./cmd/imgloop)
cd "$dir"
set -x
./imgloop create -f qcow2 base.qcow2 64M
{ set +x; } 2>/dev/null
qemu-io -f qcow2 -c 'write -P 0xab 0 1M' -c 'write -P 0xcd 32M 64k' base.qcow2 >/dev/null
set -x
./imgloop create -f qcow2 -b base.qcow2 -F qcow2 overlay.qcow2
{ set +x; } 2>/dev/null
qemu-io -f qcow2 -c 'write -P 0xef 512k 1M' -c 'write -z 32M 4k' overlay.qcow2 >/dev/null
set -x
./imgloop info overlay.qcow2
./imgloop map overlay.qcow2
./imgloop map --offset 33554433 overlay.qcow2
./imgloop resize overlay.qcow2 +64M
./imgloop convert -p -c -O qcow2 overlay.qcow2 packed.qcow2
./imgloop check packed.qcow2
./imgloop convert -O raw packed.qcow2 demo.raw
{ set +x; } 2>/dev/null
qemu-img convert -O raw overlay.qcow2 qemu.raw
cmp demo.raw qemu.raw && echo "demo.raw is identical to qemu-img's raw copy of overlay.qcow2; packed.qcow2 is $(du -h packed.qcow2 | cut -f1), demo.raw allocates $(du -h demo.raw | cut -f1) of 128M"

# The overlay as a network block device: imgloop serve on a unix socket
# (--fork returns once it accepts connections), used by QEMU's and
# libnbd's clients.
set -x
./imgloop serve --fork --pidfile serve.pid --socket "$dir/nbd.sock" --name demo overlay.qcow2
{ set +x; } 2>/dev/null
server=$(cat serve.pid)
uri="nbd+unix:///demo?socket=$dir/nbd.sock"
set -x
nbdinfo "$uri"
nbdinfo --map "$uri"
qemu-io -f raw -c 'write -P 0x42 8M 1M' -c flush -c 'read -P 0x42 8M 1M' "$uri"
qemu-img convert -f raw -O raw "$uri" over-nbd.raw
kill -TERM "$server"
{ set +x; } 2>/dev/null
while kill -0 "$server" 2>/dev/null; do sleep 0.05; done
qemu-img check overlay.qcow2 >/dev/null
qemu-img convert -O raw overlay.qcow2 qemu.raw
cmp over-nbd.raw qemu.raw && echo "read over NBD: identical to qemu-img's raw copy; the write through NBD is in overlay.qcow2, which qemu-img check finds clean"
