#!/bin/bash
# tests/twovm/44-power-cut-fs.sh - filesystems across a real power cut of their node (issue
# #19 item 2).  Runs ON THE HOST (a two-VM test; contract at the top of scripts/test.sh).
# twovm-timeout: 480
# soak-only: runs with NVM_SOAK=1 or when named (about 3 minutes under TCG: the CI hour has
# no room for it; in CI 42-fs-churn-kill takes the three filesystems through a kill -9 and
# 46-pacemaker cuts the power under ext4)
#
# The two VMs of 40-power-cut.sh (each its NVDIMM as NVRAM, one shared disk as the medium, a
# virtio-net link carrying the mirror link: Soft-RoCE, TCP with NVM_PC_TRANSPORT=tcp) with a
# 640 MiB LUN.  node-a cuts its /dev/ublkb0 into three dm-linear slices holding ext4, xfs
# and btrfs (tests/vm/lib/fs-churn.sh: ext4 in node-a's range, btrfs in node-b's, reached by
# forwarding, xfs across both) and runs a metadata-heavy load on each (many small files
# created, overwritten, truncated, renamed, unlinked, directories made, each step fsync'ed;
# what fsync made durable is journalled on the results dir, which outlives the VM).  Halfway
# node-a's flusher pauses, so its last acknowledged writes live only in the two NVRAMs; then
# it writes sync/kill-a and the host SIGKILLs its QEMU with the loads running: no daemon
# shutdown, no guest kernel, the page cache and every write in flight gone.  node-b takes
# range 0 over (new epoch, replay of node-a's mirrored writes), mounts the three slices
# through its /dev/ublkb1 (journals and logs replay), every fsync'ed file has the content
# fsync acknowledged and every fsync'ed unlink or rename left the old name absent, and
# fsck.ext4 -fn, xfs_repair -n and btrfs check find nothing wrong.  The kill -9 version is
# tests/vm/42-fs-churn-kill.sh.
# Guest side: tests/twovm/guest/power-cut-node.sh with NVM_PC_LOAD=fs (roles a and b).
# Knobs: NVM_PC_TRANSPORT (rdma | tcp), NVM_PC_CHURN_SECONDS (10: seconds of load before
# the flusher pauses, and again before the cut).
# Exit: 0 PASS, 77 SKIP (cannot run here), else FAIL.  Logs, journals and status JSON in
# $NVM_OUT; the disk images are deleted after a PASS.
set -euo pipefail
: "${NVM_REPO:?}" "${NVM_OUT:?}"
NVM_BIN=${NVM_BIN:-$NVM_REPO/target/release}
# shellcheck source=scripts/vm/lib.sh
source "$NVM_REPO/scripts/vm/lib.sh"
export NVM_PC_LOAD=fs
# shellcheck source=tests/twovm/lib/power-cut-host.sh
source "$NVM_REPO/tests/twovm/lib/power-cut-host.sh"
pc_setup

say "results in $OUT; shared storage, a $lun_mib MiB LUN; mirror link over $transport; accel $NVM_VM_ACCEL_NAME"
boot_pair 420 300
await a-up 240 a b
await b-up 240 a b
say "both daemons up, mirroring over $transport; node-a makes ext4, xfs and btrfs and churns"
await kill-a 240 a b

power_cut a
mark a-killed "$t_kill"
grep -h 'durable operations' "$OUT/node-a.log" | tail -n 1 | sed 's/^/  node-a before the cut: /'
await b-serving 120 b
takeover_s=$(awk -v a="$t_kill" -v b="$(<"$SYNC/b-serving")" 'BEGIN { printf "%.1f", b - a }')
say "node-b serves node-a's range ${takeover_s}s after the power cut; it mounts and checks the filesystems"

await b-done 300 b
r=0
wait "${vm_pid[b]}" || r=$?
unset "vm_pid[b]"
grep -h 'ok: ' "$OUT/node-b.log" | sed 's/^/  /'
if [[ $r == 0 ]]; then
	rm -f "$OUT"/pmem-*.img "$OUT"/shared.img
	say "PASS: power cut of node-a under three churning filesystems; node-b took over in ${takeover_s}s; every fsync'ed change there, every checker clean ($((SECONDS - t0))s)"
	exit 0
fi
[[ $r == 77 ]] && skip "node-b could not run its part (see node-b.log)"
fail "VM b exit $r (see node-b.log, daemon-b.log)"
