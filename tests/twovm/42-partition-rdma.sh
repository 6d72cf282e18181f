#!/bin/bash
# tests/twovm/42-partition-rdma.sh - the partition suite over RDMA, across two VMs.
# Runs ON THE HOST (a two-VM test; contract at the top of scripts/test.sh).
# twovm-timeout: 900
#
# Issue 14, item 5: partition cycles with the mirror link on Soft-RoCE between two VMs (a cut
# cannot be made between two rxe devices of one VM: their traffic never leaves the kernel).
# node-a and node-b are two VMs set up as in the power-cut tests (own NVDIMM as device-DAX
# NVRAM, one shared disk as the medium, takeover = "auto" on both); their Ethernet link runs
# through a relay on the host (tests/twovm/lib/link-relay.py) that drops frames one way or
# both ways on a signal: a silent cut, nothing reset.  Both nodes write versioned blocks
# straddling the two ranges (each reaches the other's range by forwarding) and log every
# acknowledgement (tests/vm/lib/partition.py write).  Cycles:
#   cut-both 6 s, oneway-ab 6 s, oneway-ba 6 s, cut-short 0.6 s: no range moves (both disk
#     heartbeats live), mirroring comes back over rdma by itself;
#   stop-a: node-a's daemon SIGSTOPped until node-b has taken node-a's range over; after
#     SIGCONT node-a serves nothing; node-a restarts and gets its range back by giveback;
#   cut-both once more after that restart.
# After each cycle the checker reads the blocks through both nodes and from the drained
# medium: every acknowledged write is there (or a later tried one), nothing older.
# The host drives the guests by files (sync/cmd-ROLE-N; see guest/partition-node.sh).
# CI runs cut-both and stop-a (test 24 runs every kind over TCP; CI's hour is tight);
# NVM_SOAK=1 runs all six.  Knobs: NVM_PC_TRANSPORT (rdma | tcp), NVM_PART_CYCLES
# (a list of cycle kinds).
# Exit: 0 PASS, 77 SKIP, else FAIL.  Logs in $NVM_OUT.
set -euo pipefail
: "${NVM_REPO:?}" "${NVM_OUT:?}"
NVM_BIN=${NVM_BIN:-$NVM_REPO/target/release}
# shellcheck source=scripts/vm/lib.sh
source "$NVM_REPO/scripts/vm/lib.sh"
node_script=$NVM_REPO/tests/twovm/guest/partition-node.sh
# shellcheck source=tests/twovm/lib/power-cut-host.sh
source "$NVM_REPO/tests/twovm/lib/power-cut-host.sh"
pc_setup
P="python3 $NVM_REPO/tests/vm/lib/partition.py"
default_cycles="cut-both stop-a"
[[ ${NVM_SOAK:-0} != 1 ]] || default_cycles="cut-both oneway-ab oneway-ba cut-short stop-a cut-both"
read -r -a cycles <<<"${NVM_PART_CYCLES:-$default_cycles}"

# The relay between the VMs: node-b's QEMU listens on $port, node-a's connects to $relay_port.
relay_port=$(pc_free_port) || fail "no free TCP port for the relay"
relay_pid=''
stop_relay() {
	local rc=$?
	[[ -z $relay_pid ]] || kill "$relay_pid" 2>/dev/null || true
	(exit "$rc") || cleanup
	cleanup
}
trap stop_relay EXIT

say "results in $OUT; mirror link over $transport through the host relay; accel $NVM_VM_ACCEL_NAME"
boot b b 840 listen
for _ in $(seq 150); do
	ss -Htln "sport = :$port" | grep -q . && break
	vm_running b || fail "VM b ended before listening on $port"
	sleep 0.2
done
python3 "$NVM_REPO/tests/twovm/lib/link-relay.py" "$relay_port" "$port" "$OUT/relay.pid" 2>"$OUT/relay.log" &
relay_pid=$!
for _ in $(seq 50); do ss -Htln "sport = :$relay_port" | grep -q . && break; sleep 0.1; done
boot a a 840 connect "$relay_port"
await a-up 300 a b
await b-up 300 a b

# on NODE COMMAND...: runs COMMAND in that node's guest (with its functions), prints its
# output, returns its exit status. Commands are numbered by the files already sent (a
# counter in a variable would not survive the $(on ...) subshells).
on() {
	local n=$1 i k
	shift
	k=$(($(find "$SYNC" -maxdepth 1 -name "cmd-$n-*" ! -name '*.tmp' | wc -l) + 1))
	printf '%s\n' "$*" >"$SYNC/cmd-$n-$k.tmp" && mv -f "$SYNC/cmd-$n-$k.tmp" "$SYNC/cmd-$n-$k"
	for ((i = 0; i < 1500; i++)); do
		[[ -e $SYNC/rc-$n-$k ]] && break
		[[ -e $SYNC/abort ]] && fail "a VM gave up: $(cat "$SYNC/abort")"
		vm_running "$n" || fail "VM $n ended while running: $*"
		sleep 0.1
	done
	[[ -e $SYNC/rc-$n-$k ]] || fail "node-$n did not finish '$*' within 150 s"
	cat "$SYNC/out-$n-$k"
	return "$(<"$SYNC/rc-$n-$k")"
}
until_on() { # SECONDS WHAT NODE COMMAND...: until COMMAND succeeds on NODE
	local secs=$1 what=$2 t_end=$((SECONDS + $1))
	shift 2
	while ((SECONDS < t_end)); do
		on "$@" >/dev/null 2>&1 && return 0
		sleep 0.5
	done
	fail "$what: not within $secs s"
}
both_mirroring() {
	until_on 120 "mirroring over $transport again on node-a" a 'ok "$mirroring"'
	until_on 60 "mirroring over $transport again on node-b" b 'ok "$mirroring"'
}
relay() { kill "-$1" "$relay_pid"; }

