# shellcheck shell=bash
# tests/twovm/lib/power-cut-host.sh - host-side helpers shared by the power-cut
# tests (tests/twovm/40-power-cut.sh, 41-power-cut-both.sh).  Sourced by them
# after scripts/vm/lib.sh, at top level, with NVM_REPO, NVM_OUT and NVM_BIN set;
# not a test itself (tests/twovm/*.sh are; subdirectories are not).
#
# Sets transport, storage, load, lun_mib, OUT, SYNC, node_script (unless the test set it), t0, port and vm_pid (VM name -> its
# background nvm_vm_boot subshell), the EXIT/TERM/INT traps (no QEMU outlives
# the test), and defines:
#   pc_setup               checks, VM preparation, fresh state, a free port
#   say MSG / skip MSG / fail MSG / mark NAME [CONTENT]
#   boot NAME ROLE TIMEOUT listen|connect [PORT]   (extra guest env: pc_boot_env)
#   boot_pair TMO_B TMO_A  node-b's QEMU listens on $port, then node-a connects
#   vm_running NAME / qemu_pid NAME / await NAME SECONDS VM...
#   power_cut NAME...      SIGKILL to those VMs' QEMUs (one kill), sets t_kill
#   pc_free_port           a free TCP port on 127.0.0.1 for a VM link
# The sync-file protocol between host and guests is listed in
# tests/twovm/guest/power-cut-node.sh.

transport=${NVM_PC_TRANSPORT:-rdma}
[[ $transport == tcp || $transport == rdma ]] || { echo "NVM_PC_TRANSPORT must be tcp or rdma" >&2; exit 2; }
# shared: one disk image both VMs attach (claim set A); own: each VM its own medium image
# plus a small shared arbiter image (shared-nothing mode, issue #17).
storage=${NVM_PC_STORAGE:-shared}
[[ $storage =~ ^(shared|own|voters)$ ]] || { echo "NVM_PC_STORAGE must be shared, own or voters" >&2; exit 2; }
# fio: fio writes with verify (40, 41, 43); fs: ext4, xfs and btrfs under a metadata-heavy
# load (44), which needs a bigger LUN (xfs refuses filesystems below 300 MB).
load=${NVM_PC_LOAD:-fio}
[[ $load == fio || $load == fs ]] || { echo "NVM_PC_LOAD must be fio or fs" >&2; exit 2; }
lun_mib=$([[ $load == fs ]] && echo 640 || echo 128)
OUT=$(mkdir -p "$NVM_OUT" && cd "$NVM_OUT" && pwd)
SYNC=$OUT/sync
node_script=${node_script:-$NVM_REPO/tests/twovm/guest/power-cut-node.sh}
t0=$SECONDS
port=''
t_kill=''
declare -gA vm_pid=() # VM name -> background nvm_vm_boot subshell
pc_boot_env=${pc_boot_env:-} # extra `--env K=V` words for every guest (word-split)

say() { printf '[%s host +%ss] %s\n' "$(date +%T)" "$((SECONDS - t0))" "$*"; }
mark() { printf '%s\n' "${2:-$(date +%s.%N)}" >"$SYNC/$1.tmp" && mv -f "$SYNC/$1.tmp" "$SYNC/$1"; }
skip() { say "SKIPPED: $*"; exit 77; }

pc_free_port() {
	local p
	for _ in $(seq 50); do
		p=$((20000 + RANDOM % 30000))
		if ! ss -Htln "sport = :$p" | grep -q .; then echo "$p"; return 0; fi
	done
	return 1
}

