#!/bin/bash
# Claim set C, steps 1 and 2 (docs/log-shipping.md): three sources and one destination, four
# daemons over TCP (over RDMA, Soft-RoCE, with NVM_TRANSPORT=rdma: test 33). Each source
# stages its writes, posts every record into its own NVRAM area on the destination and
# acknowledges a write once both hold it. The destination appends each source's records
# to its log files in sequence order (`nvmirrorctl log-files` checks every record) and then
# lets them leave its NVRAM: with the sources' flushers paused, the files hold every record
# fio wrote (counted against the sources' own counts). A destination killed and restarted
# goes on with its files, and a source with degraded = "nvram" sends it the writes it
# acknowledged alone meanwhile; no file has a gap. The sources then drain, each batch
# leaving a source's log only once the destination confirms it is in its log file. With the
# destination away for longer than two heartbeat timeouts, src1's batches leave its log
# without it; back, the destination ends src1's file before what it never got (a gap,
# counted and named) and confirms src1's later batches again. fio
# verify passes on every source. A pair node that reaches the destination is refused with
# both roles named, and the destination keeps serving. Step 3: after each consistency
# point (`nvmirrorctl checkpoint`) a drained source's medium and the destination's image of
# it have the same checksum, and the log files are gone; after src1's gap its images say
# what they lack. Last, src2 dies mid-fio; `export` brings its image up to date from the
# destination's log files, and fio verifies every acknowledged write on the image. Served
# by a single node, the image takes writes; src2, started while the destination is away,
# serves until it reconnects and hears of the export, then stops; given back
# (`return-image`), src2 takes its volume back with only the changed blocks copied.
# vm-timeout: 600
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
declare -A before src_pid medium

# dest_field EXPR: a Python expression over the destination's status `d` (JSON).
dest_field() {
	"$NVMCTL" --config dest.toml status --json | python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"
}
# logged NAME: records of source NAME in its log files on the destination, after checking
# every file (wrap markers not counted).
logged() {
	"$NVMCTL" log-files "logs/$1" --json | python3 -c "import json,sys; print(sum(f['records'] for f in json.load(sys.stdin)['files']))"
}
# one_file_each NAME: each partition of NAME's log is one file (a gap would start another;
# checked on the files, not on the destination's counters).
one_file_each() {
	"$NVMCTL" log-files "logs/$1" --json | python3 -c "
import collections, json, sys
c = collections.Counter(f['partition'] for f in json.load(sys.stdin)['files'])
sys.exit(0 if c and max(c.values()) == 1 else 1)"
}
# gaps: segments ended by records that never arrived, over every source and partition.
gaps() { dest_field 'sum(p["gaps"] for s in d["sources"] for p in s["log_files"])'; }

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
	dir = "$PWD/logs"
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
	medium[$s]=$(nvm_medium "medium-$s" 64)
	nvm_config "$s.toml" "$s" "$PWD/nvram-$s.img" 32 "${medium[$s]}" "$i"
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
	src_pid[$s]=$NVM_LAST_PID
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
# logged_all: waits until the log files hold at least `want NAME` records of every source
# and the destination's NVRAM areas are empty.
want() { if [[ $1 == src3 ]]; then echo "${src3_want:-384}"; else echo 384; fi; }
logged_all() {
	local short s
	for _ in $(seq 150); do
		short=0
		for s in "${sources[@]}"; do
			(($(logged "$s" 2>/dev/null || echo 0) >= $(want "$s"))) || short=1
		done
		((short == 0)) && [[ $(dest_field 'sum(s["held_records"] for s in d["sources"])' 2>/dev/null) == 0 ]] && return 0
		sleep 0.2
	done
	dest_field 'd["sources"]'
	fail "$1: the log files do not hold every record, or the NVRAM areas are not empty"
}
logged_all "after fio's writes"
for i in 0 1 2; do
	s=${sources[i]}
	read -r state mirrored degraded <<<"$(mirror_of "$s")"
	l=$(logged "$s")
	say "$s: mirror $state, $mirrored record(s) mirrored, $degraded degraded; its log files on the destination hold $l"
	[[ $state == mirroring ]] || fail "$s is not mirroring to the destination"
	((degraded == 0)) || fail "$s acknowledged $degraded write(s) without the destination's copy"
	((mirrored >= 384 && l == mirrored)) || fail "$s: 384 writes of 16 KiB, $mirrored mirrored, but $l in its log files"
	before[$s]=$l
done
"$NVMCTL" log-files logs/src1

