#!/bin/bash
# scripts/bench-link.sh - benchmark the mirror link against the RDMA floor, in the test VM.
#
# On the host:   scripts/bench-link.sh
#   builds nothing itself: run `cargo build --release --workspace` first (or scripts/test.sh);
#   boots the test VM through scripts/test.sh with this same script as the "test", then prints
#   the Markdown table the VM wrote.
# In the VM (started by the harness, NVM_OUT set): on one Soft-RoCE device (rxe on a dummy
#   netdev) runs perftest's ib_write_lat -s 4096 and ib_write_bw -s 65536 (the floor), then
#   nvmirror-linktest over RDMA and over TCP: 4 KiB post-to-durable-ack latency at QD1 and
#   64 KiB throughput with a deep window; prints a Markdown table with ratios. The link runs
#   with its default, every message authenticated (frame MACs); the same four runs with
#   `--frame-mac 0` give the cost of the MACs (rows "... without frame MACs").
#
# Binaries: $CARGO_TARGET_DIR/release (else target/release) of the repository, as
#   scripts/test.sh finds them: `CARGO_TARGET_DIR=DIR cargo build --release --workspace`, then
#   `CARGO_TARGET_DIR=DIR scripts/bench-link.sh`.
#
# Knobs: BENCH_LAT_N (QD1 posts, default 2000), BENCH_BW_N (64 KiB posts, default 3000),
#        BENCH_QD (deep window, default 64), BENCH_BUSY_POLL_SWEEP (extra RDMA rows, one per
#        busy-poll window in µs, e.g. "0 100 500"), BENCH_MAC_COMPARE (default 1; 0 skips the
#        runs without frame MACs).
# vm-timeout: 280
set -uo pipefail

if [[ -z ${NVM_OUT:-} ]]; then
	repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
	export NVM_RESULTS=${NVM_RESULTS:-$repo/target/vm-results/bench-$(date +%Y%m%d-%H%M%S)}
	# The VM sees the repository (read-only), not this environment: hand the knobs over in a file.
	mkdir -p "$repo/target"
	knobs=$(compgen -v BENCH_ || true)
	: >"$repo/target/bench-link.env"
	# (declare -p without names would dump every variable)
	# shellcheck disable=SC2086 # one name per word
	[[ -n $knobs ]] && declare -p $knobs >"$repo/target/bench-link.env"
	"$repo/scripts/test.sh" --vm-only "$repo/scripts/bench-link.sh" || true
	table=$NVM_RESULTS/tests/bench-link/bench-link.md
	if [[ -f $table ]]; then
		cat "$table"
		exit 0
	fi
	echo "bench-link: no table produced; see $NVM_RESULTS" >&2
	exit 1
fi

# shellcheck disable=SC1091
[[ -f $NVM_REPO/target/bench-link.env ]] && source "$NVM_REPO/target/bench-link.env"
BIN=$NVM_BIN/nvmirror-linktest
ADDR=192.0.2.31 # RFC 5737 documentation range, on a dummy netdev inside the VM only
LAT_N=${BENCH_LAT_N:-2000}
BW_N=${BENCH_BW_N:-3000}
QD=${BENCH_QD:-64}
[[ -x $BIN ]] || { echo "FAIL: $BIN not built"; exit 1; }

rxe_added=0 dummy_added=0
pids=()
cleanup() {
	set +e
	for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null; done
	wait 2>/dev/null
	((rxe_added)) && rdma link delete rxe31
	((dummy_added)) && ip link delete d31
	return 0
}
trap cleanup EXIT
modprobe rdma_rxe || { echo "SKIP: no rdma_rxe"; exit 77; }
modprobe dummy || true
modprobe rdma_ucm || true
ip link add d31 type dummy && dummy_added=1 && ip addr add "$ADDR/24" dev d31 && ip link set d31 up &&
	rdma link add rxe31 type rxe netdev d31 && rxe_added=1 || { echo "FAIL: no rxe31"; exit 1; }
