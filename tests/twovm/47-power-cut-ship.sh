#!/bin/bash
# tests/twovm/47-power-cut-ship.sh - log shipping (claim set C, issue #18): a power cut of a
# source VM, then `nvmirrorctl export` on the destination VM.
# Runs ON THE HOST (a two-VM test; contract at the top of scripts/test.sh).
# twovm-timeout: 600
# soak-only: runs with NVM_SOAK=1 or when named (about 3.5 minutes under TCG: the CI hour has
# no room for it; 32-log-shipping exports after a kill -9 in CI)
#
# VM a is a log-shipping source (its NVRAM an emulated NVDIMM as device-DAX, its own disk
# the medium), VM b its destination (NVRAM likewise; its own disk holds the log files and
# the image), linked by a virtio-net link carrying the shipping link (Soft-RoCE; TCP with
# NVM_PC_TRANSPORT=tcp).  fio writes with verify through a's /dev/ublkb0 (fio's server on
# a, its client and the verify state on b) while a second writer keeps writing; fio's
# trigger has the host SIGKILL a's QEMU: no daemon shutdown, no guest kernel, writes in
# flight.  b sees the link go down, `nvmirrorctl export --source src1` puts what its NVRAM
# holds of src1 into the log files and applies them to the image, a single node started
# from the `serve.toml` export wrote serves the image as a /dev/ublkbN on b, `fio
# --verify_only` passes through it (every write a acknowledged is there), and new writes
# to it read back.  Then the volume goes back: the image's node stops (drained),
# `nvmirrorctl return-image --source src1`, and a boots again with the same NVDIMM and
# disk: its daemon replays its NVRAM, hears that its volume is being given back, drains,
# copies the blocks that differ from the image, and serves: fio verifies through a's
# device, the image's new writes read back, and new writes drain through the
# destination.  The guests' part is tests/twovm/guest/ship-power-cut-node.sh.
# Knobs: NVM_PC_TRANSPORT (rdma | tcp), NVM_PC_FIO_RATE (3m), NVM_PC_FIO_TRIGGER (15).
# Exit: 0 PASS, 77 SKIP (cannot run here), else FAIL.  Logs in $NVM_OUT.
set -euo pipefail
: "${NVM_REPO:?}" "${NVM_OUT:?}"
NVM_BIN=${NVM_BIN:-$NVM_REPO/target/release}
# shellcheck source=scripts/vm/lib.sh
source "$NVM_REPO/scripts/vm/lib.sh"
# Each VM its own disk (the "own" layout of the power-cut helpers; /dev/vdb goes unused).
export NVM_PC_STORAGE=own NVM_PC_FIO_TRIGGER=${NVM_PC_FIO_TRIGGER:-15}
node_script=$NVM_REPO/tests/twovm/guest/ship-power-cut-node.sh
# shellcheck source=tests/twovm/lib/power-cut-host.sh
source "$NVM_REPO/tests/twovm/lib/power-cut-host.sh"
pc_setup
# b's disk holds the log files, the 128 MiB image and the image node's NVRAM.
truncate -s 512M "$OUT/medium-b.img"

say "results in $OUT; shipping link over $transport; accel $NVM_VM_ACCEL_NAME"
boot_pair 480 300
await b-up 240 a b
await a-up 240 a b
say "the source ships to the destination; fio starts (trigger after ${NVM_PC_FIO_TRIGGER}s)"
await kill-a 200 a b
power_cut a
grep -h 'still alive' "$OUT/node-a.log" | tail -n 1 | sed 's/^/  the source before the cut: /'
await b-returned 300 b
say "the destination exported the source's volume, verified it, wrote to it and gave it back; rebooting the source (same NVDIMM, same disk)"
boot a2 a2 300 connect
await a2-done 300 a2 b
await b-done 120 b
collect_exits 600 a2 b
say "VM a2 exit ${rc[0]}, VM b exit ${rc[1]}"
if [[ ${rc[0]} == 0 && ${rc[1]} == 0 ]]; then
	rm -f "$OUT"/pmem-*.img "$OUT"/medium-?.img "$OUT"/arbiter.img
	say "PASS: power cut of the source mid-write; the destination's export verified through its served image; the rebooted source took its volume back and verifies ($((SECONDS - t0))s)"
	exit 0
fi
if [[ ${rc[0]} =~ ^(0|77)$ && ${rc[1]} =~ ^(0|77)$ ]]; then
	skip "a VM could not run its part (see node-*.log)"
fi
fail "VM a2 exit ${rc[0]}, VM b exit ${rc[1]} (see node-a2.log, node-b.log, daemon-*.log)"
