#!/bin/bash
# tests/twovm/guest/partition-node.sh ROLE   (runs INSIDE one of the two VMs of
# tests/twovm/42-partition-rdma.sh; ROLE is a or b)
#
# Contract with the host orchestrator (42-partition-rdma.sh):
#   - booted like the power-cut tests' guests (tests/twovm/lib/power-cut-host.sh): one
#     emulated NVDIMM (device-DAX /dev/dax0.0, the NVRAM), the shared disk /dev/vda (the
#     medium), eth0 on a QEMU socket netdev whose frames pass through a relay on the host
#     (the host cuts the link there, per direction, silently: frames are dropped);
#   - the node sets up its address (10.77.0.1 / .2), Soft-RoCE on eth0, its daemon
#     (takeover = "auto"), writes sync/ROLE-up, then runs the host's commands: the host
#     writes sync/cmd-ROLE-N (bash, run with this script's functions), the node writes
#     sync/out-ROLE-N (stdout and stderr) and then sync/rc-ROLE-N (the exit status), N = 1,
#     2, ... in order; sync/finish ends the loop, sync/abort too (with a failure).
#   - exit status 0 = fine, 77 = cannot run here (SKIPPED), else FAIL.
# Logs: $NVM_OUT/node-ROLE.log (this script), daemon-ROLE.log, w-node-ROLE.log (copied).
set -euo pipefail

role=${1:?usage: partition-node.sh a|b}
: "${NVM_BIN:?}" "${NVM_OUT:?}" "${NVM_REPO:=$(cd "$(dirname "$0")/../../.." && pwd)}"
NVMD=$NVM_BIN/nvmirrord
NVMCTL=$NVM_BIN/nvmirrorctl
P="python3 $NVM_REPO/tests/vm/lib/partition.py"
SYNC=$NVM_OUT/sync
node=node-$role
dev=/dev/ublkb$([[ $role == a ]] && echo 0 || echo 1)
ip_a=10.77.0.1 ip_b=10.77.0.2
transport=${NVM_PC_TRANSPORT:-rdma}
nvram=/dev/dax0.0
work=/tmp/partition
mkdir -p "$work"
cd "$work"
exec > >(tee -a "$NVM_OUT/node-$role.log") 2>&1

# shellcheck source=tests/twovm/guest/lib/guest-node.sh
source "$(dirname "$0")/lib/guest-node.sh"

