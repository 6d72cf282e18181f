#!/bin/bash
# tests/twovm/guest/ship-power-cut-node.sh ROLE   (runs INSIDE one of the two VMs of
# tests/twovm/47-power-cut-ship.sh; ROLE a = the log-shipping source, whose power is cut;
# b = the destination, which exports the source's volume and serves it)
#
# Contract with the host (47-power-cut-ship.sh, through tests/twovm/lib/power-cut-host.sh):
#   - started by guest-init.sh as root in a VM booted by nvm_vm_boot with one emulated
#     NVDIMM (this node's NVRAM, used as device-DAX /dev/dax0.0), its own disk /dev/vda
#     (the source's medium on a; on b the file system holding the log files and the
#     images), an unused /dev/vdb, and a virtio-net NIC (eth0) on a QEMU socket netdev:
#     the only link between the VMs;
#   - environment: NVM_BIN, NVM_OUT (results dir, 9p, shared with the host and the other
#     VM), NVM_PC_TRANSPORT (rdma | tcp), NVM_PC_FIO_RATE, NVM_PC_FIO_TRIGGER;
#   - sync files in $NVM_OUT/sync, each created atomically, every wait bounded: b-up (the
#     destination listens), a-up (the source ships to it), a-ready (fio server and the
#     background writer run on a), kill-a (b's fio trigger: cut a's power now), a-killed
#     (host), b-done.  A file `abort` (any side) makes everyone give up at once;
#   - exit 0 = this node's part passed, 77 = cannot run here (SKIPPED), else FAIL.  The
#     host waits for a to be killed, so a never reports.
# Logs: $NVM_OUT/node-ROLE.log, daemon-ROLE.log, fio-*, export-src1.txt, status-*.json.
set -euo pipefail

role=${1:?usage: ship-power-cut-node.sh a|b}
: "${NVM_BIN:?}" "${NVM_OUT:?}"
NVMD=$NVM_BIN/nvmirrord
NVMCTL=$NVM_BIN/nvmirrorctl
SYNC=$NVM_OUT/sync
ip_a=10.77.0.1 ip_b=10.77.0.2
fio_port=8765 ship_port=7900
transport=${NVM_PC_TRANSPORT:-rdma}
write_rate=${NVM_PC_FIO_RATE:-3m}
trigger_after=${NVM_PC_FIO_TRIGGER:-18}
nvram=/dev/dax0.0
work=/tmp/shipcut
mkdir -p "$work"
cd "$work"
exec > >(tee -a "$NVM_OUT/node-$role.log") 2>&1

# shellcheck source=tests/twovm/guest/lib/guest-node.sh
source "$(dirname "$0")/lib/guest-node.sh"