# The destination killed: src3 (degraded = "nvram") acknowledges 64 more writes from its
# own NVRAM alone. Restarted, the destination goes on with its log files, and src3 sends it
# the 64 it lacks: they are logged once each.
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
src3_want=448
logged_all "after the destination's restart"
[[ $(dest_field 'sum(s["link"] == "up" for s in d["sources"])') == 3 ]] ||
	{ dest_field 'd["sources"]'; fail "not every source reconnected to the restarted destination"; }
for s in "${sources[@]}"; do
	extra=0
	[[ $s == src3 ]] && extra=64
	(($(logged "$s") == before[$s] + extra)) ||
		fail "after its restart the log files hold $(logged "$s") records of $s, not ${before[$s]} + $extra (each record once)"
done
(($(gaps) == 0)) || fail "a log file has a gap: $(dest_field 'd["sources"]')"
say "the destination, killed and restarted, went on with its log files, and src3 sent it the 64 writes it acknowledged alone meanwhile: $(logged src3) logged of src3, no gap"

# Each flushed batch leaves a source's log only once the destination says its log file
# holds it: the drains end, and the destination confirmed every batch.
for i in 0 1 2; do
	s=${sources[i]}
	"$NVMCTL" --config "$s.toml" flush resume >/dev/null
	"$NVMCTL" --config "$s.toml" drain --timeout 60 >/dev/null ||
		{ tail -5 "daemon-$s.log"; fail "$s did not drain: the destination did not confirm its batches"; }
done
(($(gaps) == 0)) || fail "a log file has a gap after the drain: $(dest_field 'd["sources"]')"
# The sources' own view of the lag: nothing in their logs unconfirmed, each partition that
# shipped confirmed through some seq.
ship_field() {
	local out
	out=$("$NVMCTL" --config "$1.toml" status --json) || fail "no status from $1"
	python3 -c 'import json, sys
d = json.loads(sys.argv[1])["engine"]["shipping"]
print(eval(sys.argv[2]))' "$out" "$2"
}
for s in "${sources[@]}"; do
	[[ $(ship_field "$s" 'sum(p["unconfirmed_records"] for p in d["partitions"])') == 0 ]] ||
		fail "$s drained but its status counts records the destination has not confirmed: $(ship_field "$s" d)"
	[[ $(ship_field "$s" 'any(p["confirmed_through"] for p in d["partitions"])') == True ]] ||
		fail "$s's status shows no seq the destination confirmed: $(ship_field "$s" d)"
done
for s in "${sources[@]}"; do
	one_file_each "$s" || { "$NVMCTL" log-files "logs/$s"; fail "$s's log has more than one file in a partition"; }
done
say "the sources drained to their media, each batch confirmed in the destination's log files"

