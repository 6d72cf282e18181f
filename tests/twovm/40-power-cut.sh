#!/bin/bash
# tests/twovm/40-power-cut.sh - two VMs, a real power cut of the owner.
# Runs ON THE HOST (a two-VM test; contract at the top of scripts/test.sh).
# twovm-timeout: 600
#
# What it shows: node-a and node-b are two VMs, each with its own emulated
# NVDIMM as NVRAM (a host file behind memory-backend-file,share=on, so what the
# guest stored survives QEMU's death; the guest uses it as device-DAX
# /dev/dax0.0, the NVRAM an RDMA device can register), one shared raw disk image
# attached to both (/dev/vda, cache=none, the medium) and a virtio-net link
# between them (QEMU socket netdev, 10.77.0.1 and 10.77.0.2) carrying the mirror
# link: Soft-RoCE (rxe) by default, TCP with NVM_PC_TRANSPORT=tcp.  The LUN has two
# ranges: range 0 is node-a's, range 1 node-b's.  node-a's flusher is paused, so
# every write node-a acknowledges lives only in the two NVRAMs.  fio writes with
# verify=crc32c through node-a's /dev/ublkb0 into both ranges (range 1 by
# forwarding); a second fio on node-a keeps writing when the power goes.  fio's
# trigger fires, the host SIGKILLs node-a's QEMU: no daemon shutdown, no guest
# kernel, writes in flight.  node-b notices (heartbeat timeout, takeover = auto),
# claims range 0 with a new epoch, replays node-a's mirrored writes, serves the
# whole LUN; `fio --verify_only --verify_state_load` passes through node-b's
# /dev/ublkb1.  node-b then writes [0,16M) anew (over stale records node-a still
# holds).  node-a boots again with the same NVDIMM and disk: its daemon replays
# nothing of the range it lost (and says it skipped it), rejoins, mirroring
# restarts (node-b's status: "mirroring" over rdma), `nvmirrorctl giveback` on
# node-b returns range 0, fio verifies node-b's new writes through node-a's
# device, and the whole LUN reads the same through both nodes' devices as it
# read through node-b before node-a came back (when node-b had verified the
# power-cut writes).
#
# Design:
#   * Where fio's verify state lives: fio --server runs on node-a, the fio
#     client on node-b (it reaches node-a over the 10.77.0.x link).  With
#     --trigger-timeout the client asks the server for its verify state, stores
#     it on node-b, then runs its local --trigger, which creates sync/kill-a.
#     (fio's server stops its jobs right after sending the state, hence the
#     second, unverified writer on node-a that is still running at the cut.)
#   * Coordination: files in $NVM_OUT/sync on the results dir, which both VMs
#     mount read-write over 9p (cache=none) and the host sees; each is created
#     atomically (tmp + rename); every wait, in the guests and here, is bounded,
#     and a file `abort` written by anyone makes the others stop at once.  The
#     protocol is listed in tests/twovm/guest/power-cut-node.sh.
#   * The power cut: nvm_vm_boot runs QEMU in the foreground under `timeout`,
#     so each VM is booted in a background subshell here and QEMU writes its pid
#     with `--qemu-arg -pidfile --qemu-arg FILE`; on sync/kill-a the host checks
#     that the pid is that QEMU (its command line names the pid file) and sends
#     SIGKILL.  The takeover time is measured on the host clock: from the kill to
#     node-b's sync/b-serving (all ranges local, takeover phase "done"; node-b
#     polls every 0.2 s).
#   * The link: node-b's QEMU listens and node-a's connects, because a listening
#     socket netdev accepts a new connection after its peer died (the rebooted
#     node-a reconnects) while a connecting one never reconnects.
#   * Guest commands: `power-cut-node.sh b`, `... a` (first boot, killed),
#     `... a2` (the reboot).  Each VM has 1 vCPU (two TCG VMs on 2 cores).
#   * The host-side helpers (boot, await, power_cut, cleanup) are shared with
#     41-power-cut-both.sh: tests/twovm/lib/power-cut-host.sh.
# With NVM_PC_STORAGE=own (test 43) each VM has its own medium and both share a small
# arbiter disk (shared-nothing mode): node-b's medium gets node-a's writes from its second
# store, node-a's is marked outdated at the takeover and resynced before the giveback, and
# at the end both guests drain, `nvmirrorctl verify` reports their ranges identical, and the
# host compares the two disk images.
# With NVM_PC_STORAGE=voters (test 49) the same, with no arbiter disk: the table and the
# leases live on three voters (each node's, and a tie-breaker that node-b's VM runs).
# Knobs: NVM_PC_TRANSPORT (rdma | tcp), NVM_PC_STORAGE (shared | own | voters), NVM_PC_FIO_RATE (3m: the verified
# job's write rate), NVM_PC_FIO_TRIGGER (18: seconds of writing before the cut).
# Takes about 3 minutes on 2 cores under TCG, most of it the verifies after the
# giveback (queue depth 1, half of each read forwarded to the other node).
# Exit: 0 PASS, 77 SKIP (cannot run here), else FAIL.  Logs and status JSON in
# $NVM_OUT; the disk images are deleted after a PASS.
set -euo pipefail
: "${NVM_REPO:?}" "${NVM_OUT:?}"
NVM_BIN=${NVM_BIN:-$NVM_REPO/target/release}
# shellcheck source=scripts/vm/lib.sh
source "$NVM_REPO/scripts/vm/lib.sh"

