#!/bin/bash
# tests/twovm/guest/power-cut-node.sh ROLE   (runs INSIDE one of the two VMs of
# tests/twovm/40-power-cut.sh, 41-power-cut-both.sh, 43-power-cut-own.sh or 44-power-cut-fs.sh; ROLE is a = node-a's
# first boot, a2 = node-a rebooted after the power cut, b = node-b's first boot
# (the survivor in 40; cut with node-a in 41), b2 = node-b rebooted alone after
# both lost power (41))
#
# Contract with the host orchestrators (40-power-cut.sh, 41-power-cut-both.sh):
#   - started by guest-init.sh as root in a VM booted by nvm_vm_boot with one
#     emulated NVDIMM (this node's NVRAM, a host file that outlives QEMU; its
#     first boot turns the NVDIMM's namespace into device-DAX /dev/dax0.0, the
#     NVRAM an RDMA device can register, and a reboot finds it again), the
#     shared disk image as /dev/vda (the medium, the same file in both
#     VMs; with NVM_PC_STORAGE=own, test 43, /dev/vda is this node's own
#     medium and /dev/vdb the small arbiter disk both VMs share), and a
#     virtio-net NIC (eth0) on a QEMU socket netdev: the only link
#     between the two VMs (node-b's QEMU listens, node-a's connects);
#   - environment: NVM_BIN (release binaries), NVM_OUT (the test's results dir,
#     writable 9p export visible to the host and to the other VM),
#     NVM_PC_TRANSPORT (rdma | tcp), NVM_PC_STORAGE (shared | own), NVM_PC_FIO_* (write rate, trigger time;
#     see the orchestrator), NVM_PC_CUT (a: only node-a loses power, test 40;
#     both: node-a and node-b do, test 41);
#   - coordination is by files in $NVM_OUT/sync, each created atomically
#     (written to NAME.tmp, renamed), every wait bounded: a-up, b-up,
#     a-ready (fio server and the background writer running on node-a),
#     kill-a (written by node-b's fio trigger: cut node-a's power now),
#     a-killed (host: QEMU of node-a is gone), b-serving (node-b took over),
#     lun.sha256, restart-a (node-b has verified: boot node-a again),
#     a2-up, b-gaveback, a2-done and b-done (each stays up until the other is
#     done: node-a's reads of range 1 go through node-b's daemon and node-b
#     checks the link at the end).  With NVM_PC_CUT=both (test 41) the trigger
#     writes kill-both instead of kill-a, once it has put the verify state on
#     the results dir (state/local-powercut-0-verify.state: node-b's RAM does
#     not survive the cut); the host kills both QEMUs and boots node-b alone
#     (b2), which writes b2-start (just before its daemon starts), b-serving
#     (node-a's range taken over) and b2-done.  A file `abort` (any side)
#     makes everyone give up at once.  Nothing here waits without a bound.
#   - with NVM_PC_LOAD=fs (test 44, a 640 MiB LUN in NVM_PC_LUN_MIB) the roles a and b
#     run filesystems instead of fio (tests/vm/lib/fs-churn.sh): a-up, b-up, kill-a
#     (written by node-a itself once its loads ran NVM_PC_CHURN_SECONDS with the flusher
#     running and as long again paused), a-killed, b-serving, b-done; the loads' journals
#     are in $NVM_OUT/journals;
#   - exit status 0 = this node's part passed (guest-rc-NAME on the host),
#     77 = cannot run here (SKIPPED), anything else = FAIL.  The host waits for
#     node-a's first boot (and, in 41, node-b's) to be killed, so that VM
#     never reports.
# Logs: $NVM_OUT/node-ROLE.log (this script, also on the VM console),
# daemon-ROLE.log, fio-*.log, status-*.json.
set -euo pipefail

role=${1:?usage: power-cut-node.sh a|a2|b|b2}
: "${NVM_BIN:?}" "${NVM_OUT:?}"
NVMD=$NVM_BIN/nvmirrord
NVMCTL=$NVM_BIN/nvmirrorctl
SYNC=$NVM_OUT/sync
node=node-${role:0:1}                      # node-a or node-b
dev=/dev/ublkb$([[ $node == node-a ]] && echo 0 || echo 1)
ip_a=10.77.0.1 ip_b=10.77.0.2
fio_port=8765
transport=${NVM_PC_TRANSPORT:-rdma}        # mirror link: rdma (Soft-RoCE on eth0) or tcp
write_rate=${NVM_PC_FIO_RATE:-3m}          # the verified job (fio server on node-a)
trigger_after=${NVM_PC_FIO_TRIGGER:-18}    # seconds after the fio client started
cut=${NVM_PC_CUT:-a}                       # whose power goes: a (test 40) or both (test 41)
storage=${NVM_PC_STORAGE:-shared}          # shared: one medium (40, 41); own: each node its own (43);
                                           # voters: own, the arbiter on three voters (49)
load=${NVM_PC_LOAD:-fio}                   # fio: fio with verify; fs: three filesystems under churn (44)
lun_mib=${NVM_PC_LUN_MIB:-128}
churn_s=${NVM_PC_CHURN_SECONDS:-10}        # (fs) load before the flusher pauses, and again before the cut
work=/tmp/powercut
mkdir -p "$work" "$NVM_OUT/state"
cd "$work"
exec > >(tee -a "$NVM_OUT/node-$role.log") 2>&1