# Consistency points (step 3): the destination applies a source's log files to its image
# and removes them; the drained source's medium and the image then have the same checksum.
# image_is_medium NAME: compares them (the image ends after its last write: zeros beyond).
image_is_medium() {
	local sums
	# (crc32, not sha256: under TCG it costs a fraction.)
	sums=$(dd if="${medium[$1]}" iflag=direct bs=1M status=none | python3 -c 'import sys, zlib
n = int(sys.argv[2])
img = open(sys.argv[1], "rb").read()
assert len(img) <= n, f"the image is {len(img)} bytes, the LUN {n}"
print(f"{zlib.crc32(sys.stdin.buffer.read()):08x} {zlib.crc32(img + bytes(n - len(img))):08x}")' "logs/$1/lun0.img" $((64 << 20))) || return 1
	say "$1: crc32 of its medium and of the destination's image of it: $sums"
	[[ ${sums% *} == "${sums#* }" ]]
}
# checkpoint NAME: a consistency point of every partition of NAME; no log file stays.
checkpoint() {
	"$NVMCTL" --config dest.toml checkpoint --source "$1" >"checkpoint-$1.txt" 2>&1 ||
		{ cat "checkpoint-$1.txt"; fail "the checkpoint of $1 failed"; }
	cat "checkpoint-$1.txt"
	! ls "logs/$1"/*.log >/dev/null 2>&1 || { ls -l "logs/$1"; fail "log files of $1 remain after its checkpoint"; }
}
for s in "${sources[@]}"; do
	checkpoint "$s"
	grep -q "lack" "checkpoint-$s.txt" && fail "$s's images lack part of its history"
	image_is_medium "$s" || fail "after a consistency point the destination's image of $s differs from $s's medium"
done
say "after a consistency point the destination's image of each source equals the source's medium (crc32), and its log files are gone"

# fio verify of every source's writes (and src3's while the destination restarted).
verify_sources() {
	local i s
	for i in 0 1 2; do
		s=${sources[i]}
		fio "${job[@]}" --name="$s" --randseed=$((40 + i)) --filename="/dev/ublkb$i" --verify_only=1 \
			--verify_state_load=1 --output="fio-verify-$s.log" ||
			{ cat "fio-verify-$s.log"; fail "fio verify failed on $s"; }
	done
	fio "${outage[@]}" --verify_only=1 --verify_state_load=1 --output=fio-verify-src3-outage.log ||
		{ cat fio-verify-src3-outage.log; fail "fio verify failed on src3's outage writes"; }
}
# CI runs the RDMA variant (test 33) this far: what follows (the destination away, export,
# return-image, a second point, the faults) is above the transport and runs in test 32;
# NVM_SOAK=1 runs it over RDMA too.
if [[ $transport == rdma && ${NVM_SOAK:-0} != 1 ]]; then
	verify_sources
	kill -0 "$dest_pid" || fail "the destination died"
	say "PASS ($transport, to the first consistency point; NVM_SOAK=1 runs the rest): three sources shipped every write into the destination's NVRAM by RDMA writes before acknowledging it, the destination's log files hold each record once in order; fio verify passed on each"
	exit 0
fi

# The destination away for longer than a source waits for it: src1 (write-through) goes on
# writing and flushing, and after two heartbeat timeouts its batches leave its log without
# the destination. Back, the destination ends src1's log file before the records it never
# got and starts a new one (the gap counted in status and named in its log), and src1's
# later batches are confirmed again.
start_destination() {
	"$NVMD" --config dest.toml --state-dir "$PWD/state" >>daemon-dest.log 2>&1 &
	NVM_DAEMON_PIDS+=($!)
	dest_pid=$!
	for _ in $(seq 150); do
		[[ $(dest_field 'sum(s["link"] == "up" for s in d["sources"])' 2>/dev/null) == 3 ]] && return 0
		sleep 0.2
	done
	fail "not every source reconnected to the restarted destination"
}
kill -9 "$dest_pid"
nvm_wait_gone "$dest_pid"
for _ in $(seq 100); do [[ $(mirror_of src1) == degraded* ]] && break; sleep 0.2; done
away=(--direct=1 --ioengine=libaio --iodepth=16 --rw=randwrite --bs=16k --offset=60M --size=4M
	--io_size=1M --verify=crc32c --verify_fatal=1 --verify_state_save=1 --filename=/dev/ublkb0)
fio "${away[@]}" --name=src1-away --randseed=51 --do_verify=0 --output=fio-write-src1-away.log ||
	fail "src1's writes while the destination was away failed"
"$NVMCTL" --config src1.toml drain --timeout 60 >/dev/null ||
	{ tail -5 daemon-src1.log; fail "src1 did not drain while the destination was away"; }
grep -q "the destination is away: flushed batches leave our log without it" daemon-src1.log ||
	fail "src1 does not say its batches left its log without the destination"
left=$(ship_field src1 'd["batches_without_destination"]')
((left >= 1)) || fail "src1's status counts no batch that left its log without the destination"
start_destination
# src1 itself sees the link up again (else its next writes would go degraded too).
for _ in $(seq 100); do [[ $(mirror_of src1) == mirroring* ]] && break; sleep 0.2; done
[[ $(mirror_of src1) == mirroring* ]] || fail "src1 does not mirror to the restarted destination: $(mirror_of src1)"
fio "${away[@]}" --name=src1-back --randseed=52 --io_size=512K --do_verify=0 --output=fio-write-src1-back.log ||
	fail "src1's writes after the destination came back failed"
"$NVMCTL" --config src1.toml drain --timeout 60 >/dev/null ||
	{ tail -5 daemon-src1.log; fail "src1 did not drain after the destination came back"; }
g=$(dest_field '[sum(p["gaps"] for p in s["log_files"]) for s in d["sources"] if s["name"] == "src1"][0]')
((g >= 1)) || fail "the destination counts no gap in src1's log files: $(dest_field 'd["sources"][0]')"
grep -q "never reached this destination" daemon-dest.log || fail "the destination's log does not name the gap"
((g == $(gaps))) || fail "a gap in the log files of a source that never lost the destination"
"$NVMCTL" log-files logs/src1 >log-files-src1.txt || fail "src1's log files do not check out after the gap"
say "the destination away: src1's batches left its log without it; back, it logged $g gap(s): $(grep -o 'records [0-9]*\.\.[0-9]* never reached this destination' daemon-dest.log | head -1)"
# Its images now lack those writes, and say so.
"$NVMCTL" --config dest.toml checkpoint --source src1 >checkpoint-src1-gap.txt 2>&1 ||
	{ cat checkpoint-src1-gap.txt; fail "the checkpoint of src1 after its gap failed"; }
grep -q "the images lack: partition [0-9]*: seqs [0-9]*\.\.[0-9]* of log [0-9a-f]* never reached the destination" checkpoint-src1-gap.txt ||
	{ cat checkpoint-src1-gap.txt; fail "src1's images do not say they lack the writes of its gap"; }
say "src1's images say what they lack: $(grep -m1 -o 'partition [0-9]*: seqs [0-9.]*' checkpoint-src1-gap.txt)"
fio "${away[@]}" --name=src1-back --randseed=52 --io_size=512K --verify_only=1 --verify_state_load=1 \
	--output=fio-verify-src1-back.log || { cat fio-verify-src1-back.log; fail "fio verify failed on src1's last writes"; }

verify_sources
# src2 dies mid-fio with its flusher paused (its acknowledged writes are only in its NVRAM
# and in the destination's). `export` puts everything the destination holds of it into its
# log files and builds its LUN as an image from them: fio verifies every acknowledged write
# on the image. (The image need not equal src2's medium after src2's restart: writes in
# flight at the kill were never acknowledged, and src2's replay may apply some the
# destination never got.)
"$NVMCTL" --config src2.toml flush pause >/dev/null
# (No --filename in the shared options: fio would take each one given as another file. The
# verify runs save no state: the second would load what the first saved.)
last=(--name=src2-last --direct=1 --ioengine=libaio --iodepth=16 --rw=randwrite --bs=16k
	--size=60M --rate=2m --randseed=61 --verify=crc32c --verify_fatal=1 --verify_state_save=1)
fio "${last[@]}" --filename=/dev/ublkb1 --do_verify=0 --trigger-timeout=3 --trigger="kill -9 ${src_pid[src2]}" \
	--output=fio-write-src2-last.log &
fio_pid=$!
nvm_wait_gone "${src_pid[src2]}"
# fio's in-flight I/O waits on the dead daemon's device: deleting it ends them.
"$NVMCTL" del 1 >/dev/null 2>&1 || true
wait "$fio_pid" || true
ls ./*src2-last*verify.state >/dev/null 2>&1 || { cat fio-write-src2-last.log; fail "fio saved no verify state"; }
for _ in $(seq 100); do
	[[ $(dest_field '[s["link"] for s in d["sources"] if s["name"] == "src2"][0]') != up ]] && break
	sleep 0.2
done
out=$("$NVMCTL" --config dest.toml export --source src1 2>&1) && fail "export of a connected source: $out"
grep -q "source src1 is connected" <<<"$out" || fail "export of a connected source does not say why it is refused: $out"
"$NVMCTL" --config dest.toml export --source src2 --size 64MiB >export-src2.txt 2>&1 ||
	{ cat export-src2.txt; fail "export of src2 failed"; }
cat export-src2.txt
out=$("$NVMCTL" --config dest.toml export --source src2 2>&1) && fail "a second export of src2: $out"
grep -q "exported before" <<<"$out" || fail "a second export does not say why it is refused: $out"
[[ $(dest_field '[s["volume"] for s in d["sources"] if s["name"] == "src2"][0]') == exported ]] ||
	fail "the destination's status does not say src2's volume is exported: $(dest_field 'd["sources"][1]')"
image=logs/src2/lun0.img
# (The image is a file on the scratch file system: buffered I/O.)
fio "${last[@]}" --filename="$image" --direct=0 --verify_only=1 --verify_state_load=1 --verify_state_save=0 \
	--output=fio-verify-src2-image.log ||
	{ cat fio-verify-src2-image.log; fail "an acknowledged write of src2 is not in its exported image"; }
say "src2 died mid-fio: its image, exported from the destination's log files, verifies ($(grep -o 'READ: bw=[^,]*' fio-verify-src2-image.log))"
# Served as an ordinary single node (export wrote its config; `export --force --serve`
# reports again and starts that node detached), the image verifies through its own
# /dev/ublkbN and takes new writes.
grep -q "nvmirrord --config $PWD/logs/src2/serve.toml" export-src2.txt || fail "export does not say how to serve the images"
"$NVMCTL" --config dest.toml export --source src2 --force --serve >export-src2-serve.txt 2>&1 ||
	{ cat export-src2-serve.txt; tail -5 logs/src2/serve-node.out; fail "export --serve of src2 failed"; }
serve_pid=$(sed -n "s/.*the images' node runs as pid \([0-9]*\) .*/\1/p" export-src2-serve.txt)
[[ -n $serve_pid ]] || { cat export-src2-serve.txt; fail "export --serve does not name the images' node"; }
NVM_DAEMON_PIDS+=("$serve_pid")
dev=$(sed -n 's/^serving the image of LUN .* as \(\/dev\/ublkb[0-9]*\)$/\1/p' export-src2-serve.txt)
[[ -b $dev ]] || { cat export-src2-serve.txt; fail "export --serve does not name a block device it serves"; }
[[ $("$NVMCTL" --config logs/src2/serve.toml status --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["pid"])') == "$serve_pid" ]] ||
	fail "the images' node's status does not name the pid export --serve gave"
fio "${last[@]}" --filename="$dev" --verify_only=1 --verify_state_load=1 --verify_state_save=0 \
	--output=fio-verify-src2-served.log ||
	{ cat fio-verify-src2-served.log; fail "an acknowledged write of src2 does not verify through its served image ($dev)"; }
# (Past the end of fio's blocks: they verify through src2 later.)
dd if=/dev/urandom of=served-blocks bs=4k count=16 status=none
# Its flusher paused: these writes stay in its NVRAM until it drains.
"$NVMCTL" --config logs/src2/serve.toml flush pause >/dev/null
dd if=served-blocks of="$dev" bs=4k seek=15616 oflag=direct status=none || fail "writing to the served image failed"
cmp -n $((16 * 4096)) served-blocks <(dd if="$dev" bs=4k skip=15616 count=16 iflag=direct status=none) ||
	fail "the served image does not read back what was written to it"
# One volume, one server: the images are not given back while their node runs.
out=$("$NVMCTL" --config dest.toml return-image --source src2 2>&1) && fail "return-image while the images are served: $out"
grep -q "is running" <<<"$out" || fail "return-image while the images are served does not say why it is refused: $out"
out=$("$NVMCTL" --config dest.toml return-image --source src1 2>&1) && fail "return-image of a connected source: $out"
grep -q "src1 is connected" <<<"$out" || fail "return-image of a connected source does not say why it is refused: $out"
# Killed, the images' node leaves its writes in its NVRAM: no return until they are in the
# images (it drains when started again and stopped cleanly).
kill -9 "$serve_pid"
nvm_wait_gone "$serve_pid"
"$NVMCTL" del "${dev#/dev/ublkb}" >/dev/null 2>&1 || true
out=$("$NVMCTL" --config dest.toml return-image --source src2 2>&1) && fail "return-image after the images' node was killed undrained: $out"
grep -q "stopped without draining" <<<"$out" || fail "return-image after an undrained images' node does not say why it is refused: $out"
nvm_start logs/src2/serve.toml daemon-src2-image.log
kill "$NVM_LAST_PID"
nvm_wait_gone "$NVM_LAST_PID"
say "src2's images served by a single node as $dev: fio verify passes, new writes read back; return-image refused while it runs, for a connected source, and after its node was killed undrained"
# src2 comes back while the destination is away: it cannot ask what became of its volume,
# so it serves (saying it does not know) and acknowledges writes alone. The destination
# back, src2 asks again on the new connection, hears that its volume was exported and
# stops serving it: reads and writes get EIO, its status and log say why. (What it wrote
# meanwhile is not in the images: the return below overwrites it with the images' blocks.)
kill -9 "$dest_pid"
nvm_wait_gone "$dest_pid"
nvm_start src2.toml daemon-src2.log
cut_off_pid=$NVM_LAST_PID
grep -q "serving without knowing whether it exported our volume" daemon-src2.log ||
	{ tail -5 daemon-src2.log; fail "src2 does not say it serves without knowing what became of its volume"; }
dd if=/dev/urandom of=cut-off-blocks bs=4k count=16 status=none
dd if=cut-off-blocks of=/dev/ublkb1 bs=4k seek=15616 oflag=direct status=none || fail "src2's writes while cut off failed"
start_destination
for _ in $(seq 100); do grep -q "this node stopped serving it" daemon-src2.log && break; sleep 0.2; done
grep -q "this node stopped serving it" daemon-src2.log ||
	{ tail -5 daemon-src2.log; fail "src2 reconnected and went on serving its exported volume"; }
kill -0 "$cut_off_pid" || fail "src2 exited instead of refusing I/O"
out=$(dd if=cut-off-blocks of=/dev/ublkb1 bs=4k seek=15616 oflag=direct status=none 2>&1) &&
	fail "src2 took a write after the destination said its volume was exported"
grep -q "Input/output error" <<<"$out" || fail "src2's refused write did not fail with EIO: $out"
out=$(dd if=/dev/ublkb1 of=/dev/null bs=4k skip=15616 count=1 iflag=direct status=none 2>&1) &&
	fail "src2 served a read after the destination said its volume was exported"
grep -q "Input/output error" <<<"$out" || fail "src2's refused read did not fail with EIO: $out"
nvm_status_has src2.toml "stopped serving it" || fail "src2's status does not say why it stopped serving"
kill -9 "$cut_off_pid"
nvm_wait_gone "$cut_off_pid"
"$NVMCTL" del 1 >/dev/null 2>&1 || true
say "src2, started while the destination was away, served; reconnected, it heard its volume was exported and stopped serving it (writes and reads get EIO)"
# src2 comes back: the destination says its volume was exported, and it refuses to serve.
rc=0
timeout 60 "$NVMD" --config src2.toml --state-dir "$PWD/state" >>daemon-src2.log 2>&1 || rc=$?
((rc != 0 && rc != 124)) || fail "src2 served (exit $rc) although its volume was exported and served elsewhere"
grep -q "the destination exported our volume" daemon-src2.log ||
	{ tail -5 daemon-src2.log; fail "src2 does not say why it refuses to serve"; }
say "src2, exported, refuses to serve (exit $rc): \"$(grep -o 'the destination exported our volume[^:]*' daemon-src2.log | tail -1)\""
# Given back (`return-image`), src2 drains its log, copies every block of its medium that
# differs from the image, and ships again: what the image's node wrote reads back through
# src2, fio verifies, and new writes go through the log files to the image again.
"$NVMCTL" --config dest.toml return-image --source src2 || fail "return-image of src2 failed"
[[ -f logs/src2/serve.toml.returned && ! -e logs/src2/serve.toml ]] || fail "the images' node's config was not retired by return-image"
[[ $(dest_field '[s["volume"] for s in d["sources"] if s["name"] == "src2"][0]') == returning ]] ||
	fail "the destination's status does not say src2's volume is being returned"
out=$("$NVMCTL" --config dest.toml export --source src2 --force 2>&1) && fail "export --force of a volume being given back: $out"
grep -q "being given back" <<<"$out" || fail "export --force after return-image does not say why it is refused: $out"
[[ -f logs/src2/serve.toml.returned && ! -e logs/src2/serve.toml ]] || fail "a refused export wrote the images' node's config again"
nvm_start src2.toml daemon-src2.log
src_pid[src2]=$NVM_LAST_PID
taken=$(grep -o "taken back from the destination's image: [0-9]* of [0-9]* byte(s) differed" daemon-src2.log | tail -1)
[[ -n $taken ]] || { tail -5 daemon-src2.log; fail "src2 did not take its volume back from the image"; }
# Only what differs crosses: at least the image node's 64 KiB, far less than the LUN.
read -r copied compared <<<"$(sed 's/.*image: \([0-9]*\) of \([0-9]*\) .*/\1 \2/' <<<"$taken")"
((copied >= 65536 && copied < compared / 4)) || fail "src2 copied $copied of $compared bytes back: not the changes only"
cmp -n $((16 * 4096)) served-blocks <(dd if=/dev/ublkb1 bs=4k skip=15616 count=16 iflag=direct status=none) ||
	fail "src2 lacks what the image's node wrote after the export (or kept what it wrote cut off)"
fio "${last[@]}" --filename=/dev/ublkb1 --verify_only=1 --verify_state_load=1 --verify_state_save=0 --output=fio-verify-src2-last.log ||
	{ cat fio-verify-src2-last.log; fail "src2's acknowledged writes do not verify after it took its volume back"; }
dd if=/dev/urandom of=/dev/ublkb1 bs=16k count=64 seek=1000 oflag=direct status=none || fail "src2's writes after its return failed"
"$NVMCTL" --config src2.toml drain --timeout 60 >/dev/null ||
	{ tail -5 daemon-src2.log; fail "src2 did not drain after its return: the destination does not log it again"; }
[[ $(dest_field '[s["volume"] for s in d["sources"] if s["name"] == "src2"][0]') == shipping ]] ||
	fail "the destination's status does not say src2 ships again after its return"
checkpoint src2
grep -q "lack" "checkpoint-src2.txt" && fail "src2's images lack part of its history after its return"
grep -q ": [1-9][0-9]* record(s)" checkpoint-src2.txt || fail "src2's point after its return applied nothing"
image_is_medium src2 || fail "after src2's return and a consistency point its image differs from its medium"
say "src2 took its volume back ($taken) and ships again: after a point its image equals its medium"

# The next consistency point too: src3 writes more (nothing verifies these blocks later),
# drains, and after the point its image equals its medium again.
dd if=/dev/urandom of=/dev/ublkb2 bs=16k count=64 seek=1000 oflag=direct status=none || fail "src3's last writes failed"
"$NVMCTL" --config src3.toml drain --timeout 60 >/dev/null || fail "src3 did not drain"
checkpoint src3
grep -q ": [1-9][0-9]* record(s)" checkpoint-src3.txt || fail "src3's second consistency point applied nothing"
image_is_medium src3 || fail "after its second consistency point the destination's image of src3 differs from its medium"
say "src3's second consistency point: its image equals its medium again ($(dest_field '[p["points"] for s in d["sources"] if s["name"] == "src3" for p in s["log_files"]]') points per partition)"

# Delivery faults (the TCP run only: they are injected above the transport): src3 restarts
# with NVMIRROR_TEST_SHIP_FAULTS, so every 5th record is posted twice, every 7th held back
# while later ones overtake it, and the 50th never posted (its post claims success). With
# src3's flusher paused the destination holds the records after the missing one and its
# status names the missing seq; then src3's flusher asks for its batches, re-posts them,
# the gap fills, and the log files hold every record once and in order (`log-files`
# checks the order; counted against what src3 mirrored); after a point its image equals
# its medium, and fio verifies on src3.
if [[ $transport == tcp ]]; then
	kill "${src_pid[src3]}"
	nvm_wait_gone "${src_pid[src3]}"
	NVMIRROR_TEST_SHIP_FAULTS=duplicate,reorder,drop-once nvm_start src3.toml daemon-src3.log
	src_pid[src3]=$NVM_LAST_PID
	grep -q "TEST FAULTS on the way to the destination" daemon-src3.log || fail "src3 does not say it runs with test faults"
	for _ in $(seq 100); do [[ $(mirror_of src3) == mirroring* ]] && break; sleep 0.2; done
	read -r _ m0 _ <<<"$(mirror_of src3)"
	"$NVMCTL" --config src3.toml flush pause >/dev/null
	faults=(--direct=1 --ioengine=libaio --iodepth=16 --rw=randwrite --bs=16k --size=60M --io_size=2M
		--verify=crc32c --verify_fatal=1 --verify_state_save=1 --name=src3-faults --randseed=81
		--filename=/dev/ublkb2)
	fio "${faults[@]}" --do_verify=0 --output=fio-write-src3-faults.log || fail "src3's writes under delivery faults failed"
	read -r _ m1 degraded <<<"$(mirror_of src3)"
	((degraded == 0)) || fail "src3 acknowledged $degraded write(s) without the destination under delivery faults"
	waiting=
	for _ in $(seq 150); do
		waiting=$(dest_field '[p["waiting_for"] for s in d["sources"] if s["name"] == "src3" for p in s["log_files"] if p["waiting_for"]]')
		[[ $waiting == *"has not arrived"* ]] && break
		sleep 0.2
	done
	[[ $waiting == *"has not arrived"* ]] || fail "the destination does not name the record src3 never posted: $waiting"
	say "src3's 50th record never posted: the destination's status says $waiting"
	"$NVMCTL" --config src3.toml flush resume >/dev/null
	"$NVMCTL" --config src3.toml drain --timeout 90 >/dev/null ||
		{ tail -5 daemon-src3.log; fail "src3 did not drain under delivery faults"; }
	dups=$(grep -c "test fault: duplicated" daemon-src3.log)
	held=$(grep -c "test fault: held back" daemon-src3.log)
	dropped=$(grep -c "test fault: dropped" daemon-src3.log)
	((dups > 0 && held > 0 && dropped == 1)) || fail "the faults did not happen: $dups duplicated, $held held back, $dropped dropped"
	"$NVMCTL" log-files logs/src3 >log-files-src3-faults.txt || { cat log-files-src3-faults.txt; fail "src3's log files do not check out after delivery faults"; }
	l=$(logged src3)
	((l == m1 - m0)) || fail "under delivery faults src3 mirrored $((m1 - m0)) records, its log files hold $l (each must be there once)"
	(($(dest_field '[sum(p["gaps"] for p in s["log_files"]) for s in d["sources"] if s["name"] == "src3"][0]') == 0)) ||
		fail "the record src3 re-posted was counted as a gap"
	checkpoint src3
	image_is_medium src3 || fail "after delivery faults the destination's image of src3 differs from its medium"
	fio "${faults[@]}" --verify_only=1 --verify_state_load=1 --output=fio-verify-src3-faults.log ||
		{ cat fio-verify-src3-faults.log; fail "fio verify failed on src3's writes under delivery faults"; }
	say "delivery faults ($dups duplicated, $held held back, 1 never posted): the files hold each of src3's $l records once, in order; its image equals its medium"
fi

# A full destination disk (TCP run only): after a consistency point closes src1's log file,
# its next one is made on a 1 MiB file system mounted over src1's log directory. The
# destination cannot append (its status says why), so it confirms no batch: src1's batches
# stay in its log and its drain cannot end (back-pressure), and nothing is dropped. Given
# room, the destination logs every record, src1 drains, and every write verifies.
if [[ $transport == tcp ]]; then
	"$NVMCTL" --config dest.toml checkpoint --source src1 >checkpoint-src1-full.txt 2>&1 ||
		{ cat checkpoint-src1-full.txt; fail "the checkpoint of src1 failed"; }
	mount -t tmpfs -o size=1m tmpfs logs/src1
	g0=$(dest_field '[sum(p["gaps"] for p in s["log_files"]) for s in d["sources"] if s["name"] == "src1"][0]')
	read -r _ m0 _ <<<"$(mirror_of src1)"
	full=(--direct=1 --ioengine=libaio --iodepth=16 --rw=randwrite --bs=16k --size=60M --io_size=4M
		--verify=crc32c --verify_fatal=1 --verify_state_save=1 --name=src1-full --randseed=91
		--filename=/dev/ublkb0)
	fio "${full[@]}" --do_verify=0 --output=fio-write-src1-full.log || fail "src1's writes with the destination's disk full failed"
	why=
	for _ in $(seq 150); do
		why=$(dest_field '[s["log_error"] for s in d["sources"] if s["name"] == "src1"][0]')
		[[ $why == *"No space left"* ]] && break
		sleep 0.2
	done
	[[ $why == *"No space left"* ]] || fail "the destination's status does not say its disk is full: $why"
	if "$NVMCTL" --config src1.toml drain --timeout 8 >/dev/null 2>&1; then
		fail "src1 drained although the destination could log none of its batches"
	fi
	# src1's own status shows the lag: a flushed batch waiting for the destination.
	waits=$(ship_field src1 '" ".join(str(p["waiting"]["asks"]) for p in d["partitions"] if p["waiting"])')
	[[ -n $waits ]] || fail "src1's status shows no batch waiting for the destination: $(ship_field src1 d)"
	"$NVMCTL" --config src1.toml status | grep -E '^destination:|^  partition' || true
	say "the destination's disk full: \"$why\"; src1's batches stay in its log (its drain does not end; its status shows batches waiting, asked $waits time(s))"
	mount -o remount,size=64m logs/src1
	"$NVMCTL" --config src1.toml drain --timeout 90 >/dev/null ||
		{ tail -5 daemon-src1.log; fail "src1 did not drain once the destination had room again"; }
	read -r _ m1 degraded <<<"$(mirror_of src1)"
	l=$(logged src1)
	((l == m1 - m0)) || fail "src1 mirrored $((m1 - m0)) records while the destination's disk was full, its log files hold $l"
	(($(dest_field '[sum(p["gaps"] for p in s["log_files"]) for s in d["sources"] if s["name"] == "src1"][0]') == g0)) ||
		fail "a gap in src1's log files after its disk was full"
	fio "${full[@]}" --verify_only=1 --verify_state_load=1 --output=fio-verify-src1-full.log ||
		{ cat fio-verify-src1-full.log; fail "fio verify failed on src1's writes made while the destination's disk was full"; }
	say "given room again, the destination logged all $l of src1's records (none dropped), src1 drained, and fio verifies"
fi

kill -0 "$dest_pid" || fail "the destination died"
"$NVMCTL" --config dest.toml status
say "PASS ($transport): three sources shipped every write into the destination's NVRAM before acknowledging it, the destination's log files hold each record once in order; fio verify passed on each"