# shellcheck source=tests/twovm/lib/power-cut-host.sh
source "$NVM_REPO/tests/twovm/lib/power-cut-host.sh"
pc_setup

say "results in $OUT; $storage storage; mirror link over $transport; accel $NVM_VM_ACCEL_NAME"
boot_pair 480 300

await a-up 240 a b
await b-up 240 a b
say "both daemons up, mirroring over $transport; fio starts (trigger after ${NVM_PC_FIO_TRIGGER:-18}s)"
await kill-a 200 a b

# ----------------------------------------------------------- power cut ---
power_cut a
mark a-killed "$t_kill"
grep -h 'still alive' "$OUT/node-a.log" | tail -n 1 | sed 's/^/  node-a before the cut: /'

await b-serving 120 b
t_serving=$(<"$SYNC/b-serving")
takeover_s=$(awk -v a="$t_kill" -v b="$t_serving" 'BEGIN { printf "%.1f", b - a }')
say "node-b serves node-a's range ${takeover_s}s after the power cut (host clock; detection + claim + grace + replay)"
python3 - "$OUT/status-b-after-takeover.json" <<-'EOF' || true
	import json, sys
	t = json.load(open(sys.argv[1]))["engine"]["takeover"]
	print(f"  node-b's takeover: {t['records_done']}/{t['records_total']} record(s), "
	      f"{t['bytes_done'] >> 20} MiB replayed, {t['elapsed_ms']} ms from claim to done")
EOF

await restart-a 300 b
say "node-b verified every acknowledged write and wrote anew; rebooting node-a (same NVDIMM, same disk)"
boot a2 a2 300 connect
await a2-up 240 a2 b
say "node-a is back and mirroring"
await b-gaveback 180 a2 b
say "giveback done"

# Both guests finish on their own (bounded by their VM timeouts).
collect_exits 1500 a2 b
say "VM a2 exit ${rc[0]}, VM b exit ${rc[1]}"
if [[ ${rc[0]} == 0 && ${rc[1]} == 0 ]]; then
	if [[ $storage != shared ]]; then
		# Both guests drained their logs onto both media before they finished: the two disk
		# images must hold the same LUN, byte for byte.
		cmp "$OUT/medium-a.img" "$OUT/medium-b.img" ||
			fail "node-a's and node-b's media differ after the resync, the giveback and a drain on both"
		say "both media identical (cmp of the two disk images on the host)"
	fi
	rm -f "$OUT"/pmem-*.img "$OUT"/shared.img "$OUT"/medium-?.img "$OUT"/arbiter.img
	say "PASS ($storage storage): power cut of node-a, takeover by node-b in ${takeover_s}s, verify passed; node-a rejoined, giveback, verify passed on both nodes ($((SECONDS - t0))s)"
	exit 0
fi
if [[ ${rc[0]} =~ ^(0|77)$ && ${rc[1]} =~ ^(0|77)$ ]]; then
	skip "a VM could not run its part (see node-*.log)"
fi
fail "VM a2 exit ${rc[0]}, VM b exit ${rc[1]} (see node-a2.log, node-b.log, daemon-*.log)"
