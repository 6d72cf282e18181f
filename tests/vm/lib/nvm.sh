#!/bin/bash
# Helpers shared by the VM tests (sourced). Runs inside the test VM as root.
# Each test gets a fresh scratch dir as cwd; everything it creates lives there or is torn
# down by nvm_cleanup (registered as an EXIT trap by nvm_init).
set -euo pipefail

NVMD=${NVM_BIN:?}/nvmirrord
NVMCTL=${NVM_BIN:?}/nvmirrorctl
NVM_LOOPS=()
NVM_DAEMON_PIDS=()

say() { printf '[%s] %s\n' "$(date +%T)" "$*"; }
fail() { say "FAIL: $*"; exit 1; }
skip() { say "SKIPPED: $*"; exit 77; }

nvm_init() {
	[[ -x $NVMD && -x $NVMCTL ]] || fail "binaries missing in $NVM_BIN (build with cargo build --release)"
	modprobe ublk_drv || fail "modprobe ublk_drv failed"
	[[ -c /dev/ublk-control ]] || fail "no /dev/ublk-control after modprobe ublk_drv"
	trap nvm_cleanup EXIT
}

nvm_cleanup() {
	local rc=$?
	set +e
	for pid in "${NVM_DAEMON_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
	for pid in "${NVM_DAEMON_PIDS[@]}"; do
		for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
		kill -KILL "$pid" 2>/dev/null
	done
	grep -o '/dev/ublkb[0-9]*' /proc/mounts 2>/dev/null | sort -u | while read -r d; do umount -l "$d"; done
	for f in /sys/class/ublk-char/ublkc*; do
		[[ -e $f ]] && "$NVMCTL" del "${f##*ublkc}" >/dev/null 2>&1
	done
	for l in "${NVM_LOOPS[@]}"; do losetup -d "$l" 2>/dev/null; done
	# Test-specific teardown (e.g. rxe devices) once no daemon holds them any more.
	declare -F nvm_extra_cleanup >/dev/null && nvm_extra_cleanup
	[[ -d ${NVM_OUT:-} ]] && cp -f ./*.log "$NVM_OUT/" 2>/dev/null
	exit $rc
}

# nvm_rxe_up: a Soft-RoCE device (nvmrxe0) over a dummy interface with address 10.99.0.1,
# for daemons whose links run over RDMA in one VM; removed by nvm_cleanup once no daemon
# uses it (removing an rxe device that has users blocks).
nvm_rxe_up() {
	modprobe rdma_rxe || fail "modprobe rdma_rxe"
	ip link add nvm0 type dummy && ip addr add 10.99.0.1/24 dev nvm0 && ip link set nvm0 up
	rdma link add nvmrxe0 type rxe netdev nvm0 || fail "rdma link add"
	nvm_extra_cleanup() { rdma link delete nvmrxe0 2>/dev/null; ip link del nvm0 2>/dev/null; }
}

# nvm_medium NAME SIZE_MB -> prints a loop device over a fresh file
nvm_medium() {
	truncate -s "${2}M" "$PWD/$1.img"
	local dev
	dev=$(losetup --find --show "$PWD/$1.img")
	NVM_LOOPS+=("$dev")
	echo "$dev"
}

# nvm_config FILE NODE NVRAM_PATH NVRAM_MB MEDIUM DEV_ID [PARTITIONS]
nvm_config() {
	local file=$1 node=$2 nvram=$3 nvram_mb=$4 medium=$5 id=$6 parts=${7:-4}
	# A shared NVDIMM may hold an earlier test's log: blank it so this test starts clean.
	[[ -b $nvram ]] && dd if=/dev/zero of="$nvram" bs=1M count=1 oflag=direct status=none
	cat >"$file" <<-CFG
	[node]
	name = "$node"
	control_socket = "$PWD/$node.sock"

	[nvram]
	path = "$nvram"
	size = "${nvram_mb}MiB"
	partitions = $parts

	[[lun]]
	name = "lun0"
	medium = "$medium"
	device_id = $id
	queue_depth = 64
	CFG
}

# nvm_start CONFIG LOGNAME -> starts the daemon in the background, waits until it serves
nvm_start() {
	local cfg=$1 log=$2
	"$NVMD" --config "$cfg" --state-dir "$PWD/state" >>"$log" 2>&1 &
	NVM_LAST_PID=$!
	NVM_DAEMON_PIDS+=("$NVM_LAST_PID")
	if ! "$NVMCTL" --config "$cfg" wait --timeout 60 >/dev/null; then
		tail -20 "$log"
		fail "nvmirrord did not come up (log $log)"
	fi
}

# nvm_status_has CONFIG TEXT: the daemon's `status --json` contains TEXT. The output is
# captured first: under pipefail, `status --json | grep -q` fails whenever grep quits before
# nvmirrorctl has written everything (nvmirrorctl then sees a closed pipe).
nvm_status_has() {
	local out
	out=$("$NVMCTL" --config "$1" status --json 2>/dev/null) || return 1
	[[ $out == *"$2"* ]]
}

# nvm_field NODE EXPR: a Python expression over node-NODE's engine status `e` (JSON), e.g.
# nvm_field a 'e["storage"]'
nvm_field() {
	"$NVMCTL" --config "node-$1.toml" status --json |
		python3 -c "import json,sys; e=json.load(sys.stdin)['engine']; print($2)"
}

# nvm_wait_link: waits until node-a and node-b both report their mirror link up (60 s).
nvm_wait_link() {
	for _ in $(seq 300); do
		nvm_status_has node-a.toml '"link": "Up' && nvm_status_has node-b.toml '"link": "Up' && return 0
		sleep 0.2
	done
	fail "the mirror link did not come up"
}

# nvm_stop PID: graceful stop (drains), waits for exit
nvm_stop() {
	kill -TERM "$1"
	for _ in $(seq 300); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.2; done
	fail "nvmirrord $1 did not stop within 60 s"
}

# nvm_wait_gone PID
# nvm_explain_verify_failure FIO_LOG DAEMON_LOG...: what a failed fio verify saw, compactly and
# last (CI shows only a log's tail): each daemon's errors and lease changes, then fio's first
# errors and its summary of what it checked (the lines that say what was lost come last).
nvm_explain_verify_failure() {
	local fio_log=$1 d
	shift
	for d in "$@"; do
		echo "---- $d: errors, lease changes, takeovers (last 10) ----"
		grep -E 'ERROR|lease (held|expired)|took over|taking over|takeover|replay' "$d" | tail -10 | cut -c1-300
	done
	echo "---- $fio_log: first errors ----"
	grep -m8 -iE 'verify|error|bad|crc|fio:|expected|received' "$fio_log" | cut -c1-300 || tail -5 "$fio_log"
	grep -m3 -E 'err=|READ:' "$fio_log" | cut -c1-300
}

nvm_wait_gone() {
	for _ in $(seq 600); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
	fail "process $1 still alive after 60 s"
}

# nvm_wait_dev ID: until /dev/ublkbID exists
nvm_wait_dev() {
	for _ in $(seq 100); do [[ -b /dev/ublkb$1 ]] && return 0; sleep 0.1; done
	fail "/dev/ublkb$1 did not appear"
}

# nvm_wait_dev_gone ID: until the (asynchronously deleted) ublk device has been freed
nvm_wait_dev_gone() {
	for _ in $(seq 300); do [[ -e /sys/class/ublk-char/ublkc$1 ]] || return 0; sleep 0.1; done
	fail "ublk device $1 still exists 30 s after its deletion"
}

# nvm_drain_both WHY: every staged write of node-a and node-b (node-a.toml, node-b.toml) on
# their media.
nvm_drain_both() {
	"$NVMCTL" --config node-a.toml drain --timeout 60 >/dev/null || fail "drain node-a ($1)"
	"$NVMCTL" --config node-b.toml drain --timeout 60 >/dev/null || fail "drain node-b ($1)"
}

# nvm_same_media LUN_MIB MEDIUM-A MEDIUM-B: whether both media hold the same first LUN_MIB
# MiB. A daemon may write its medium through device-mapper, which bypasses the loop
# device's page cache: drop it before comparing.
nvm_same_media() {
	blockdev --flushbufs "$2" "$3" && echo 3 >/proc/sys/vm/drop_caches &&
		cmp -n $(($1 << 20)) "$2" "$3"
}

# nvm_overlap_check FIRST COUNT MEDIUM...: after the overlapping writers of overlap.py
# (overlap-a.log through /dev/ublkb0, overlap-b.log through /dev/ublkb1) and a drain, reads
# blocks FIRST..FIRST+COUNT-1 through both devices and from each MEDIUM and checks that every
# block holds a value one disk could hold, the same in all of them; says the checker's line.
nvm_overlap_check() {
	local first=$1 count=$2 n m out
	shift 2
	for n in 0 1; do
		dd if=/dev/ublkb$n of=overlap-dev$n.img bs=4096 skip=$first count=$count iflag=direct status=none ||
			fail "read the overlapped blocks through /dev/ublkb$n"
	done
	for m in "$@"; do
		dd if="$m" of="overlap-medium-${m##*/}.img" bs=4096 skip=$first count=$count iflag=direct status=none ||
			fail "read the overlapped blocks from $m"
	done
	out=$(python3 "$NVM_REPO/tests/vm/lib/overlap.py" check $first $count a=overlap-a.log b=overlap-b.log \
		-- overlap-dev0.img overlap-dev1.img overlap-medium-*.img) ||
		{ echo "$out"; fail "overlapping writers: a device or medium holds a value a disk could not"; }
	say "ok: $out (through both devices and on both media)"
}

