#!/bin/bash
# tests/twovm/41-power-cut-both.sh - two VMs, both lose their power, one returns.
# Runs ON THE HOST (a two-VM test; contract at the top of scripts/test.sh).
# twovm-timeout: 540
# soak-only: runs with NVM_SOAK=1 or when named (3-3.5 minutes under TCG: on a slow host
# the CI run came within minutes of its 90-minute limit; in CI twovm/40 cuts node-a's power
# and 12-crash-recovery replays a node's own NVRAM)
#
# What it shows (issue 15, "both power-cut, one returns"): the setup of
# 40-power-cut.sh (two VMs, each with an emulated NVDIMM as NVRAM, a host file
# that outlives QEMU; one shared raw disk; a virtio-net link carrying the mirror
# link, Soft-RoCE by default, TCP with NVM_PC_TRANSPORT=tcp).  node-a's flusher
# is paused, so every write node-a acknowledges lives only in the two NVRAMs;
# fio writes with verify=crc32c through node-a's /dev/ublkb0 into both ranges
# (range 1 by forwarding), a second writer on node-a keeps writing.  fio's
# trigger fires on node-b: it copies the verify state to the results dir, and
# the host SIGKILLs BOTH QEMUs (one kill(1)): a power cut of both nodes.  Only
# node-b boots again (same NVDIMM file, same shared disk; node-a's link peer
# never comes).  Its daemon rebuilds its second store from its NVRAM (records
# above the persisted release watermarks), finds node-a's heartbeat on the
# shared medium dead (it stopped at the cut) and the link down, takes range 0
# over (takeover = "auto", a new epoch), replays node-a's mirrored writes and
# serves the whole LUN; `fio --verify_only --verify_state_load` passes through
# node-b's /dev/ublkb1 for every write the verify state vouches for (every
# write fio had acknowledged when the trigger fired).
# Asserted: the takeover replayed records (status engine.takeover.records_done
# > 0, from node-a, range 0 at a new epoch), node-b's daemon log names node-a's
# dead disk heartbeat, the verify passes.  Reported: the time from node-b's
# daemon start to serving node-a's range (guest clock, from the timestamps in
# the daemon's log: the lease settle, node-a's heartbeat watched until dead,
# the claim and the replay, the device up; and as node-b's status poll saw it,
# which lags by a few seconds of TCG).
#
# Design: as 40-power-cut.sh (host helpers shared in
# tests/twovm/lib/power-cut-host.sh; guest side tests/twovm/guest/power-cut-node.sh
# with NVM_PC_CUT=both: roles a, b, then b2).  fio's verify state must survive
# node-b's power cut, so the trigger puts it on the 9p results dir
# ($NVM_OUT/state) before it writes sync/kill-both.  The rebooted node-b gets a
# new link port to listen on (nobody connects).  Each VM has 1 vCPU (TCG).
# Knobs: NVM_PC_TRANSPORT, NVM_PC_FIO_RATE, NVM_PC_FIO_TRIGGER (as in 40).
# Takes about 100 s on 2 cores under TCG (node-b back to serving: ~10 s after
# its daemon starts, 6.5 s of it gaining the disk lease).
# Exit: 0 PASS, 77 SKIP (cannot run here), else FAIL.  Logs and status JSON in
# $NVM_OUT; the disk images are deleted after a PASS.
set -euo pipefail
: "${NVM_REPO:?}" "${NVM_OUT:?}"
NVM_BIN=${NVM_BIN:-$NVM_REPO/target/release}
# shellcheck source=scripts/vm/lib.sh
source "$NVM_REPO/scripts/vm/lib.sh"
# shellcheck source=tests/twovm/lib/power-cut-host.sh
source "$NVM_REPO/tests/twovm/lib/power-cut-host.sh"
pc_boot_env='--env NVM_PC_CUT=both'
pc_setup

say "results in $OUT; $storage storage; mirror link over $transport; accel $NVM_VM_ACCEL_NAME"
boot_pair 300 300
await a-up 240 a b
await b-up 240 a b
say "both daemons up, mirroring over $transport; fio starts (trigger after ${NVM_PC_FIO_TRIGGER:-18}s)"
await kill-both 200 a b
state=$OUT/state/local-powercut-0-verify.state
[[ -s $state ]] || fail "no fio verify state in $state at the trigger"

# ----------------------------------------------------- power cut of both ---
power_cut a b
mark both-killed "$t_kill"
grep -h 'still alive' "$OUT/node-a.log" | tail -n 1 | sed 's/^/  node-a before the cut: /' || true
grep -h 'still alive' "$OUT/node-b.log" | tail -n 1 | sed 's/^/  node-b before the cut: /' || true
say "fio's verify state survived on the host: $(stat -c %s "$state") bytes"

port=$(pc_free_port) || fail "no free TCP port for node-b's link"
boot b2 b2 300 listen
await b2-timeline 240 b2
takeover_s=$(awk -v a="$(<"$SYNC/b2-start")" -v b="$(<"$SYNC/b-serving")" 'BEGIN { printf "%.1f", b - a }')
records=$(python3 - "$OUT/status-b2-after-takeover.json" <<-'PY'
	import json, sys
	t = json.load(open(sys.argv[1]))["engine"]["takeover"]
	print(f"{t['records_done']}/{t['records_total']} record(s), {t['bytes_done'] >> 20} MiB replayed, "
	      f"{t['elapsed_ms']} ms from claim to done")
PY
) || fail "no takeover in status-b2-after-takeover.json"
timeline=$(<"$SYNC/b2-timeline")
serving_s=${timeline%% s *}
say "node-b serves node-a's range ${serving_s}s after its daemon started (its log; ${takeover_s}s as node-b's status poll saw it); $records"
say "  node-b's daemon from its start: $timeline"

# node-b verifies, then finishes on its own (bounded by its VM timeout).
for _ in $(seq 1500); do
	vm_running b2 || break
	[[ -e $SYNC/abort ]] && fail "a VM gave up: $(cat "$SYNC/abort")"
	sleep 0.2
done
rc=0
wait "${vm_pid[b2]}" || rc=$?
unset 'vm_pid[b2]'
say "VM b2 exit $rc"
case $rc in
0)
	[[ -e $SYNC/b2-done ]] || fail "VM b2 exited 0 without b2-done"
	rm -f "$OUT"/pmem-*.img "$OUT"/shared.img "$OUT"/medium-?.img "$OUT"/arbiter.img
	say "PASS ($storage storage): power cut of both nodes, node-b back alone took over node-a's range, serving ${serving_s}s after its daemon started (status poll: ${takeover_s}s; $records), verify passed ($((SECONDS - t0))s)"
	exit 0
	;;
77) skip "VM b2 could not run its part (see node-b2.log)" ;;
*) fail "VM b2 exit $rc (see node-b2.log, daemon-b2.log)" ;;
esac