pids=()
cleanup() {
	local rc=$? p
	set +e
	for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
	for p in "${pids[@]}"; do
		for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
		kill -KILL "$p" 2>/dev/null
	done
	cp -f ./*.log ./*.txt ./*.toml "$NVM_OUT/" 2>/dev/null
	mountpoint -q /mnt/ship && umount /mnt/ship
	exit "$rc"
}
trap cleanup EXIT

# jq-less JSON: EXPR over the status JSON of CONFIG (s = all of it).
field() { # CONFIG EXPR
	"$NVMCTL" --config "$1" status --json 2>/dev/null | python3 -c 'import json, sys
s = json.load(sys.stdin)
print(eval(sys.argv[1]))' "$2"
}
until_field() { # SECONDS CONFIG EXPR WANT WHAT
	local i
	for ((i = 0; i < $1 * 5; i++)); do
		[[ $(field "$2" "$3" 2>/dev/null) == "$4" ]] && return 0
		[[ -e $SYNC/abort ]] && fail "gave up waiting for $5: $(cat "$SYNC/abort")"
		sleep 0.2
	done
	"$NVMCTL" --config "$2" status --json >"$NVM_OUT/status-$role-timeout.json" 2>&1 || true
	fail "$5: not reached within $1 s (status in status-$role-timeout.json)"
}

setup() { # MY_IP [keep: a reboot finds its device-DAX NVRAM as it was]
	guest_link_and_devdax "$@"
	command -v fio >/dev/null || skip "fio is not installed"
	[[ -b /dev/vda ]] || fail "no /dev/vda"
	say "net: $1 on eth0, shipping link over $transport; NVRAM $nvram; disk /dev/vda $(($(blockdev --getsize64 /dev/vda) >> 20)) MiB"
}

shipping_common() {
	cat <<-CFG
	id = 77
	secret_file = "$NVM_OUT/secret"
	transport = "$transport"
	heartbeat_interval_ms = 250
	heartbeat_timeout_ms = 3000
	CFG
}

# The verified job: fio's server on a writes it, the client on b keeps its verify state.
# [16M, 112M) of the 128 MiB LUN, each block written at most once (fio's random map).
job_powercut() { # DEV [extra option lines...]
	local d=$1
	shift
	printf '%s\n' "[powercut]" "filename=$d" direct=1 ioengine=libaio iodepth=16 rw=randwrite \
		bssplit=4k/50:16k/30:64k/20 offset=16M size=96M randseed=4242 verify=crc32c \
		verify_fatal=1 "$@"
}

# ----------------------------------------------------------------- source ---
start_source() {
	cat >src1.toml <<-CFG
	[node]
	name = "src1"
	control_socket = "$work/src1.sock"

	[nvram]
	path = "$nvram"
	size = "64MiB"
	partitions = 2

	[[lun]]
	name = "lun0"
	medium = "/dev/vda"
	device_id = 0

	[shipping]
	role = "source"
	$(shipping_common)
	degraded = "write-through"

	[shipping.destination]
	name = "dest"
	address = "$ip_b:$ship_port"
	CFG
	"$NVMD" --config src1.toml --state-dir "$work/state" >>"$NVM_OUT/daemon-$role.log" 2>&1 &
	pids+=($!)
	"$NVMCTL" --config src1.toml wait --timeout 180 >/dev/null ||
		{ tail -20 "$NVM_OUT/daemon-$role.log"; fail "nvmirrord (source) did not come up"; }
	until_field 120 src1.toml 's["engine"]["mirror"]["state"]' mirroring "the source's link to the destination"
	say "source up, shipping to $ip_b:$ship_port over $(field src1.toml 's["engine"]["mirror"]["transport"]')"
}

run_a() {
	setup $ip_a
	await b-up 240
	start_source
	mark a-up
	# A writer still writing when the power goes (the verified job stops at fio's
	# trigger): [0, 16M), outside the verified job's blocks.
	fio --name=background --filename=/dev/ublkb0 --direct=1 --ioengine=libaio --iodepth=4 \
		--rw=randwrite --bs=4k --offset=0 --size=16M --rate=1m --time_based --runtime=900 \
		--output="$NVM_OUT/fio-background-a.log" &
	local background=$! i
	fio --server="ip:$ip_a,$fio_port" >"$NVM_OUT/fio-server-a.log" 2>&1 &
	for ((i = 0; i < 100; i++)); do ss -ltn | grep -q ":$fio_port " && break; sleep 0.2; done
	ss -ltn | grep -q ":$fio_port " || fail "fio --server is not listening on $ip_a:$fio_port"
	mark a-ready
	for ((i = 0; i < 300; i++)); do
		[[ -e $SYNC/abort ]] && fail "aborted: $(cat "$SYNC/abort")"
		kill -0 "$background" 2>/dev/null || fail "the background writer ended before the power cut"
		((i % 5 == 0)) && say "still alive: $(field src1.toml '"%d shipped, %d degraded, %d record(s) in the log" % (s["engine"]["mirror"]["mirrored_records"], s["engine"]["mirror"]["degraded_records"], sum(p["records_unflushed"] for p in s["engine"]["partitions"]))' 2>/dev/null)"
		sleep 1
	done
	fail "still alive 300 s after a-ready: the host did not cut the power"
}

# ------------------------------------------------------------ destination ---
run_b() {
	setup $ip_b
	mkfs.ext4 -q -F /dev/vda || fail "mkfs.ext4 /dev/vda"
	mkdir -p /mnt/ship
	mount /dev/vda /mnt/ship || fail "mount /dev/vda"
	cat >dest.toml <<-CFG
	[node]
	name = "dest"
	control_socket = "$work/dest.sock"

	[nvram]
	path = "$nvram"
	size = "64MiB"
	partitions = 2

	[shipping]
	role = "destination"
	$(shipping_common)
	dir = "/mnt/ship/logs"

	[[shipping.source]]
	name = "src1"
	listen = "$ip_b:$ship_port"
	nvram_size = "64MiB"
	CFG
	"$NVMD" --config dest.toml --state-dir "$work/state" >>"$NVM_OUT/daemon-b.log" 2>&1 &
	pids+=($!)
	until_field 60 dest.toml 'len(s["sources"])' 1 "the destination's control socket"
	mark b-up
	await a-up 240
	until_field 60 dest.toml 's["sources"][0]["link"]' up "src1's link on the destination"
	await a-ready 180
	job_powercut /dev/ublkb0 do_verify=0 verify_state_save=1 "rate=$write_rate" >powercut-client.fio
	local trig="echo \$(date +%s.%N) >$SYNC/kill-a.tmp && mv -f $SYNC/kill-a.tmp $SYNC/kill-a"
	say "fio client -> $ip_a:$fio_port: $write_rate random writes with verify; trigger at ${trigger_after}s"
	timeout -k 5 $((trigger_after + 120)) fio --trigger-timeout="$trigger_after" --trigger="$trig" \
		--client="$ip_a,$fio_port" powercut-client.fio >"$NVM_OUT/fio-client-b.log" 2>&1 &
	local client=$! i p rc=0
	await kill-a $((trigger_after + 90))
	say "trigger fired: verify state received, the host cuts the source's power"
	# The link goes down after the heartbeat timeout.
	for ((i = 0; i < 300; i++)); do
		[[ $(field dest.toml 's["sources"][0]["link"]') != up ]] && break
		sleep 0.2
	done
	[[ $(field dest.toml 's["sources"][0]["link"]') != up ]] || fail "src1's link stays up 60 s after its power cut"
	"$NVMCTL" --config dest.toml status --json >"$NVM_OUT/status-b-after-cut.json" || true
	for ((i = 0; i < 25; i++)); do kill -0 "$client" 2>/dev/null || break; sleep 0.2; done
	if kill -0 "$client" 2>/dev/null; then
		kill -TERM "$client" 2>/dev/null || true
		for ((i = 0; i < 25; i++)); do kill -0 "$client" 2>/dev/null || break; sleep 0.2; done
		for p in $(pgrep -P "$client" 2>/dev/null); do kill -KILL "$p" 2>/dev/null || true; done
	fi
	wait "$client" || rc=$?
	say "fio client ended with status $rc (its server lost power)"
	[[ -f $ip_a-powercut-0-verify.state ]] || { tail -30 "$NVM_OUT/fio-client-b.log"; fail "the fio client received no verify state"; }
	mv "$ip_a-powercut-0-verify.state" local-powercut-0-verify.state

	# Export: everything the destination holds of src1 goes to its log files, the rest of
	# them to its image, which a single node then serves.
	"$NVMCTL" --config dest.toml export --source src1 --size 128MiB >export-src1.txt 2>&1 ||
		{ cat export-src1.txt; fail "export of src1 failed"; }
	cat export-src1.txt
	"$NVMD" --config /mnt/ship/logs/src1/serve.toml --state-dir "$work/state-image" >>"$NVM_OUT/daemon-b-image.log" 2>&1 &
	pids+=($!)
	"$NVMCTL" --config /mnt/ship/logs/src1/serve.toml wait --timeout 120 >/dev/null ||
		{ tail -20 "$NVM_OUT/daemon-b-image.log"; fail "the node serving the exported image did not come up"; }
	local dev
	dev=$(field /mnt/ship/logs/src1/serve.toml 's["devices"][0]["path"]')
	# iodepth=1 and no state saved: see tests/twovm/guest/power-cut-node.sh's verify().
	job_powercut "$dev" verify_only=1 verify_state_load=1 verify_state_save=0 iodepth=1 >verify-powercut.fio
	if ! fio --output-format=json --output=fio-verify-image.json verify-powercut.fio; then
		tail -c 3000 fio-verify-image.json
		cp -f fio-verify-image.json "$NVM_OUT/"
		fail "fio verify through the exported image ($dev): an acknowledged write of src1 is wrong or missing"
	fi
	cp -f fio-verify-image.json "$NVM_OUT/"
	local got
	got=$(python3 -c 'import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
assert j["error"] == 0, j["error"]
print(j["read"]["io_bytes"])' fio-verify-image.json) || fail "fio verify: bad JSON"
	((got > 0)) || fail "fio verify through $dev read nothing"
	say "verify through the exported image ($dev): OK, $((got >> 10)) KiB of acknowledged writes"
	# The image takes new writes like any single node.
	dd if=/dev/urandom of=new-blocks bs=64k count=16 status=none
	dd if=new-blocks of="$dev" bs=64k seek=200 oflag=direct status=none || fail "writing to the served image"
	cmp <(dd if="$dev" bs=64k skip=200 count=16 iflag=direct status=none) new-blocks ||
		fail "new writes to the served image do not read back"
	say "the exported image verifies through $dev and takes new writes"
	# Give the volume back: the images' node stops (drained), return-image, and the
	# rebooted source takes it (its verify state and the new blocks go along).
	cp -f local-powercut-0-verify.state new-blocks "$NVM_OUT/state/"
	kill -TERM "${pids[-1]}"
	for ((i = 0; i < 150; i++)); do kill -0 "${pids[-1]}" 2>/dev/null || break; sleep 0.2; done
	kill -0 "${pids[-1]}" 2>/dev/null && fail "the images' node did not stop within 30 s"
	"$NVMCTL" --config dest.toml return-image --source src1 || fail "return-image of src1 failed"
	[[ $(field dest.toml 's["sources"][0]["volume"]') == returning ]] || fail "the destination does not say src1's volume is being returned"
	mark b-returned
	await a2-done 300
	[[ $(field dest.toml 's["sources"][0]["volume"]') == shipping ]] ||
		fail "src1 took its volume back but the destination's status says $(field dest.toml 's["sources"][0]["volume"]')"
	until_field 60 dest.toml 's["sources"][0]["link"]' up "src1's link after its return"
	mark b-done
	say "PASS (destination): src1 lost power mid-write; exported, its image verified through $dev and took new writes; given back, src1 took it and ships again"
}

# -------------------------------------------------------- source, rebooted ---
run_a2() {
	setup $ip_a keep
	await b-returned 60
	# Its start replays its NVRAM, asks the destination about its volume, hears that it is
	# being given back, drains, copies what differs from the image, then serves.
	start_source
	local taken
	taken=$(grep -o "taken back from the destination's image: [0-9]* of [0-9]* byte(s) differed" "$NVM_OUT/daemon-a2.log" | tail -1)
	[[ -n $taken ]] || { tail -20 "$NVM_OUT/daemon-a2.log"; fail "the rebooted source did not take its volume back"; }
	say "$taken"
	cp "$NVM_OUT/state/local-powercut-0-verify.state" .
	job_powercut /dev/ublkb0 verify_only=1 verify_state_load=1 verify_state_save=0 iodepth=1 >verify-powercut.fio
	fio --output-format=json --output=fio-verify-a2.json verify-powercut.fio ||
		{ tail -c 3000 fio-verify-a2.json; cp -f fio-verify-a2.json "$NVM_OUT/"; fail "fio verify through the source after its return: an acknowledged write is wrong or missing"; }
	cp -f fio-verify-a2.json "$NVM_OUT/"
	cmp <(dd if=/dev/ublkb0 bs=64k skip=200 count=16 iflag=direct status=none) "$NVM_OUT/state/new-blocks" ||
		fail "the source lacks what was written to its exported image"
	# Shipping again: new writes reach the destination's log file and leave the log.
	dd if=/dev/urandom of=/dev/ublkb0 bs=64k count=16 seek=300 oflag=direct status=none || fail "writing after the return"
	"$NVMCTL" --config src1.toml drain --timeout 120 >/dev/null ||
		{ tail -10 "$NVM_OUT/daemon-a2.log"; fail "the source did not drain after its return: the destination does not confirm its batches"; }
	[[ $(field src1.toml 'sum(p["unconfirmed_records"] for p in s["engine"]["shipping"]["partitions"])') == 0 ]] ||
		fail "records the destination has not confirmed after the drain"
	mark a2-done
	await b-done 120
	say "PASS (source, rebooted): took its volume back from the image ($taken), every acknowledged write and the image's new writes verify, and it ships again"
}

[[ -f $NVM_OUT/secret ]] || fail "no secret in $NVM_OUT"
case $role in
a) run_a ;;
a2) run_a2 ;;
b) run_b ;;
*) fail "unknown role $role" ;;
esac