cleanup() {
	local rc=$? pid
	set +e
	pid=$(cat "$work/daemon.pid" 2>/dev/null)
	if [[ -n $pid ]]; then
		kill -CONT "$pid" 2>/dev/null
		kill -TERM "$pid" 2>/dev/null
		for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
		kill -KILL "$pid" 2>/dev/null
	fi
	cp -f ./*.log "$NVM_OUT/" 2>/dev/null
	exit "$rc"
}
trap cleanup EXIT

# ------------------------------------------------- functions the host calls ---
st() { "$NVMCTL" --config node.toml status --json; }
# q EXPR: a Python expression over the status JSON (e = its engine part)
q() {
	st | python3 -c 'import json, sys
e = json.load(sys.stdin)["engine"]
r = eval(sys.argv[1])
print(r if isinstance(r, str) else json.dumps(r))' "$1"
}
ok() { [[ $(q "$1" 2>/dev/null) == true ]]; }
# until_ok SECONDS WHAT EXPR
until_ok() {
	local i
	for ((i = 0; i < $1 * 5; i++)); do
		ok "$3" && return 0
		sleep 0.2
	done
	st >"$NVM_OUT/status-$role-timeout.json" 2>&1 || true
	echo "$2: not reached within $1 s (status in status-$role-timeout.json)"
	return 1
}
mirroring='e["mirror"]["state"] == "mirroring" and e["mirror"]["transport"] == "'$transport'"'
home='[r["owner"] for r in e["ranges"]] == ["node-a", "node-b"] and all(r["serving"] == (r["owner"] == "'$node'") for r in e["ranges"])'
owns_all='all(r["owner"] == "'$node'" and r["serving"] for r in e["ranges"])'
serves_nothing='not any(r["serving"] for r in e["ranges"])'
epochs() { q '[r["epoch"] for r in e["ranges"]]'; }
daemon_pid() { cat "$work/daemon.pid"; }

write_config() {
	cat >node.toml <<-CFG
	[node]
	name = "$node"
	control_socket = "$work/$node.sock"

	[nvram]
	path = "$nvram"
	partitions = 2

	[cluster]
	id = 78
	secret_file = "$NVM_OUT/secret"
	transport = "$transport"
	heartbeat_interval_ms = 250
	heartbeat_timeout_ms = 3000
	takeover = "auto"
	degraded = "write-through"

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
	CFG
}

start_daemon() {
	write_config
	setsid "$NVMD" --config node.toml --state-dir "$work/state" >>"$NVM_OUT/daemon-$role.log" 2>&1 </dev/null &
	echo $! >"$work/daemon.pid"
	"$NVMCTL" --config node.toml wait --timeout 120 >/dev/null ||
		{ tail -20 "$NVM_OUT/daemon-$role.log"; echo "nvmirrord did not come up"; return 1; }
	echo "nvmirrord (pid $(daemon_pid)) serves $dev"
}

# restart_daemon: kill -9, remove the quiesced device, start again (a fenced or killed node)
restart_daemon() {
	local pid
	pid=$(daemon_pid)
	kill -CONT "$pid" 2>/dev/null || true
	kill -9 "$pid" 2>/dev/null || true
	for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
	"$NVMCTL" del "${dev#/dev/ublkb}" >/dev/null 2>&1 || true
	for _ in $(seq 300); do [[ -e /sys/class/ublk-char/ublkc${dev#/dev/ublkb} ]] || break; sleep 0.1; done
	start_daemon
}

# Blocks straddling the boundary of range 0 (node-a's) and range 1 (node-b's): node-a
# writes the even ones, node-b the odd ones, each reaching the other's range by forwarding.
layout() {
	local size rb
	size=$(q 'e["luns"][0]["size"]')
	rb=$(((size / 2 + 4095) / 4096))
	first=$((rb - 40)) count=80
}
writers() { # SECONDS
	layout
	local start=$first
	[[ $role == b ]] && start=$((first + 1))
	setsid $P write "$dev" "$start" 2 "$count" "$1" "$work/w-$node.log" </dev/null >/dev/null 2>&1 &
	echo $! >"$work/writer.pid"
}
wait_writers() {
	local pid
	pid=$(cat "$work/writer.pid")
	for _ in $(seq 600); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
	kill -0 "$pid" 2>/dev/null && { echo "the writer still runs after 60 s"; return 1; }
	cp -f "$work/w-$node.log" "$NVM_OUT/w-$node.log"
}
# image [medium]: this node's view of the written blocks (or the medium's) to the results dir
image() {
	layout
	local from=$dev to=$NVM_OUT/img-$node
	[[ ${1:-} == medium ]] && from=/dev/vda to=$NVM_OUT/img-medium
	dd if="$from" of="$to" bs=4k skip="$first" count=$((2 * count + 2)) iflag=direct status=none
	echo "$first"
}
drain() { "$NVMCTL" --config node.toml drain --timeout 120 >/dev/null; }
giveback() { "$NVMCTL" --config node.toml giveback --timeout 60 >/dev/null; }

# ------------------------------------------------------------------ set-up ---
setup() {
	guest_link_and_devdax "$1"
	[[ -b /dev/vda ]] || fail "no /dev/vda (shared disk)"
	say "net: $1 on eth0, mirror link over $transport; NVRAM $nvram, medium /dev/vda"
}

setup "$([[ $role == a ]] && echo $ip_a || echo $ip_b)"
start_daemon || fail "the daemon did not start"
mark "$role-up"

# ------------------------------------------------------- the command loop ---
n=1
while :; do
	[[ -e $SYNC/abort ]] && fail "aborted: $(cat "$SYNC/abort")"
	[[ -e $SYNC/finish ]] && break
	cmd=$SYNC/cmd-$role-$n
	if [[ -e $cmd ]]; then
		rc=0
		(set +e; eval "$(cat "$cmd")") >"$SYNC/out-$role-$n" 2>&1 || rc=$?
		mark "rc-$role-$n" "$rc"
		n=$((n + 1))
		continue
	fi
	sleep 0.1
done
say "done after $((n - 1)) command(s)"