# verify WHAT [FENCED]: images through every serving node and the drained medium, checked
verify() {
	local what=$1 fenced=${2:-} n base
	for n in a b; do
		base=$(on $n image) || fail "$what: reading through node-$n failed: $base"
	done
	for n in a b; do
		[[ $n == "$fenced" ]] && continue # a fenced node never drains (the new owner flushed)
		on $n drain >/dev/null || fail "$what: node-$n did not drain"
	done
	on b image medium >/dev/null || fail "$what: reading the medium failed"
	local images=("$OUT/img-node-a" "$OUT/img-node-b" "$OUT/img-medium")
	$P check "$base" "$OUT/w-node-a.log" "$OUT/w-node-b.log" -- "${images[@]}" >"$OUT/check.out" ||
		{ cat "$OUT/check.out"; fail "$what: an acknowledged write is missing"; }
	say "$what: $(cat "$OUT/check.out") [cycle $((SECONDS - cycle_t0)) s]"
}

both_mirroring
say "both daemons up, mirroring over $transport"
n=0
for kind in "${cycles[@]}"; do
	n=$((n + 1))
	cycle_t0=$SECONDS
	before=$(on b epochs)
	case $kind in
	cut-both | oneway-ab | oneway-ba | cut-short)
		secs=6
		[[ $kind == cut-short ]] && secs=0.6
		on a writers 12 >/dev/null
		on b writers 12 >/dev/null
		sleep 2
		case $kind in
		cut-both | cut-short) relay USR1; relay USR2 ;;
		oneway-ab) relay USR1 ;;
		oneway-ba) relay USR2 ;;
		esac
		sleep "$secs"
		why=$(on b 'q "e[\"takeover_note\"]"' 2>/dev/null || true)
		case $kind in
		cut-both | cut-short) relay USR1; relay USR2 ;;
		oneway-ab) relay USR1 ;;
		oneway-ba) relay USR2 ;;
		esac
		on a wait_writers >/dev/null || fail "cycle $n: node-a's writer"
		on b wait_writers >/dev/null || fail "cycle $n: node-b's writer"
		both_mirroring
		after=$(on b epochs)
		[[ $after == "$before" ]] || fail "cycle $n ($kind): a range moved although both nodes live: epochs $before -> $after"
		on a 'ok "$home"' >/dev/null && on b 'ok "$home"' >/dev/null ||
			fail "cycle $n ($kind): the ranges are not served by their owners: $(on b 'q "e[\"ranges\"]"')"
		verify "cycle $n ($kind over $transport, ${secs} s, both nodes alive, no range moved; node-b said: ${why:-nothing})"
		;;
	stop-a)
		on a writers 30 >/dev/null
		on b writers 30 >/dev/null
		sleep 2
		on a 'kill -STOP $(daemon_pid)' >/dev/null
		t_stop=$SECONDS
		until_on 90 "node-b takes node-a's range over" b 'ok "$owns_all"'
		took=$((SECONDS - t_stop))
		sleep 1
		on a 'kill -CONT $(daemon_pid)' >/dev/null
		sleep 2
		on a 'ok "$serves_nothing"' >/dev/null ||
			fail "cycle $n: node-a serves again after SIGCONT: $(on a 'q "e[\"ranges\"]"')"
		on a wait_writers >/dev/null || fail "cycle $n: node-a's writer"
		on b wait_writers >/dev/null || fail "cycle $n: node-b's writer"
		verify "cycle $n (SIGSTOP of node-a over $transport until node-b took over, ${took} s; after SIGCONT node-a serves nothing)" a
		on a restart_daemon >/dev/null || fail "cycle $n: restarting node-a"
		both_mirroring
		on b giveback >/dev/null || fail "cycle $n: giveback to node-a"
		until_on 60 "node-a serves its range again" a 'ok "$home"'
		until_on 30 "node-b sees the ranges home" b 'ok "$home"'
		;;
	*) fail "unknown cycle kind $kind" ;;
	esac
done

mark finish
collect_exits 300 a b
say "VM a exit ${rc[0]}, VM b exit ${rc[1]}; relay: $(tr '\n' ';' <"$OUT/relay.log")"
if [[ ${rc[0]} == 0 && ${rc[1]} == 0 ]]; then
	rm -f "$OUT"/pmem-*.img "$OUT"/shared.img
	say "PASS: $n partition cycles over $transport across two VMs, every acknowledged write read back through both nodes and from the medium ($((SECONDS - t0))s)"
	exit 0
fi
if [[ ${rc[0]} =~ ^(0|77)$ && ${rc[1]} =~ ^(0|77)$ ]]; then
	skip "a VM could not run its part (see node-*.log)"
fi
fail "VM a exit ${rc[0]}, VM b exit ${rc[1]} (see node-a.log, node-b.log, daemon-*.log)"
