#!/usr/bin/env bash
# bench/nbd.sh: imgloop serve against qemu-nbd (and, for raw, nbdkit's
# file plugin) on the same images, driven by the same clients:
#
#   fio's nbd engine: 4 KiB random read at QD1 and QD32, 1 MiB sequential
#     read at QD8 (raw, qcow2, compressed qcow2); 4 KiB random write at
#     QD32 into a fresh qcow2;
#   nbdcopy of the whole image to null: with 1 and 4 connections;
#   the fleet: FLEET clients at once each reading a golden qcow2 of
#     FLEET_SIZE with nbdcopy, and the servers' peak RSS meanwhile.
#
# Each row prints both figures and the ratio imgloop / peer, higher is
# better for imgloop (for times, the ratio is the peer's time over
# imgloop's). qemu-nbd runs with -t --shared=N (it advertises no
# multi-conn, so nbdcopy uses one connection with it).
#
#   SIZE=1G RUNTIME=5 FLEET=64 FLEET_SIZE=128M bash bench/nbd.sh
#
# Needs qemu-img, qemu-nbd, nbdkit, nbdcopy and fio (its nbd engine).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

SIZE=${SIZE:-1G}
RUNTIME=${RUNTIME:-5}
FLEET=${FLEET:-64}
FLEET_SIZE=${FLEET_SIZE:-128M}
for tool in qemu-img qemu-nbd nbdkit nbdcopy fio python3; do
	command -v "$tool" >/dev/null || { echo "bench/nbd.sh: $tool not found" >&2; exit 1; }
done
build_imgloop
imgloop=$dir/imgloop
sock=$dir/nbd.sock
server_pid=

stop_server() {
	if [[ -n $server_pid ]]; then
		kill "$server_pid" 2>/dev/null || true
		wait "$server_pid" 2>/dev/null || true
		server_pid=
	fi
	rm -f "$sock"
}
trap stop_server EXIT

# start SERVER FORMAT IMAGE [ro|rw]: serves IMAGE on $sock.
start() {
	local server=$1 fmt=$2 image=$3 mode=${4:-ro} ro=()
	stop_server
	case $server in
	imgloop)
		[[ $mode == ro ]] && ro=(-r)
		"$imgloop" serve "${ro[@]}" -f "$fmt" --socket "$sock" "$image" >/dev/null &
		;;
	qemu-nbd)
		[[ $mode == ro ]] && ro=(-r)
		qemu-nbd -t --shared=$((FLEET + 4)) "${ro[@]}" -f "$fmt" -k "$sock" --cache=writeback "$image" &
		;;
	nbdkit)
		[[ $mode == ro ]] && ro=(--readonly)
		nbdkit --foreground "${ro[@]}" -U "$sock" file "$image" &
		;;
	esac
	server_pid=$!
	for _ in $(seq 200); do
		[[ -S $sock ]] && nbdinfo --size "nbd+unix:///?socket=$sock" >/dev/null 2>&1 && return
		sleep 0.05
	done
	echo "bench/nbd.sh: $server did not start" >&2
	exit 1
}

uri() { echo "nbd+unix:///?socket=$sock"; }

# fio_run RW BS QD: prints the IOPS (4k) or MiB/s (else) of one fio job.
fio_run() {
	local rw=$1 bs=$2 qd=$3 out=$dir/fio.json
	fio --name=bench --ioengine=nbd --uri="$(uri)" --rw="$rw" --bs="$bs" --iodepth="$qd" \
		--runtime="$RUNTIME" --time_based --ramp_time=1 --output-format=json --output="$out" >/dev/null
	python3 - "$out" "$bs" <<-'EOF'
	import json, sys
	j = json.load(open(sys.argv[1]))["jobs"][0]
	side = j["write"] if j["write"]["io_bytes"] else j["read"]
	print("%.0f" % side["iops"] if sys.argv[2] == "4k" else "%.0f" % (side["bw_bytes"] / 2**20))
	EOF
}

# seconds CMD...: prints how long CMD took.
seconds() {
	local t0 t1
	t0=$(date +%s.%N)
	"$@" >/dev/null
	t1=$(date +%s.%N)
	echo "$t1 - $t0" | bc -l | xargs printf '%.3f\n'
}

# fleet: FLEET nbdcopy clients at once; prints seconds and the server's
# peak RSS in MiB.
fleet() {
	local t0 t1 pids=()
	t0=$(date +%s.%N)
	for _ in $(seq "$FLEET"); do
		nbdcopy --connections=1 "$(uri)" null: &
		pids+=($!)
	done
	wait "${pids[@]}"
	t1=$(date +%s.%N)
	local rss
	rss=$(awk '/VmHWM/ { printf "%.0f", $2 / 1024 }' "/proc/$server_pid/status")
	printf '%.3f %s\n' "$(echo "$t1 - $t0" | bc -l)" "$rss"
}