say() { printf '[%s %s] %s\n' "$(date +%T.%2N)" "$role" "$*"; }
mark() { printf '%s\n' "${2:-$(date +%s.%N)}" >"$SYNC/$1.tmp" && mv -f "$SYNC/$1.tmp" "$SYNC/$1"; }
fail() {
	say "FAIL: $*"
	mark abort "$role: $*" 2>/dev/null || true
	exit 1
}
skip() { say "SKIPPED: $*"; exit 77; }
# await NAME SECONDS: until the sync file NAME exists (or `abort` does)
await() {
	local i
	for ((i = 0; i < $2 * 5; i++)); do
		[[ -e $SYNC/$1 ]] && return 0
		[[ -e $SYNC/abort ]] && fail "gave up waiting for $1: $(cat "$SYNC/abort")"
		sleep 0.2
	done
	fail "timed out after $2 s waiting for $1"
}

daemon_pid=''
cleanup() {
	local rc=$?
	set +e
	if [[ -n $daemon_pid ]]; then
		kill -TERM "$daemon_pid" 2>/dev/null
		for _ in $(seq 100); do kill -0 "$daemon_pid" 2>/dev/null || break; sleep 0.2; done
		kill -KILL "$daemon_pid" 2>/dev/null
	fi
	[[ -n $tb_pid ]] && kill -KILL "$tb_pid" 2>/dev/null
	cp -f ./*.log "$NVM_OUT/" 2>/dev/null
	exit "$rc"
}
trap cleanup EXIT

# ---------------------------------------------------------------- helpers ---
st() { "$NVMCTL" --config node.toml status --json; }
# q EXPR: a Python expression over the status JSON (s = all of it, e = s["engine"])
q() {
	st | python3 -c 'import json, sys
s = json.load(sys.stdin); e = s["engine"]
r = eval(sys.argv[1])
print(r if isinstance(r, str) else json.dumps(r))' "$1"
}
# ok EXPR: true if the Python expression over the status JSON holds
ok() {
	st 2>/dev/null | python3 -c 'import json, sys
s = json.load(sys.stdin); e = s["engine"]
sys.exit(0 if eval(sys.argv[1]) else 1)' "$1" 2>/dev/null
}
# until_ok SECONDS WHAT EXPR
until_ok() {
	local i
	for ((i = 0; i < $1 * 5; i++)); do
		ok "$3" && return 0
		[[ -e $SYNC/abort ]] && fail "gave up waiting for $2: $(cat "$SYNC/abort")"
		if ((i == 25)) && grep -q 'ibv_reg_mr' "$NVM_OUT/daemon-$role.log" 2>/dev/null; then
			fail "the RDMA link cannot register the NVRAM ($nvram): $(grep -m1 'ibv_reg_mr' "$NVM_OUT/daemon-$role.log")"
		fi
		sleep 0.2
	done
	st >"$NVM_OUT/status-$role-timeout.json" 2>&1 || true
	fail "$2: not reached within $1 s (status in status-$role-timeout.json)"
}
ranges() { q '[(r["owner"], r["epoch"], r["state"]) for r in e["ranges"]]'; }

setup_net() {
	local me=$1 nic=eth0
	[[ -e /sys/class/net/$nic ]] || fail "no $nic: the VM has no link NIC"
	ip link set "$nic" up
	ip addr add "$me/24" dev "$nic"
	if [[ $transport == rdma ]]; then
		modprobe rdma_rxe || skip "modprobe rdma_rxe failed"
		rdma link add nvmrxe0 type rxe netdev "$nic" || fail "rdma link add (rxe over $nic)"
	fi
	modprobe ublk_drv || fail "modprobe ublk_drv"
	setup_nvram
	[[ -b /dev/vda ]] || fail "no /dev/vda (the medium)"
	[[ $storage != own || -b /dev/vdb ]] || fail "no /dev/vdb (the arbiter disk of storage = own)"
	command -v fio >/dev/null || skip "fio is not installed"
	say "net: $me on $nic ($(cat /sys/class/net/$nic/address)), mirror link over $transport; NVRAM $nvram $(($(cat /sys/bus/dax/devices/dax0.0/size) >> 20)) MiB (device-DAX), storage $storage: medium /dev/vda $(($(blockdev --getsize64 /dev/vda) >> 20)) MiB"
}

# The NVRAM is the NVDIMM as device-DAX: an RDMA device can register it (Linux
# >= 6.5 refuses to pin a page-cache mapping such as one of /dev/pmem0), and
# stores reach it without a page cache.  The first boot converts the raw
# namespace (writing its info block; the NVRAM is new then), a reboot finds the
# device again with its contents.
nvram=/dev/dax0.0
setup_nvram() {
	modprobe -a dax_pmem device_dax || fail "modprobe dax_pmem device_dax"
	command -v ndctl >/dev/null || skip "ndctl is not installed"
	if [[ $role != *2 ]]; then
		ndctl create-namespace --force --reconfig=namespace0.0 --mode=devdax >"$work/ndctl.json" 2>&1 ||
			fail "ndctl create-namespace --mode=devdax: $(cat "$work/ndctl.json")"
	fi
	local i
	for ((i = 0; i < 50; i++)); do
		[[ -c $nvram ]] && break
		sleep 0.1
	done
	[[ -c $nvram ]] || fail "no $nvram (device-DAX on the emulated NVDIMM): $(ndctl list -N 2>&1 | tr -d '\n')"
}

# The [cluster] lines of the storage mode: with voters (test 49) the table and the leases
# live on this node's voter (its state on the results dir, so that node-a's survives its
# power cut), the partner's and a tie-breaker that node-b's VM runs (a test shortcut: in
# production it is a third machine); every link over the test's transport.
storage_lines() {
	case $storage in
	own) printf 'storage = "own"\narbiter = "/dev/vdb"\n' ;;
	voters)
		printf 'storage = "own"\n\n[cluster.voters]\nport = 7801\ntiebreaker_id = 3\n'
		printf 'tiebreaker = ["%s:7481", "%s:7482"]\nstate_dir = "%s"\n' "$ip_b" "$ip_b" "$NVM_OUT/state/voter-$node"
		;;
	esac
}

# node-b's VM runs the tie-breaker (voters only), from its state on the results dir (created
# on node-b's first boot), before node-b's daemon: node-a's first start needs it for a
# majority while node-b's VM may still be booting.
tb_pid=''
start_tiebreaker() {
	[[ $storage == voters ]] || return 0
	local args=(--cluster-id 77 --secret-file "$NVM_OUT/secret" --node-id 3 --serve "1=$ip_b:7481"
		--serve "2=$ip_b:7482" --state "$NVM_OUT/state/tiebreaker.state" --transport "$transport")
	if [[ $role == b ]]; then
		"$NVM_BIN/nvmirror-tiebreaker" "${args[@]}" --create-state >>"$NVM_OUT/tiebreaker-$role.log" 2>&1 ||
			fail "nvmirror-tiebreaker --create-state: $(tail -2 "$NVM_OUT/tiebreaker-$role.log")"
	fi
	"$NVM_BIN/nvmirror-tiebreaker" "${args[@]}" >>"$NVM_OUT/tiebreaker-$role.log" 2>&1 &
	tb_pid=$!
	mark tb-up
	say "tie-breaker (pid $tb_pid) serving both nodes' votes on $ip_b:7481/7482 over $transport"
}

# Heartbeat timeout 3 s: two 1-vCPU TCG VMs on a busy 2-core host can stall a link thread
# for 1.5 s (seen once in CI with 1.5 s: node-b declared node-a dead mid-verify, took over,
# and a read it had forwarded to node-a failed with EIO).
write_config() {
	cat >node.toml <<-CFG
	[node]
	name = "$node"
	control_socket = "$work/$node.sock"

	[nvram]
	path = "$nvram"
	partitions = 2

	[cluster]
	id = 77
	secret_file = "$NVM_OUT/secret"
	transport = "$transport"
	heartbeat_interval_ms = 250
	heartbeat_timeout_ms = 3000
	takeover = "auto"
	degraded = "write-through"
	$(storage_lines)

	[[cluster.node]]
	name = "node-a"
	address = "$ip_a:7800"

	[[cluster.node]]
	name = "node-b"
	address = "$ip_b:7800"

	[[lun]]
	name = "lun0"
	medium = "/dev/vda"
	device_id = ${dev#/dev/ublkb}
	ranges = 2
	owners = ["node-a", "node-b"]
	$([[ $storage != shared ]] && echo "size = \"${lun_mib}MiB\"")
	CFG
}

# own_media_agree: (storage = own) every staged write of this node on both media, then
# `nvmirrorctl verify` compares this node's range on both media online.  The host compares
# the two disk images byte for byte once both VMs are done.
own_media_agree() {
	[[ $storage != shared ]] || return 0
	"$NVMCTL" --config node.toml drain --timeout 120 >/dev/null || fail "drain on $node"
	local out
	out=$("$NVMCTL" --config node.toml verify 2>&1) || fail "nvmirrorctl verify on $node found the media different: $out"
	grep -q "range $1: identical" <<<"$out" || fail "nvmirrorctl verify on $node does not report range $1 identical: $out"
	say "drained; nvmirrorctl verify: $(grep "range $1:" <<<"$out")"
}

start_daemon() {
	write_config
	if [[ $storage == voters && $role != *2 ]]; then
		"$NVMCTL" --config node.toml init-voter >/dev/null || fail "nvmirrorctl init-voter on $node"
	fi
	"$NVMD" --config node.toml --state-dir "$work/state" >>"$NVM_OUT/daemon-$role.log" 2>&1 &
	daemon_pid=$!
	"$NVMCTL" --config node.toml wait --timeout 120 >/dev/null ||
		{ tail -20 "$NVM_OUT/daemon-$role.log"; fail "nvmirrord did not come up"; }
	say "nvmirrord (pid $daemon_pid) serves $dev; replay: $(q 'e["replay"]'); ranges $(ranges)"
}

link_up='e["mirror"]["state"] == "mirroring" and (e["mirror"]["link"] or "").startswith("Up") and e["mirror"]["transport"] == "'$transport'"'

# The jobs.  powercut: node-a writes it through its fio server, node-b's fio
# client holds its verify state; it covers [16M, 112M): 48 MiB of node-a's range
# 0 and 48 MiB of node-b's range 1 (reached from node-a by forwarding).  fio's
# random map writes each block at most once, so a write done after the state
# was saved never overwrites a block the state vouches for.
job_powercut() { # DEV [extra option lines...]
	local d=$1
	shift
	printf '%s\n' "[powercut]" "filename=$d" direct=1 ioengine=libaio iodepth=16 rw=randwrite \
		bssplit=4k/50:16k/30:64k/20 offset=16M size=96M randseed=4242 verify=crc32c \
		verify_fatal=1 "$@"
}
# after: node-b writes [0, 16M) after the takeover (over what node-a's background
# writer left there and still holds, unflushed, in its NVRAM).  If node-a ever
# replayed those stale records, this verify would fail.
job_after() { # DEV [extra option lines...]
	local d=$1
	shift
	printf '%s\n' "[after]" "filename=$d" direct=1 ioengine=libaio iodepth=8 rw=write bs=64k \
		offset=0 size=16M randseed=777 verify=crc32c verify_fatal=1 "$@"
}
# verify JOBFN DEV LABEL: verify_only with the saved state (local-NAME-0-verify.state in cwd).
# verify_state_save=0: a verify_only run of a write job would otherwise save ITS
# state at exit over the loaded one (every write of the whole job), and the next
# verify would check blocks that were never written (seen: zeroes).
# iodepth=1: fio decides whether a read falls among the last iodepth writes
# before the state was saved (only the completed ones may be checked) by the
# number of verify reads already COMPLETED; with reads in flight it can issue a
# read of a write that never completed before it notices (fio 3.33, verify.c).
verify() {
	local fn=$1 d=$2 label=$3 name
	name=${fn#job_}
	"$fn" "$d" verify_only=1 verify_state_load=1 verify_state_save=0 iodepth=1 >"verify-$name.fio"
	[[ -f local-$name-0-verify.state ]] || cp "$NVM_OUT/state/local-$name-0-verify.state" . ||
		fail "no verify state for $name"
	if ! fio --output-format=json --output="fio-verify-$name-$label.json" "verify-$name.fio"; then
		tail -c 3000 "fio-verify-$name-$label.json"
		cp -f "fio-verify-$name-$label.json" "$NVM_OUT/"
		fail "fio verify of '$name' through $d ($label): an acknowledged write is wrong or missing"
	fi
	cp -f "fio-verify-$name-$label.json" "$NVM_OUT/"
	local got
	got=$(python3 -c 'import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
assert j["error"] == 0, j["error"]
print(j["read"]["io_bytes"])' "fio-verify-$name-$label.json") || fail "fio verify of $name: bad JSON"
	((got > 0)) || fail "fio verify of $name through $d read nothing"
	say "verify '$name' through $d ($label): OK, $((got >> 10)) KiB verified"
}
lun_sha() { dd if="$dev" bs=1M iflag=direct status=none | sha256sum | cut -c1-64; }

# ----------------------------------------------------------------- node-a ---
run_a() {
	setup_net $ip_a
	[[ $storage != voters ]] || await tb-up 300
	start_daemon
	until_ok 120 "mirror link up ($transport)" "$link_up"
	mark a-up
	await b-up 180
	ranges | grep -q '"node-a", 1, "local"' || fail "unexpected ranges at start: $(ranges)"
	# Keep every acknowledged write of node-a in the NVRAMs only: at the power
	# cut node-b must replay all of them from its second store.
	"$NVMCTL" --config node.toml flush pause >/dev/null
	# A writer that is still writing when the power goes (the verified job stops
	# at fio's trigger): 4k random writes into [0, 16M) of node-a's range.
	fio --name=background --filename="$dev" --direct=1 --ioengine=libaio --iodepth=4 \
		--rw=randwrite --bs=4k --offset=0 --size=16M --rate=1m --time_based --runtime=900 \
		--output="$NVM_OUT/fio-background-a.log" &
	local background=$!
	fio --server="ip:$ip_a,$fio_port" >"$NVM_OUT/fio-server-a.log" 2>&1 &
	local i
	for ((i = 0; i < 100; i++)); do ss -ltn | grep -q ":$fio_port " && break; sleep 0.2; done
	ss -ltn | grep -q ":$fio_port " || fail "fio --server is not listening on $ip_a:$fio_port"
	say "flusher paused, background writer and fio server ($ip_a:$fio_port) running"
	mark a-ready
	# The power is cut while we wait here.
	for ((i = 0; i < 300; i++)); do
		[[ -e $SYNC/abort ]] && fail "aborted: $(cat "$SYNC/abort")"
		# The cut must come while this writer writes.
		kill -0 "$background" 2>/dev/null || fail "the background writer ended before the power cut"
		if ((i % 5 == 0)); then
			say "still alive: $(q '"%d record(s) unflushed, %d in flight, %d mirrored" % (sum(p["records_unflushed"] for p in e["partitions"]), sum(p["records_in_flight"] for p in e["partitions"]), e["mirror"]["mirrored_records"])' 2>/dev/null)"
		fi
		sleep 1
	done
	fail "still alive 300 s after a-ready: the host did not cut the power"
}

# ---------------------------------------------------------- node-a reboot ---
run_a2() {
	setup_net $ip_a
	# What the power cut left in node-a's NVRAM, read before the daemon opens it
	# (device-DAX has no read(2): inspect maps it).
	write_config
	local staged
	staged=$("$NVMCTL" --config node.toml nvram inspect --json | python3 -c 'import json, sys
r = json.load(sys.stdin)
print(sum(p["records"] for p in r["partitions"]) if r["state"] == "valid" else "state " + r["state"])') ||
		fail "nvmirrorctl nvram inspect $nvram failed"
	[[ $staged =~ ^[0-9]+$ ]] && ((staged > 0)) || fail "node-a's NVRAM after the power cut: expected staged records, got: $staged"
	say "node-a's NVRAM after the power cut (nvmirrorctl nvram inspect): valid, $staged record(s) staged"
	start_daemon
	st >"$NVM_OUT/status-a2-start.json"
	# node-b holds range 0 with a newer epoch: node-a must replay none of its own
	# (stale) records, and must not claim the range.
	ok 'e["replay"]["records"] == 0' || fail "node-a replayed records of a range it lost: $(q 'e["replay"]')"
	ok 'e["replay"]["skipped_not_owned"] > 0' ||
		fail "node-a's NVRAM held no records of range 0 (flusher was paused): $(q 'e["replay"]')"
	ok '[(r["owner"], r["state"]) for r in e["ranges"]] == [("node-b", "remote"), ("node-b", "remote")] and e["ranges"][0]["epoch"] >= 2' ||
		fail "after the restart node-a sees ranges $(ranges), expected both node-b's (range 0 with a new epoch)"
	say "restart: skipped $(q 'e["replay"]["skipped_not_owned"]') stale record(s) of range 0, replayed none; ranges $(ranges)"
	until_ok 120 "mirror link up again ($transport)" "$link_up"
	mark a2-up
	await b-gaveback 300
	until_ok 30 "range 0 back on node-a" \
		'[(r["owner"], r["state"]) for r in e["ranges"]] == [("node-a", "local"), ("node-b", "remote")] and e["ranges"][0]["epoch"] >= 3'
	say "after giveback node-a sees $(ranges)"
	# fio verifies the job node-b wrote alone; the power-cut job, which node-b verified after
	# its takeover and nobody wrote since, is covered by the whole-LUN checksum below (fio
	# verify of it here read half through the forwarding: about 60 s of CI under TCG).
	verify job_after "$dev" after-giveback-a
	local sum want
	sum=$(lun_sha)
	want=$(cat "$SYNC/lun.sha256")
	[[ $sum == "$want" ]] || fail "the LUN read through node-a ($sum) differs from node-b's view before the restart ($want)"
	say "whole LUN through $dev: sha256 $sum, as node-b read it before node-a came back"
	own_media_agree 0
	"$NVMCTL" --config node.toml nvram inspect --json >"$NVM_OUT/nvram-a2-inspect.json" 2>&1 || true
	st >"$NVM_OUT/status-a2-end.json"
	mark a2-done ok
	# Keep this daemon (and the link) up until node-b has made its last checks.
	await b-done 400
	say "PASS (node-a): rejoined without touching node-b's ranges, giveback, verify passed"
}

# ----------------------------------------------------------------- node-b ---
run_b() {
	setup_net $ip_b
	start_tiebreaker
	start_daemon
	until_ok 180 "mirror link up ($transport)" "$link_up"
	mark b-up
	await a-ready 180
	ok '[(r["owner"], r["epoch"], r["state"]) for r in e["ranges"]] == [("node-a", 1, "remote"), ("node-b", 1, "local")]' ||
		fail "unexpected ranges before the power cut: $(ranges)"
	job_powercut /dev/ublkb0 do_verify=0 verify_state_save=1 "rate=$write_rate" >powercut-client.fio
	# fio's trigger: at trigger_after s the client asks node-a's server for its
	# verify state, stores it here (10.77.0.1-powercut-0-verify.state), then runs
	# the local trigger, which asks the host to pull node-a's plug.
	local trig="echo \$(date +%s.%N) >$SYNC/kill-a.tmp && mv -f $SYNC/kill-a.tmp $SYNC/kill-a"
	if [[ $cut == both ]]; then
		# node-b loses its power too, and with it this RAM: the trigger first puts
		# the verify state fio has just stored here on the results dir (9p), then
		# asks for the cut.
		cat >trigger.sh <<-EOF
		st='$NVM_OUT/state/local-powercut-0-verify.state'
		if cp '$work/$ip_a-powercut-0-verify.state' "\$st.tmp" && mv -f "\$st.tmp" "\$st"; then
			echo \$(date +%s.%N) >'$SYNC/kill-both.tmp' && mv -f '$SYNC/kill-both.tmp' '$SYNC/kill-both'
		else
			echo "b: fio's trigger found no verify state to save" >'$SYNC/abort'
		fi
		EOF
		trig="bash $work/trigger.sh"
	fi
	say "fio client -> $ip_a:$fio_port: $write_rate random writes with verify; trigger at ${trigger_after}s"
	timeout -k 5 $((trigger_after + 120)) fio --trigger-timeout="$trigger_after" --trigger="$trig" \
		--client="$ip_a,$fio_port" powercut-client.fio >"$NVM_OUT/fio-client-b.log" 2>&1 &
	local client=$!
	if [[ $cut == both ]]; then
		await kill-both $((trigger_after + 90))
		say "trigger fired: verify state saved on the results dir, the host cuts the power of both nodes"
		local i
		for ((i = 0; i < 300; i++)); do
			[[ -e $SYNC/abort ]] && fail "aborted: $(cat "$SYNC/abort")"
			if ((i % 5 == 0)); then
				say "still alive: $(q '"second store holds %d record(s) of node-a, mirror %s" % (e["mirror"]["second_store"]["records"], e["mirror"]["state"])' 2>/dev/null)"
			fi
			sleep 1
		done
		fail "still alive 300 s after kill-both: the host did not cut the power"
	fi
	await kill-a $((trigger_after + 90))
	say "trigger fired: verify state received, the host cuts node-a's power"
	until_ok 120 "takeover of node-a's range" \
		'all(r["owner"] == "node-b" and r["state"] == "local" for r in e["ranges"]) and e["takeover"]["phase"] == "done"'
	# The status first (the host reads it as soon as it sees b-serving), stamped with the
	# time the takeover was seen done.
	local t_done
	t_done=$(date +%s.%N)
	st >"$NVM_OUT/status-b-after-takeover.json"
	mark b-serving "$t_done"
	say "took over: ranges $(ranges); takeover $(q 'e["takeover"]'); mirror $(q 'e["mirror"]["state"]')"
	if [[ $storage != shared ]]; then
		# node-a's medium misses the writes node-b replayed: marked before node-b served them.
		ok '[0, 0] in e["outdated_media"].get("node-a", [])' ||
			fail "node-a's medium is not marked outdated for range 0 after the takeover: $(q 'e["outdated_media"]')"
		say "node-a's medium is marked outdated for $(q 'e["outdated_media"]["node-a"]')"
	fi
	# The client stored the verify state before it ran the trigger.  When the power
	# went before node-a's fio sent its results, the client would wait for them
	# (up to its timeout): stop it.
	local rc=0 i p
	for ((i = 0; i < 25; i++)); do kill -0 "$client" 2>/dev/null || break; sleep 0.2; done
	if kill -0 "$client" 2>/dev/null; then
		say "the fio client still waits for its powerless server: stopping it"
		kill -TERM "$client" 2>/dev/null || true # timeout(1) passes it on to fio
		for ((i = 0; i < 25; i++)); do kill -0 "$client" 2>/dev/null || break; sleep 0.2; done
		# fio's client only asks its servers to quit on SIGTERM: kill it (the child of
		# our timeout(1)).
		for p in $(pgrep -P "$client" 2>/dev/null); do kill -KILL "$p" 2>/dev/null || true; done
	fi
	wait "$client" || rc=$?
	say "fio client ended with status $rc (its server lost power)"
	[[ -f $ip_a-powercut-0-verify.state ]] || { tail -30 "$NVM_OUT/fio-client-b.log"; fail "the fio client received no verify state"; }
	mv "$ip_a-powercut-0-verify.state" local-powercut-0-verify.state
	cp local-powercut-0-verify.state "$NVM_OUT/state/"
	verify job_powercut "$dev" after-takeover-b
	# New writes by node-b over what node-a still has, unflushed, in its NVRAM.
	job_after "$dev" do_verify=0 verify_state_save=1 >after-write.fio
	fio --output="$NVM_OUT/fio-after-write-b.log" after-write.fio || fail "fio writes on node-b after the takeover failed"
	cp local-after-0-verify.state "$NVM_OUT/state/"
	local sum
	sum=$(lun_sha)
	mark lun.sha256 "$sum"
	say "wrote [0,16M) anew; whole LUN sha256 $sum; node-a may come back"
	mark restart-a
	await a2-up 300
	until_ok 120 "mirroring with node-a again" "$link_up"
	st >"$NVM_OUT/status-b-rejoined.json"
	say "node-a rejoined: mirror $(q 'e["mirror"]["state"]') over $(q 'e["mirror"]["transport"]'), link $(q 'e["mirror"]["link"]')"
	if [[ $storage != shared ]]; then
		# A range goes back only to a medium that holds it: node-b first copies what node-a's
		# medium missed (and the marks are withdrawn).
		until_ok 300 "resync onto node-a's medium" 'e["outdated_media"] == {}'
		say "resync done: $(grep -ho 'resync: LUN.*' "$NVM_OUT/daemon-$role.log" | tr '\n' ';')"
	fi
	"$NVMCTL" --config node.toml giveback --timeout 120 || fail "giveback failed"
	ok '[(r["owner"], r["state"]) for r in e["ranges"]] == [("node-a", "remote"), ("node-b", "local")] and e["ranges"][0]["epoch"] >= 3' ||
		fail "after giveback node-b sees $(ranges)"
	say "giveback done: $(ranges)"
	mark b-gaveback
	# The whole LUN through node-b (range 0 forwarded to node-a) must read as it did before
	# node-a came back. No fio verify here: node-a verifies the job written after the takeover
	# and reads the same sha256, so these bytes are the verified ones (fio verify of both jobs
	# through the forwarding took about 80 s of CI under TCG for nothing more).
	[[ $(lun_sha) == "$sum" ]] || fail "the LUN read through node-b after the giveback differs from before"
	own_media_agree 1
	ok "$link_up" || fail "mirroring with node-a lost at the end"
	st >"$NVM_OUT/status-b-end.json"
	mark b-done
	# node-a's verify reads node-b's range through this daemon: stay up until it is done.
	await a2-done 400
	say "PASS (node-b): took over at the power cut, verify passed, node-a rejoined, giveback"
}

# ------------------------------------- filesystems under churn (test 44) ---
# node-a: ext4, xfs and btrfs on slices of its device (tests/vm/lib/fs-churn.sh), a
# metadata-heavy load on each whose journals (what fsync made durable) live on the results
# dir; the flusher pauses halfway; then node-a asks for its own power cut, loads running.
run_a_fs() {
	setup_net $ip_a
	start_daemon
	until_ok 120 "mirror link up ($transport)" "$link_up"
	mark a-up
	await b-up 180
	mkdir -p "$NVM_OUT/journals"
	churn_start "$dev" a "$NVM_OUT/journals"
	sleep "$churn_s"
	"$NVMCTL" --config node.toml flush pause >/dev/null || fail "flush pause"
	say "flusher paused: from here this node's acknowledged writes live only in the two NVRAMs"
	sleep "$churn_s"
	churn_alive
	say "durable operations so far: $(churn_journal_lines "$NVM_OUT/journals"); $(q '"%d record(s) unflushed" % sum(p["records_unflushed"] for p in e["partitions"])')"
	mark kill-a
	local i
	for ((i = 0; i < 300; i++)); do
		[[ -e $SYNC/abort ]] && fail "aborted: $(cat "$SYNC/abort")"
		churn_alive # the cut must come while the loads run
		((i % 5 == 0)) && say "still alive: durable operations $(churn_journal_lines "$NVM_OUT/journals")"
		sleep 1
	done
	fail "still alive 300 s after kill-a: the host did not cut the power"
}

# node-b: takes node-a's range over at the power cut, then mounts the three filesystems
# through its own device: every fsync'ed change is there, every checker clean.
run_b_fs() {
	setup_net $ip_b
	start_daemon
	until_ok 180 "mirror link up ($transport)" "$link_up"
	mark b-up
	await kill-a 300
	until_ok 120 "takeover of node-a's range" \
		'all(r["owner"] == "node-b" and r["state"] == "local" for r in e["ranges"]) and e["takeover"]["phase"] == "done"'
	local t_done
	t_done=$(date +%s.%N)
	st >"$NVM_OUT/status-b-after-takeover.json"
	mark b-serving "$t_done"
	say "took over: ranges $(ranges); takeover $(q 'e["takeover"]')"
	ok 'e["takeover"]["records_done"] > 0' || fail "the takeover replayed none of node-a's mirrored writes: $(q 'e["takeover"]')"
	await a-killed 60
	churn_verify "$dev" b "$NVM_OUT/journals"
	# The slices still hold $dev open: the daemon must stop anyway, drained, and say so
	# (a synchronous ublk delete waited for the holder forever).
	local i
	kill -TERM "$daemon_pid"
	for ((i = 0; i < 150; i++)); do kill -0 "$daemon_pid" 2>/dev/null || break; sleep 0.2; done
	kill -0 "$daemon_pid" 2>/dev/null && fail "nvmirrord did not stop within 30 s of SIGTERM while device-mapper held $dev open"
	wait "$daemon_pid" || fail "nvmirrord exited with status $? at SIGTERM while device-mapper held $dev open"
	daemon_pid=''
	grep -q 'still held open' "$NVM_OUT/daemon-$role.log" ||
		fail "nvmirrord stopped without saying that $dev was still held open"
	say "ok: SIGTERM with $dev still held open by the slices: nvmirrord stopped in $((i / 5)) s and said why the device lingers"
	churn_cleanup
	mark b-done
	say "PASS (node-b): took over at the power cut; ext4, xfs and btrfs hold every fsync'ed change and are clean"
}

# ------------------------------------------ node-b, back alone (test 41) ---
# Both nodes lost their power; only node-b returns (same NVDIMM, same disk).  Its
# daemon rebuilds its second store from the NVRAM, finds node-a's heartbeat on
# the shared medium dead, takes over range 0 and replays node-a's mirrored
# writes (node-a's flusher was paused: none of them is on the medium).
run_b2() {
	setup_net $ip_b
	write_config
	local staged
	staged=$("$NVMCTL" --config node.toml nvram inspect --json | python3 -c 'import json, sys
r = json.load(sys.stdin)
print("valid, %d record(s) of its own staged" % sum(p["records"] for p in r["partitions"]) if r["state"] == "valid" else "state " + r["state"])') ||
		fail "nvmirrorctl nvram inspect $nvram failed"
	say "node-b's NVRAM after the power cut (nvmirrorctl nvram inspect): $staged"
	[[ $staged == valid* ]] || fail "node-b's NVRAM is not valid after the power cut: $staged"
	local t_start t_serving
	t_start=$(date +%s.%N)
	mark b2-start "$t_start"
	start_tiebreaker
	start_daemon
	st >"$NVM_OUT/status-b2-start.json"
	say "rebuilt at start (daemon log): $(grep -ho 'second store: .*' "$NVM_OUT/daemon-$role.log" | head -n 1); second store now (a takeover replays and drops): $(q 'e["mirror"]["second_store"]')"
	until_ok 120 "takeover of node-a's range (node-a's disk heartbeat stopped at the cut)" \
		'all(r["owner"] == "node-b" and r["state"] == "local" for r in e["ranges"]) and (e.get("takeover") or {}).get("phase") == "done"'
	t_serving=$(date +%s.%N)
	mark b-serving "$t_serving"
	st >"$NVM_OUT/status-b2-after-takeover.json"
	# This poll (each status call costs ~0.7 s of a TCG vCPU, and start_daemon
	# makes a few) lags the daemon: its log says when it served.
	local timeline
	timeline=$(python3 -c 'import datetime, re, sys
t0 = float(sys.argv[1]); at = {}
# The lease and heartbeat as the daemon names them: on a disk, or on the voters.
steps = [("lease", r"(disk lease|lease on the voters) held"),
         ("dead", r"(disk heartbeat|heartbeat on the voters) has not changed"),
         ("replayed", "takeover complete"), ("live", "is live on")]
for line in open(sys.argv[2]):
    for k, pat in steps:
        if re.search(pat, line) and k not in at:
            ts = datetime.datetime.strptime(line[:26], "%Y-%m-%dT%H:%M:%S.%f")
            at[k] = ts.replace(tzinfo=datetime.timezone.utc).timestamp() - t0
missing = [k for k, _ in steps if k not in at]
if missing:
    sys.exit("daemon log lacks: " + ", ".join(missing))
print("%.1f s (disk lease held +%.1f s, node-a declared dead +%.1f s, replay done +%.1f s, device live +%.1f s)"
      % (max(at["replayed"], at["live"]), at["lease"], at["dead"], at["replayed"], at["live"]))' "$t_start" "$NVM_OUT/daemon-$role.log" 2>&1) ||
		fail "node-b's daemon log does not show the takeover steps: $timeline"
	mark b2-timeline "$timeline"
	say "daemon timeline from its start: serving after $timeline"
	say "took over $(awk -v a="$t_start" -v b="$t_serving" 'BEGIN { printf "%.1f", b - a }') s after the daemon started: ranges $(ranges); takeover $(q 'e["takeover"]'); mirror $(q 'e["mirror"]["state"]')"
	ok 'e["takeover"]["from"] == "node-a" and e["takeover"]["records_done"] > 0 and e["ranges"][0]["epoch"] >= 2' ||
		fail "the takeover replayed none of node-a's mirrored writes (or not from node-a): $(q 'e["takeover"]')"
	local dead
	dead=$(grep -hoE "node node-a's (disk heartbeat|heartbeat on the voters) has not changed for [0-9]* ms" "$NVM_OUT/daemon-$role.log" | head -n 1) || true
	[[ -n $dead ]] || fail "node-b's daemon log does not say node-a's disk heartbeat was dead before the takeover"
	say "daemon: $dead (and the link down): took over"
	if [[ $storage != shared ]]; then
		# node-a's medium missed the replay and whatever node-b writes now: it may not take
		# range 0 back before a resync.
		ok '[0, 0] in e["outdated_media"].get("node-a", [])' ||
			fail "node-a's medium is not marked outdated for range 0 after the takeover: $(q 'e["outdated_media"]')"
		say "node-a's medium is marked outdated for $(q 'e["outdated_media"]["node-a"]')"
	fi
	verify job_powercut "$dev" after-restart-b2
	mark b2-done
	say "PASS (node-b): back alone after both lost power, took over node-a's range, replayed $(q 'e["takeover"]["records_done"]') record(s), verify passed"
}

[[ -f $NVM_OUT/secret ]] || fail "no cluster secret in $NVM_OUT"
[[ $cut == a || $cut == both ]] || fail "NVM_PC_CUT must be a or both, not $cut"
[[ $storage =~ ^(shared|own|voters)$ ]] || fail "NVM_PC_STORAGE must be shared, own or voters, not $storage"
if [[ $load == fs ]]; then
	# shellcheck source=tests/vm/lib/fs-churn.sh
	source "$(dirname "$0")/../../vm/lib/fs-churn.sh"
	churn_require
	[[ $lun_mib == "$CHURN_LUN_MIB" ]] || fail "the LUN is $lun_mib MiB; the filesystems' slices need $CHURN_LUN_MIB"
	case $role in
	a) run_a_fs ;;
	b) run_b_fs ;;
	*) fail "role $role has no filesystem part" ;;
	esac
	exit 0
fi
case $role in
a) run_a ;;
a2) run_a2 ;;
b) run_b ;;
b2) run_b2 ;;
*) fail "unknown role $role" ;;
esac
