#!/bin/bash
# Claim set C, step 1 (docs/log-shipping.md): three sources and one destination, four
# daemons over TCP (over RDMA, Soft-RoCE, with NVM_TRANSPORT=rdma: test 33). Each source stages its writes, posts every record into its own NVRAM
# area on the destination and acknowledges a write once both hold it. With the sources'
# flushers paused the destination holds every record fio wrote (counted against the
# sources' own counts); once the sources drained to their media the destination has let
# all of them go. fio verify passes on every source. A pair node that reaches the
# destination is refused with both roles named, and the destination keeps serving. A
# destination killed and restarted finds every held record again in its NVRAM, and a source
# with degraded = "nvram" sends it the writes it acknowledged alone meanwhile.
# vm-timeout: 300
source "$NVM_REPO/tests/vm/lib/nvm.sh"
nvm_init
head -c 48 /dev/urandom | base64 >secret
transport=${NVM_TRANSPORT:-tcp}
addr=127.0.0.1
if [[ $transport == rdma ]]; then
	nvm_rxe_up
	addr=10.99.0.1
fi
sources=(src1 src2 src3)
fio_pids=()
port=7841

# dest_field EXPR: a Python expression over the destination's status `d` (JSON).
dest_field() {
	"$NVMCTL" --config dest.toml status --json | python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"
}
# held NAME: records of source NAME held in its NVRAM area on the destination.
held() { dest_field "[s['held_records'] for s in d['sources'] if s['name'] == '$1'][0]"; }

{
	cat <<-CFG
	[node]
	name = "dest"
	control_socket = "$PWD/dest.sock"

	[nvram]
	path = "$PWD/nvram-dest.img"
	size = "96MiB"
	partitions = 4

	[shipping]
	role = "destination"
	id = 77
	secret_file = "$PWD/secret"
	transport = "$transport"
	heartbeat_interval_ms = 100
	heartbeat_timeout_ms = 1000
	CFG
	for i in 0 1 2; do
		cat <<-CFG

		[[shipping.source]]
		name = "${sources[i]}"
		listen = "$addr:$((port + i))"
		nvram_size = "32MiB"
		CFG
	done
} >dest.toml
"$NVMD" --config dest.toml --state-dir "$PWD/state" >>daemon-dest.log 2>&1 &
NVM_DAEMON_PIDS+=($!)
dest_pid=$!
for _ in $(seq 100); do dest_field 'len(d["sources"])' >/dev/null 2>&1 && break; sleep 0.2; done
[[ $(dest_field 'len(d["sources"])') == 3 ]] || { tail daemon-dest.log; fail "the destination did not come up"; }
say "destination up, listening for ${sources[*]}"

# A pair node (the linktest's client speaks as one) reaching src3's port is refused, naming
# both roles on both sides.
"$NVM_BIN/nvmirror-linktest" client --transport "$transport" --connect "$addr:$((port + 2))" \
	--secret "$(cat secret)" --cluster 77 --node 5 --peer 6 --count 1 --size 4096 --qd 1 \
	--expect-reject "role mismatch" >linktest-wrong-role.log 2>&1 ||
	{ cat linktest-wrong-role.log; fail "a pair node reaching the destination was not refused"; }
grep -q "this node is a log-shipping destination but the peer is a node of a mirrored pair" daemon-dest.log ||
	{ tail -5 daemon-dest.log; fail "the destination's log does not name both roles"; }
say "a pair node reaching the destination was refused: $(grep -o 'role mismatch[^;]*' daemon-dest.log | head -1)"

for i in 0 1 2; do
	s=${sources[i]}
	nvm_config "$s.toml" "$s" "$PWD/nvram-$s.img" 32 "$(nvm_medium "medium-$s" 64)" "$i"
	cat >>"$s.toml" <<-CFG

	[shipping]
	role = "source"
	id = 77
	secret_file = "$PWD/secret"
	transport = "$transport"
	heartbeat_interval_ms = 100
	heartbeat_timeout_ms = 1000
	degraded = "$([[ $s == src3 ]] && echo nvram || echo write-through)"

	[shipping.destination]
	name = "dest"
	address = "$addr:$((port + i))"
	CFG
	nvm_start "$s.toml" "daemon-$s.log"
done
for _ in $(seq 100); do
	[[ $(dest_field 'sum(s["link"] == "up" for s in d["sources"])') == 3 ]] && break
	sleep 0.2
done
[[ $(dest_field 'sum(s["link"] == "up" for s in d["sources"])') == 3 ]] ||
	{ dest_field 'd["sources"]'; fail "not every source's link came up"; }
# mirror_of NAME: "STATE MIRRORED DEGRADED" of source NAME's mirror.
mirror_of() {
	local out
	out=$("$NVMCTL" --config "$1.toml" status --json) || fail "no status from $1"
	python3 -c '
import json, sys
m = json.loads(sys.argv[1])["engine"]["mirror"]
print(m["state"], m["mirrored_records"], m["degraded_records"])' "$out"
}
for s in "${sources[@]}"; do
	for _ in $(seq 100); do [[ $(mirror_of "$s") == mirroring* ]] && break; sleep 0.2; done
