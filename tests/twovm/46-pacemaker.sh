#!/bin/bash
# tests/twovm/46-pacemaker.sh - a real Pacemaker cluster with fencing (issue #19 item 1).
# Runs ON THE HOST (a two-VM test; contract at the top of scripts/test.sh).
# twovm-timeout: 1200
#
# Two VMs with systemd as PID 1 (nvm_systemd=1), one shared disk (the medium), a virtio-net
# link.  Each runs corosync (knet over the link, crypto off) and Pacemaker from Debian's
# packages, started by systemd (tests/twovm/guest/pacemaker-node.sh).  The CIB: fencing by
# fence_nvmvm (tests/twovm/guest/fence_nvmvm: it asks this script to kill the fenced node's
# QEMU and succeeds once it is dead), a promotable clone of ocf:nvmirror:nvmirror for node-a's
# ranges (active/passive: the config gives node-a every range; takeover = "manual", the
# cluster decides), and an ocf:heartbeat:Filesystem (ext4 on /dev/ublkb0) colocated with the
# promoted role and ordered after the promotion.  node-a is promoted, Pacemaker mounts the
# filesystem there, a metadata-heavy load (tests/vm/lib/fs_churn.py) runs on it with its
# journal of fsync'ed changes on the results dir.  With NVM_SOAK=1 or NVM_PC_RESTART=1
# (about a minute under TCG, out of the CI hour; test 50 checks the agent's restart in place
# with writes in flight) a resource failure: node-a kills its nvmirrord under the mounted
# filesystem with the load running; the agent's next promoted monitor restarts it in place
# (ublk user recovery: the device, the mount and the load survive, nothing moves; the
# restart is counted in a node attribute).  Then this script
# SIGKILLs node-a's QEMU (a power cut).  Pacemaker on node-b loses node-a, fences it
# (fence_nvmvm -> this script, which confirms: the VM is dead), promotes nvmirror on node-b
# (the agent's takeover: new epoch, replay of node-a's mirrored writes) and mounts the
# filesystem there; every fsync'ed change is there.  Before that (with NVM_SOAK=1 or
# NVM_PC_SWITCHOVER=1: about 4.5 minutes under TCG, too long for the CI hour; test 50 takes
# the agent through the same notify, demote and promote calls): a planned switchover: a load stops,
# `crm_resource --move` of the promoted role to node-b (unmount, demote = handover, promote,
# mount there; node-b checks the files), then `crm_resource --clear` and the promotion
# scores bring it home (demote = giveback on node-b, promote and mount on node-a, checked
# again).  crm_mon output before and after is in the log.
# Exit: 0 PASS, 77 SKIP (cannot run here), else FAIL.
set -euo pipefail
: "${NVM_REPO:?}" "${NVM_OUT:?}"
NVM_BIN=${NVM_BIN:-$NVM_REPO/target/release}
# shellcheck source=scripts/vm/lib.sh
source "$NVM_REPO/scripts/vm/lib.sh"
export NVM_PC_TRANSPORT=tcp
node_script=$NVM_REPO/tests/twovm/guest/pacemaker-node.sh
# net.ifnames=0: udev (running under systemd) would rename eth0 (the guest finds the link by
# its MAC address in any case: the CI machine's udev named it ens5 even so).
switchover=${NVM_PC_SWITCHOVER:-${NVM_SOAK:-0}}
restart=${NVM_PC_RESTART:-${NVM_SOAK:-0}}
pc_boot_env="--append nvm_systemd=1 --append net.ifnames=0 --env NVM_REPO=$NVM_REPO --env NVM_SOAK=${NVM_SOAK:-0} --env NVM_PC_SWITCHOVER=$switchover --env NVM_PC_RESTART=$restart"
# shellcheck source=tests/twovm/lib/power-cut-host.sh
source "$NVM_REPO/tests/twovm/lib/power-cut-host.sh"
# corosync and pacemaker run in the VMs from the host's userspace: installed here for this
# test only, with their services kept from starting on the host (policy-rc.d).
if ! command -v corosync >/dev/null || ! command -v pacemakerd >/dev/null; then
	policy_made=0
	if [[ ! -e /usr/sbin/policy-rc.d ]]; then
		printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && policy_made=1
	fi
	nvm_ensure_apt_packages corosync pacemaker || true
	((policy_made)) && rm -f /usr/sbin/policy-rc.d