# row NAME UNIT HIGHER ours peer PEERNAME: prints one result line.
row() {
	local name=$1 unit=$2 better=$3 ours=$4 peer=$5 peername=$6 ratio
	if [[ $better == high ]]; then
		ratio=$(echo "$ours / $peer" | bc -l)
	else
		ratio=$(echo "$peer / $ours" | bc -l)
	fi
	printf '%-34s %-9s imgloop %10s  %-8s %10s  ratio %.2fx\n' "$name" "$unit" "$ours" "$peername" "$peer" "$ratio"
}

echo "making images ($SIZE) in $dir" >&2
raw=$dir/img.raw
# Half random, half text: compressible but not trivially.
bytes=$(numfmt --from=iec "$SIZE")
{
	head -c $((bytes / 2)) /dev/urandom
	head -c $((bytes - bytes / 2)) < <(base64 -w 4096 /dev/urandom)
} >"$raw"
qemu-img convert -f raw -O qcow2 "$raw" "$dir/img.qcow2"
qemu-img convert -f raw -O qcow2 -c "$raw" "$dir/img-c.qcow2"
head -c "$(numfmt --from=iec "$FLEET_SIZE")" "$raw" >"$dir/golden.raw"
qemu-img convert -f raw -O qcow2 "$dir/golden.raw" "$dir/golden.qcow2"
rm "$dir/golden.raw"
# Write the images back now, not while the first rows run.
sync
echo
echo "imgloop vs peers, $SIZE images, fio runtime ${RUNTIME}s, unix socket, page cache warm"
for shape in raw:raw:img.raw qcow2:qcow2:img.qcow2 compressed:qcow2:img-c.qcow2; do
	IFS=: read -r label fmt file <<<"$shape"
	peers=(qemu-nbd)
	[[ $label == raw ]] && peers+=(nbdkit)
	declare -A fig=()
	for server in imgloop "${peers[@]}"; do
		start "$server" "$fmt" "$dir/$file"
		cat "$dir/$file" >/dev/null
		fig[$server.rr1]=$(fio_run randread 4k 1)
		fig[$server.rr32]=$(fio_run randread 4k 32)
		fig[$server.seq]=$(fio_run read 1M 8)
		fig[$server.copy1]=$(seconds nbdcopy --connections=1 "$(uri)" null:)
		fig[$server.copy4]=$(seconds nbdcopy --connections=4 "$(uri)" null:)
		stop_server
	done
	for peer in "${peers[@]}"; do
		row "$label 4k randread QD1" IOPS high "${fig[imgloop.rr1]}" "${fig[$peer.rr1]}" "$peer"
		row "$label 4k randread QD32" IOPS high "${fig[imgloop.rr32]}" "${fig[$peer.rr32]}" "$peer"
		row "$label 1M seq read QD8" MiB/s high "${fig[imgloop.seq]}" "${fig[$peer.seq]}" "$peer"
		row "$label nbdcopy 1 conn" s low "${fig[imgloop.copy1]}" "${fig[$peer.copy1]}" "$peer"
		row "$label nbdcopy 4 conns" s low "${fig[imgloop.copy4]}" "${fig[$peer.copy4]}" "$peer"
	done
	unset fig
done

declare -A w=()
for server in imgloop qemu-nbd; do
	rm -f "$dir/fresh.qcow2"
	qemu-img create -q -f qcow2 "$dir/fresh.qcow2" "$SIZE"
	start "$server" qcow2 "$dir/fresh.qcow2" rw
	w[$server]=$(fio_run randwrite 4k 32)
	stop_server
done
row "fresh qcow2 4k randwrite QD32" IOPS high "${w[imgloop]}" "${w[qemu-nbd]}" qemu-nbd

declare -A f=()
for server in imgloop qemu-nbd; do
	start "$server" qcow2 "$dir/golden.qcow2"
	read -r secs rss < <(fleet)
	f[$server]=$secs
	f[$server.rss]=$rss
	stop_server
done
row "fleet: $FLEET x $FLEET_SIZE qcow2 reads" s low "${f[imgloop]}" "${f[qemu-nbd]}" qemu-nbd
echo "fleet peak RSS: imgloop ${f[imgloop.rss]} MiB, qemu-nbd ${f[qemu-nbd.rss]} MiB"