done
say "all three sources are connected to the destination"

# 384 writes of 16 KiB spread over the LUN (all four partitions), which the paused
# flushers leave in the sources' NVRAM and so in the destination's areas.
job=(--direct=1 --ioengine=libaio --iodepth=16 --rw=randwrite --bs=16k --size=60M --io_size=6M
	--verify=crc32c --verify_fatal=1 --verify_state_save=1)
for i in 0 1 2; do
	s=${sources[i]}
	"$NVMCTL" --config "$s.toml" flush pause >/dev/null
	fio "${job[@]}" --name="$s" --randseed=$((40 + i)) --filename="/dev/ublkb$i" --do_verify=0 \
		--output="fio-write-$s.log" &
	fio_pids+=($!)
done
for p in "${fio_pids[@]}"; do wait "$p" || fail "fio's write pass failed (fio-write-*.log)"; done
for i in 0 1 2; do
	s=${sources[i]}
	read -r state mirrored degraded <<<"$(mirror_of "$s")"
	h=$(held "$s")
	say "$s: mirror $state, $mirrored record(s) mirrored, $degraded degraded; the destination holds $h"
	[[ $state == mirroring ]] || fail "$s is not mirroring to the destination"
	((degraded == 0)) || fail "$s acknowledged $degraded write(s) without the destination's copy"
	((mirrored >= 384 && h >= 384)) || fail "$s: 384 writes of 16 KiB, but $mirrored mirrored and $h held"
done

# The destination killed: src3 (degraded = "nvram") acknowledges 64 more writes from its
# own NVRAM alone. Restarted, the destination finds every held record again in its NVRAM
# areas, and src3 sends it the 64 it lacks.
kill -9 "$dest_pid"
nvm_wait_gone "$dest_pid"
for _ in $(seq 100); do [[ $(mirror_of src3) == degraded* ]] && break; sleep 0.2; done
[[ $(mirror_of src3) == degraded* ]] || fail "src3 did not notice the destination's death"
outage=(--direct=1 --ioengine=libaio --iodepth=16 --rw=randwrite --bs=16k --offset=60M --size=4M
	--io_size=1M --verify=crc32c --verify_fatal=1 --verify_state_save=1 --name=src3-outage
	--randseed=49 --filename=/dev/ublkb2)
fio "${outage[@]}" --do_verify=0 --output=fio-write-src3-outage.log || fail "fio's outage writes failed"
read -r _ _ degraded <<<"$(mirror_of src3)"
((degraded >= 64)) || fail "src3 acknowledged $degraded write(s) without the destination, not 64"
"$NVMD" --config dest.toml --state-dir "$PWD/state" >>daemon-dest.log 2>&1 &
NVM_DAEMON_PIDS+=($!)
dest_pid=$!
want() { if [[ $1 == src3 ]]; then echo 448; else echo 384; fi; }
for _ in $(seq 150); do
	short=0
	for s in "${sources[@]}"; do
		h=$(held "$s" 2>/dev/null) || h=0
		((h >= $(want "$s"))) || short=1
	done
	((short == 0)) && break
	sleep 0.2
done
[[ $(dest_field 'sum(s["link"] == "up" for s in d["sources"])') == 3 ]] ||
	{ dest_field 'd["sources"]'; fail "not every source reconnected to the restarted destination"; }
for s in "${sources[@]}"; do
	h=$(held "$s")
	((h >= $(want "$s"))) || fail "after its restart the destination holds $h record(s) of $s, not $(want "$s")"
done
say "the destination, killed and restarted, holds every record again ($(grep -c 'unreleased record(s) of the partner found' daemon-dest.log) area(s) rebuilt from its NVRAM), and the 64 that src3 acknowledged alone meanwhile: $(held src3) held of src3"

for i in 0 1 2; do
	s=${sources[i]}
	"$NVMCTL" --config "$s.toml" flush resume >/dev/null
	"$NVMCTL" --config "$s.toml" drain --timeout 60 >/dev/null
done
for _ in $(seq 50); do
	[[ $(dest_field 'sum(s["held_records"] for s in d["sources"])') == 0 ]] && break
	sleep 0.2
done
left=$(dest_field 'sum(s["held_records"] for s in d["sources"])')
((left == 0)) || fail "the destination still holds $left record(s) the sources flushed and released"
say "the sources drained to their media; the destination let every record go"

for i in 0 1 2; do
	s=${sources[i]}
	fio "${job[@]}" --name="$s" --randseed=$((40 + i)) --filename="/dev/ublkb$i" --verify_only=1 \
		--verify_state_load=1 --output="fio-verify-$s.log" ||
		{ cat "fio-verify-$s.log"; fail "fio verify failed on $s"; }
done
fio "${outage[@]}" --verify_only=1 --verify_state_load=1 --output=fio-verify-src3-outage.log ||
	{ cat fio-verify-src3-outage.log; fail "fio verify failed on src3's outage writes"; }
kill -0 "$dest_pid" || fail "the destination died"
"$NVMCTL" --config dest.toml status
say "PASS ($transport): three sources shipped every write into the destination's NVRAM before acknowledging it; fio verify passed on each"