pc_setup() {
	local b
	for b in nvmirrord nvmirrorctl; do
		[[ -x $NVM_BIN/$b ]] || { say "FAIL: $NVM_BIN/$b missing (cargo build --release)"; exit 1; }
	done
	command -v fio >/dev/null || skip "fio is not installed on the host (the VMs run the host's userspace)"
	command -v python3 >/dev/null || skip "python3 is not installed on the host"

	nvm_vm_prepare
	nvm_vm_detect_accel # once here, not in each background boot
	export NVM_VM_QUIET=1 # two consoles would interleave: they go to console-NAME.log

	# Fresh state: the NVDIMMs and the disk start zeroed (sparse files).
	rm -rf "$SYNC" "$OUT/state" "$OUT"/pmem-*.img "$OUT"/shared.img "$OUT"/medium-?.img "$OUT"/arbiter.img "$OUT"/guest-rc-* "$OUT"/qemu-*.pid
	mkdir -p "$SYNC" "$OUT/state"
	if [[ $storage == shared ]]; then
		truncate -s $((lun_mib + 1))M "$OUT/shared.img" # 1 MiB ownership table + the LUN (2 ranges)
	else
		# Each node's own medium holds the 128 MiB LUN only; the table and the disk leases
		# live on the arbiter.
		truncate -s ${lun_mib}M "$OUT/medium-a.img" "$OUT/medium-b.img"
		[[ $storage == voters ]] || truncate -s 4M "$OUT/arbiter.img"
	fi
	(umask 077 && head -c 48 /dev/urandom | base64 >"$OUT/secret")
	port=$(pc_free_port) || { say "FAIL: no free TCP port for the VM link"; exit 1; }
}

qemu_pid() { # NAME -> pid of that VM's QEMU, if it runs
	local f=$OUT/qemu-$1.pid pid
	[[ -f $f ]] || return 1
	pid=$(<"$f")
	[[ $pid =~ ^[0-9]+$ ]] && tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -q -- "-pidfile $f" || return 1
	echo "$pid"
}
# shellcheck disable=SC2317 # invoked by the EXIT trap
cleanup() {
	local rc=$? n pid
	set +e
	for n in "${!vm_pid[@]}"; do
		if pid=$(qemu_pid "$n"); then
			say "cleanup: killing QEMU of VM $n (pid $pid)"
			kill -KILL "$pid"
		fi
	done
	# Their nvm_vm_boot subshells end with QEMU (bounded: a QEMU that never wrote
	# its pid file is stopped by its own VM timeout).
	for n in "${!vm_pid[@]}"; do
		for _ in $(seq 100); do kill -0 "${vm_pid[$n]}" 2>/dev/null || break; sleep 0.2; done
	done
	exit "$rc"
}
trap cleanup EXIT
trap 'say "terminated"; exit 143' TERM INT

# vm_disks ROLE: the --disk words of a node (/dev/vda = its medium, /dev/vdb = the arbiter).
vm_disks() {
	if [[ $storage == shared ]]; then
		echo "--disk $OUT/shared.img"
	elif [[ $storage == voters ]]; then
		echo "--disk $OUT/medium-${1:0:1}.img"
	else
		echo "--disk $OUT/medium-${1:0:1}.img --disk $OUT/arbiter.img"
	fi
}
boot() { # NAME ROLE TIMEOUT listen|connect [PORT]
	local name=$1 role=$2 tmo=$3 mode=$4 link_port=${5:-$port} nvdimm=$OUT/pmem-${2:0:1}.img
	# shellcheck disable=SC2046,SC2086 # vm_disks, pc_boot_env: whole words
	nvm_vm_boot --results "$OUT" --name "$name" --cpus 1 --mem 1024 --timeout "$tmo" \
		--nvdimm "$nvdimm:256M" $(vm_disks "$role") "--net-$mode" "$link_port" \
		--env "NVM_BIN=$NVM_BIN" --env "NVM_OUT=$OUT" \
		--env "NVM_PC_TRANSPORT=$transport" --env "NVM_PC_STORAGE=$storage" --env "NVM_PC_LOAD=$load" --env "NVM_PC_LUN_MIB=$lun_mib" --env "NVM_PC_CHURN_SECONDS=${NVM_PC_CHURN_SECONDS:-10}" --env "NVM_PC_FIO_RATE=${NVM_PC_FIO_RATE:-3m}" --env "NVM_PC_FIO_TRIGGER=${NVM_PC_FIO_TRIGGER:-18}" \
		$pc_boot_env \
		--qemu-arg -pidfile --qemu-arg "$OUT/qemu-$name.pid" \
		-- /bin/bash "$node_script" "$role" >"$OUT/vm-$name.out" 2>&1 &
	vm_pid[$name]=$!
	say "booting VM $name ($role, $mode on 127.0.0.1:$link_port, NVDIMM $(basename "$nvdimm"), timeout ${tmo}s)"
}
vm_running() { kill -0 "${vm_pid[$1]}" 2>/dev/null; }

