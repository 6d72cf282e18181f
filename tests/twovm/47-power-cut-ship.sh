#!/bin/bash
# tests/twovm/47-power-cut-ship.sh - log shipping (claim set C, issue #18): a power cut of a
# source VM, then `nvmirrorctl export` on the destination VM.
# Runs ON THE HOST (a two-VM test; contract at the top of scripts/test.sh).
# twovm-timeout: 600
# soak-only: runs with NVM_SOAK=1 or when named (under 2 minutes under TCG, but the CI hour has
# no room for it; 32-log-shipping and 33-log-shipping-rdma export after a kill -9 in CI)
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
# to it read back.  The guests' part is tests/twovm/guest/ship-power-cut-node.sh.
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
await b-done 300 b
for _ in $(seq 300); do vm_running b || break; sleep 0.2; done
r=0
wait "${vm_pid[b]}" || r=$?
unset "vm_pid[b]"
case $r in
0)
	rm -f "$OUT"/pmem-*.img "$OUT"/medium-?.img "$OUT"/arbiter.img
	say "PASS: power cut of the source mid-write; the destination's export verifies through its served image ($((SECONDS - t0))s)"
	;;
77) skip "VM b could not run its part (see node-b.log)" ;;
*) fail "VM b exit $r (see node-b.log, daemon-b*.log)" ;;
esac