fi
for t in corosync pacemakerd; do
	command -v $t >/dev/null || skip "$t is not installed on the host (scripts/test.sh installs corosync and pacemaker)"
done
[[ -x /lib/systemd/systemd ]] || skip "no /lib/systemd/systemd on the host"
pc_setup

# Every fence-node-X request: kill that VM (if it still runs), then confirm with fenced-node-X.
honour_fence_requests() {
	local f n p
	for f in "$SYNC"/fence-node-?; do
		[[ -e $f ]] || continue
		n=${f##*-}
		[[ -e $SYNC/fenced-node-$n ]] && continue
		if p=$(qemu_pid "$n"); then
			say "FENCE: Pacemaker fences node-$n: SIGKILL to its QEMU (pid $p)"
			kill -KILL "$p"
			for _ in $(seq 100); do qemu_pid "$n" >/dev/null || break; sleep 0.2; done
		else
			say "FENCE: Pacemaker fences node-$n: its VM is already dead"
		fi
		mark "fenced-node-$n"
		[[ $n == b ]] && fail "Pacemaker fenced node-b, the survivor"
	done
	return 0
}
pc_await_hook() { honour_fence_requests; }

say "results in $OUT; two VMs with systemd as PID 1, corosync and Pacemaker; accel $NVM_VM_ACCEL_NAME"
boot_pair 1100 900
await a-up 360 a b
await b-up 360 a b
say "Pacemaker runs on both nodes; node-a configures fencing, the nvmirror clone and the filesystem"
await a-fs 360 a b
sed 's/^/  /' "$OUT/crm_mon-before.txt"
if [[ $switchover == 1 ]]; then
	say "switchover to node-b and failback (crm_resource --move, --clear)"
	await moved-b 420 a b
	grep -h 'switchover' "$OUT/node-a.log" | tail -n 1 | sed 's/^/  /'
	await failed-back 480 a b
	grep -h 'ok: switchover' "$OUT/node-b.log" | sed 's/^/  /'
	grep -h 'ok: failback' "$OUT/node-a.log" | sed 's/^/  /'
else
	say "no switchover and failback (NVM_SOAK=1 or NVM_PC_SWITCHOVER=1 runs them)"
fi
if [[ $restart == 1 ]]; then
	say "node-a kills its nvmirrord under the filesystem and the load: the agent's monitor must restart it in place"
else
	say "no restart in place (NVM_SOAK=1 or NVM_PC_RESTART=1 runs it)"
fi
await kill-a 180 a b
if [[ $restart == 1 ]]; then
	grep -h 'ok: the agent' "$OUT/node-a.log" | sed 's/^/  /'
	sed -n '/Node Attributes/,/Migration Summary/p' "$OUT/crm_mon-restarted.txt" | sed 's/^/  /'
fi
power_cut a
mark a-killed "$t_kill"
await b-done 420 b
t_done=$(<"$SYNC/b-done")
say "node-b serves the filesystem $(awk -v a="$t_kill" -v b="$t_done" 'BEGIN { printf "%.0f", b - a }') s after the power cut (detection, fencing, promotion with takeover, mount)"
sed 's/^/  /' "$OUT/crm_mon-after.txt"
r=0
wait "${vm_pid[b]}" || r=$?
unset "vm_pid[b]"
grep -h 'ok: \|fencing: ' "$OUT/node-b.log" | sed 's/^/  /'
[[ -e $SYNC/fenced-node-a ]] || fail "node-b serves, but nobody asked to fence node-a"
if [[ $r == 0 ]]; then
	rm -f "$OUT"/pmem-*.img "$OUT"/shared.img
	restarted=''
	[[ $restart != 1 ]] || restarted='the agent restarted a killed nvmirrord in place under the mounted filesystem; '
	say "PASS: ${restarted}Pacemaker fenced node-a after its power cut, promoted nvmirror on node-b and mounted the filesystem there; every fsync'ed change present ($((SECONDS - t0))s)"
	exit 0
fi
[[ $r == 77 ]] && skip "node-b could not run its part (see node-b.log)"
fail "VM b exit $r (see node-b.log, crm_mon-b-fail.txt, journal-b.log)"