# Waits up to TICKS x 0.2 s for the named VMs to finish on their own (failing at once if a
# guest gave up), then collects their exit codes into the array `rc`, in the order named.
collect_exits() { # TICKS NAME...
	local ticks=$1 n r
	shift
	for _ in $(seq "$ticks"); do
		r=
		for n in "$@"; do vm_running "$n" && r=running; done
		[[ -n $r ]] || break
		[[ -e $SYNC/abort ]] && fail "a VM gave up: $(cat "$SYNC/abort")"
		sleep 0.2
	done
	rc=()
	for n in "$@"; do
		r=0
		wait "${vm_pid[$n]}" || r=$?
		unset "vm_pid[$n]"
		rc+=("$r")
	done
}
# await NAME SECONDS VM...: until sync/NAME exists; fails on abort, on timeout,
# or when one of the VMs that should produce it has ended.  A test may define
# pc_await_hook, run at every poll (46-pacemaker.sh honours fence requests there).
await() {
	local name=$1 secs=$2 i v
	shift 2
	for ((i = 0; i < secs * 5; i++)); do
		if declare -F pc_await_hook >/dev/null; then pc_await_hook; fi
		[[ -e $SYNC/$name ]] && return 0
		[[ -e $SYNC/abort ]] && fail "a VM gave up: $(cat "$SYNC/abort")"
		for v in "$@"; do vm_running "$v" || { sleep 1; [[ -e $SYNC/$name ]] && return 0; fail "VM $v ended before $name"; }; done
		sleep 0.2
	done
	fail "timed out after ${secs}s waiting for $name"
}
fail() {
	say "FAIL: $*"
	mark abort "host: $*" 2>/dev/null || true
	local n
	for n in "${!vm_pid[@]}"; do
		echo "---- last lines of node-${n}.log / console-$n.log ----"
		tail -n 25 "$OUT/node-$n.log" 2>/dev/null || tail -n 25 "$OUT/console-$n.log" 2>/dev/null
	done
	# Give the guests a moment to see `abort` and leave their logs, then pull the plugs.
	sleep 3
	exit 1
}

# boot_pair TMO_B TMO_A: node-b's QEMU listens (a listening socket netdev accepts
# a new connection after its peer died; a connecting one never reconnects), then
# node-a's connects.
boot_pair() {
	boot b b "$1" listen
	for _ in $(seq 150); do
		ss -Htln "sport = :$port" | grep -q . && break
		vm_running b || fail "VM b ended before listening on $port"
		sleep 0.2
	done
	ss -Htln "sport = :$port" | grep -q . || fail "VM b's QEMU does not listen on $port"
	boot a a "$2" connect
}

# power_cut NAME...: SIGKILL to the QEMUs of those VMs, all in one kill(1) (no
# daemon shutdown, no guest kernel, writes in flight); t_kill = when.  Then
# checks that each is gone and that its guest command never finished.
power_cut() {
	local n p pids=() r
	for n in "$@"; do
		p=$(qemu_pid "$n") || fail "no QEMU pid for VM $n"
		pids+=("$p")
	done
	kill -KILL "${pids[@]}"
	# shellcheck disable=SC2034 # read by the tests
	t_kill=$EPOCHREALTIME
	say "POWER CUT: SIGKILL to the QEMU of VM(s) $* (pid(s) ${pids[*]})"
	for n in "$@"; do
		for _ in $(seq 150); do vm_running "$n" || break; sleep 0.2; done
		vm_running "$n" && fail "VM $n still running 30 s after SIGKILL to its QEMU"
		r=0
		wait "${vm_pid[$n]}" || r=$?
		unset "vm_pid[$n]"
		[[ ! -e $OUT/guest-rc-$n ]] || fail "node-$n's guest command finished ($(cat "$OUT/guest-rc-$n")): it was not cut mid-run"
		say "VM $n is gone, its command never finished (nvm_vm_boot status $r: it reports a SIGKILLed QEMU like a timeout)"
	done
}