for _ in $(seq 50); do rdma link show rxe31/1 2>/dev/null | grep -q ACTIVE && break; sleep 0.1; done
ulimit -l unlimited || true
gid_idx=$(ibv_devinfo -v -d rxe31 2>/dev/null | awk -v a="$ADDR" '
	/GID\[/ && index($0, a) { gsub(/.*GID\[ */, ""); gsub(/\].*/, ""); print; exit }')
gid_idx=${gid_idx:-1}
echo "kernel $(uname -r), $(nproc) vCPUs, GID index $gid_idx"

# perftest: server in the background, client in the foreground.
perf() {
	local tool=$1 port=$2
	shift 2
	timeout 120 "$tool" -d rxe31 -x "$gid_idx" -p "$port" "$@" >"$NVM_OUT/$tool.server.log" 2>&1 &
	pids+=($!)
	sleep 1
	timeout 120 "$tool" -d rxe31 -x "$gid_idx" -p "$port" "$@" "$ADDR" >"$NVM_OUT/$tool.log" 2>&1
	cat "$NVM_OUT/$tool.log"
}
perf ib_write_lat 18531 -s 4096 -n "$LAT_N"
# columns: bytes iterations t_min t_max t_typical t_avg t_stdev p99 p99.9
read -r lat_typ lat_p99 < <(awk '$1 == 4096 && NF >= 8 { print $5, $8; exit }' "$NVM_OUT/ib_write_lat.log")
perf ib_write_bw 18532 -s 65536 -n "$BW_N"
# columns: bytes iterations BW_peak BW_average MsgRate (MB/s = 2^20 B/s in perftest)
bw_avg=$(awk '$1 == 65536 && NF >= 5 { print $4; exit }' "$NVM_OUT/ib_write_bw.log")

# our link: a server per transport, then the QD1 latency and deep-window throughput runs.
# link TRANSPORT PORT SIZE QD COUNT NAME [BUSY_POLL_US] [FRAME_MAC 0|1]
link() {
	local tr=$1 port=$2 size=$3 qd=$4 n=$5 name=$6 poll=${7:-} mac=${8:-}
	local extra=()
	[[ -n $poll ]] && extra+=(--busy-poll-us "$poll")
	[[ -n $mac ]] && extra+=(--frame-mac "$mac")
	"$BIN" server --transport "$tr" --listen "$ADDR:$port" --duration-s 200 --no-verify --region-mb 256 --window 128 "${extra[@]}" >"$NVM_OUT/$name.server.log" 2>&1 &
	local srv=$!
	pids+=($srv)
	sleep 0.5
	timeout 150 "$BIN" client --transport "$tr" --connect "$ADDR:$port" --size "$size" --qd "$qd" --count "$n" \
		--region-mb 256 --window 128 "${extra[@]}" >"$NVM_OUT/$name.log" 2>&1
	kill -KILL "$srv" 2>/dev/null
	grep RESULT "$NVM_OUT/$name.log" || echo "RESULT missing for $name" >&2
}
field() { grep -o "$2=[0-9.]*" "$NVM_OUT/$1.log" | head -1 | cut -d= -f2; }
# delta WITH WITHOUT: "+12.3"; pct WITH WITHOUT: throughput change in percent
delta() { awk -v a="${1:-0}" -v b="${2:-0}" 'BEGIN { printf "%+.1f", a - b }'; }
pct() { awk -v a="${1:-0}" -v b="${2:-0}" 'BEGIN { if (b > 0) printf "%+.1f%%", 100 * (a - b) / b; else print "n/a" }'; }
link rdma 7401 4096 1 "$LAT_N" rdma-lat
link rdma 7402 65536 "$QD" "$BW_N" rdma-bw
link tcp 7403 4096 1 "$LAT_N" tcp-lat
link tcp 7404 65536 "$QD" "$BW_N" tcp-bw

# The same without frame MACs: what authenticating every message and record costs.
mac_rows=()
if [[ ${BENCH_MAC_COMPARE:-1} != 0 ]]; then
	link rdma 7405 4096 1 "$LAT_N" rdma-lat-nomac "" 0
	link rdma 7406 65536 "$QD" "$BW_N" rdma-bw-nomac "" 0
	link tcp 7407 4096 1 "$LAT_N" tcp-lat-nomac "" 0
	link tcp 7408 65536 "$QD" "$BW_N" tcp-bw-nomac "" 0
	for tr in rdma tcp; do
		TR=$(echo "$tr" | tr a-z A-Z)
		mac_rows+=("| $TR link without frame MACs: 4 KiB QD1 p50 / p99, 64 KiB QD $QD | $(field "$tr-lat-nomac" p50_us) / $(field "$tr-lat-nomac" p99_us) µs, $(field "$tr-bw-nomac" MBps) MB/s | MACs cost: QD1 p50 $(delta "$(field "$tr-lat" p50_us)" "$(field "$tr-lat-nomac" p50_us)") µs, 64 KiB $(pct "$(field "$tr-bw" MBps)" "$(field "$tr-bw-nomac" MBps)") |")
	done
fi

# BENCH_BUSY_POLL_SWEEP="0 200 ...": the RDMA QD1 latency at each busy-poll window (µs).
sweep=()
port=7410
for poll in ${BENCH_BUSY_POLL_SWEEP:-}; do
	link rdma $((port++)) 4096 1 "$LAT_N" "rdma-lat-poll$poll" "$poll"
	link rdma $((port++)) 65536 "$QD" "$BW_N" "rdma-bw-poll$poll" "$poll"
	sweep+=("| RDMA link, busy poll $poll µs: QD1 p50 / p99, 64 KiB QD $QD | $(field "rdma-lat-poll$poll" p50_us) / $(field "rdma-lat-poll$poll" p99_us) µs, $(field "rdma-bw-poll$poll" MBps) MB/s | |")
done

r_p50=$(field rdma-lat p50_us) r_p99=$(field rdma-lat p99_us) r_bw=$(field rdma-bw MBps)
t_p50=$(field tcp-lat p50_us) t_p99=$(field tcp-lat p99_us) t_bw=$(field tcp-bw MBps)
# perftest reports MB/s as 2^20 bytes/s; ours are 10^6 bytes/s: convert perftest to 10^6.
bw_floor=$(awk -v b="${bw_avg:-0}" 'BEGIN { printf "%.1f", b * 1.048576 }')
# A post -> ack is a round trip; perftest's latency is half of one.
rtt=$(awk -v t="${lat_typ:-0}" 'BEGIN { printf "%.1f", 2 * t }')
ratio() { awk -v a="${1:-0}" -v b="${2:-0}" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "n/a" }'; }

{
	echo "| measurement (rxe on a dummy netdev, $(uname -r), $(nproc) vCPU VM) | value | vs floor |"
	echo "| --- | --- | --- |"
	echo "| \`ib_write_lat -s 4096\` typical / p99 (half a round trip) | ${lat_typ:-?} / ${lat_p99:-?} µs | |"
	echo "| round trip floor: 2 x \`ib_write_lat\` typical | $rtt µs | floor |"
	echo "| RDMA link, 4 KiB post -> durable ack, QD1, p50 / p99 (frame MACs on, the default) | $r_p50 / $r_p99 µs | $(ratio "$r_p50" "$rtt") |"
	echo "| TCP link, 4 KiB post -> durable ack, QD1, p50 / p99 | $t_p50 / $t_p99 µs | $(ratio "$t_p50" "$rtt") |"
	echo "| \`ib_write_bw -s 65536\` average | $bw_floor MB/s | floor |"
	echo "| RDMA link, 64 KiB posts, QD $QD | $r_bw MB/s | $(ratio "$r_bw" "$bw_floor") |"
	echo "| TCP link, 64 KiB posts, QD $QD | $t_bw MB/s | $(ratio "$t_bw" "$bw_floor") |"
	for row in "${mac_rows[@]}"; do echo "$row"; done
	for row in "${sweep[@]}"; do echo "$row"; done
	echo
	echo "RDMA vs TCP: latency p50 $(ratio "$t_p50" "$r_p50") lower on RDMA, throughput $(ratio "$r_bw" "$t_bw") of TCP."
} | tee "$NVM_OUT/bench-link.md"