# nvm_own_storage_config NODE(a|b) MEDIUM ARBITER LUN_MIB PORT
# nvm_cluster_config's node-NODE.toml in shared-nothing mode (`storage = "own"`): MEDIUM is
# the node's own, the table and leases live on ARBITER, the LUN is LUN_MIB, TCP on PORT.
nvm_own_storage_config() {
	local n=$1 medium=$2 arbiter=$3 lun_mib=$4 port=$5
	nvm_cluster_config "$n" "$medium" auto tcp 127.0.0.1 "$port"
	sed -i "s|^takeover = .*|&\nstorage = \"own\"\narbiter = \"$arbiter\"|" "node-$n.toml"
	echo "size = \"${lun_mib}MiB\"" >>"node-$n.toml"
}

# nvm_cluster_config NODE(a|b) MEDIUM TAKEOVER [TRANSPORT [ADDRESS [PORT]]]
# Writes node-NODE.toml for a two-node cluster sharing MEDIUM: node-a serves /dev/ublkb0,
# node-b /dev/ublkb1, the LUN has 2 ranges (range 0 node-a's, range 1 node-b's); the
# secret is ./secret (created if missing).
nvm_cluster_config() {
	local n=$1 medium=$2 takeover=$3 transport=${4:-tcp} addr=${5:-127.0.0.1} port=${6:-7801}
	[[ -f secret ]] || head -c 48 /dev/urandom | base64 >secret
	cat >node-$n.toml <<-CFG
	[node]
	name = "node-$n"
	control_socket = "$PWD/node-$n.sock"

	[nvram]
	path = "$PWD/nvram-$n.img"
	size = "48MiB"
	partitions = 4

	[cluster]
	id = 42
	secret_file = "$PWD/secret"
	transport = "$transport"
	heartbeat_interval_ms = 100
	heartbeat_timeout_ms = 1000
	# Disk lease: a dead node's heartbeat is called dead after 1.1 x 2 + 1 + 0.25 s.
	disk_heartbeat_ms = 250
	disk_lease_ms = 2000
	medium_io_timeout_ms = 1000
	takeover = "$takeover"

	[[cluster.node]]
	name = "node-a"
	address = "$addr:$port"

	[[cluster.node]]
	name = "node-b"
	address = "$addr:$((port + 1))"

	[[lun]]
	name = "lun0"
	medium = "$medium"
	device_id = $([[ $n == a ]] && echo 0 || echo 1)
	ranges = 2
	CFG
}
