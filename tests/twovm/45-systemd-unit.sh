#!/bin/bash
# tests/twovm/45-systemd-unit.sh - the systemd unit under a real systemd (issue #19 item 4).
# Runs ON THE HOST (a host-driven VM test; contract at the top of scripts/test.sh), booting
# ONE VM whose PID 1 is systemd: guest-init.sh sets the system up, then hands PID 1 to
# systemd (scripts/vm/guest-systemd.sh, kernel argument nvm_systemd=1), which runs the
# guest command tests/twovm/guest/systemd-unit-node.sh as a service with journald and udev
# up.  That command installs the shipped systemd/nvmirrord@.service (binary path rewritten
# to this build's) and checks: `systemctl start` returns only after READY=1 with the device
# live and STATUS= set; the watchdog is petted; kill -9 of the daemon is followed by the
# automatic restart, which re-attaches the same /dev/ublkb0 (ublk user recovery) while a
# process holds it open, and the data written before reads back; the runtime directory is
# kept across the restart and removed at the stop; journald keeps the priorities; the stop
# is clean; a bad config fails with exit status 2 and is not restarted.
# twovm-timeout: 300
# Exit: 0 PASS, 77 SKIP (cannot run here), else FAIL.
set -euo pipefail
: "${NVM_REPO:?}" "${NVM_OUT:?}"
NVM_BIN=${NVM_BIN:-$NVM_REPO/target/release}
# shellcheck source=scripts/vm/lib.sh
source "$NVM_REPO/scripts/vm/lib.sh"
say() { printf '[%s host] %s\n' "$(date +%T)" "$*"; }
[[ -x /lib/systemd/systemd ]] || { say "SKIPPED: no /lib/systemd/systemd on the host (the VM runs the host's userspace)"; exit 77; }
for b in nvmirrord nvmirrorctl; do
	[[ -x $NVM_BIN/$b ]] || { say "FAIL: $NVM_BIN/$b missing (cargo build --release)"; exit 1; }
done
nvm_vm_prepare
nvm_vm_detect_accel
export NVM_VM_QUIET=1
OUT=$(cd "$NVM_OUT" && pwd)
rm -f "$OUT"/guest-rc-*
say "booting one VM with systemd as PID 1 (accel $NVM_VM_ACCEL_NAME)"
rc=0
# Two vCPUs: the host has two cores and this test boots one VM.
nvm_vm_boot --results "$OUT" --name sd --cpus 2 --mem 1024 --timeout 240 --no-nvdimm \
	--append nvm_systemd=1 \
	--env "NVM_BIN=$NVM_BIN" --env "NVM_REPO=$NVM_REPO" --env "NVM_OUT=$OUT" \
	-- /bin/bash "$NVM_REPO/tests/twovm/guest/systemd-unit-node.sh" >"$OUT/vm-sd.out" 2>&1 || rc=$?
grep -h '^\[' "$OUT/node.log" 2>/dev/null | sed 's/^/  /' || true
guest=$(cat "$OUT/guest-rc-sd" 2>/dev/null || echo none)
case $guest in
0) say "PASS: the unit under systemd as PID 1"; exit 0 ;;
77) say "SKIPPED: the guest could not run its part (see node.log)"; exit 77 ;;
none) say "FAIL: the guest command never finished (nvm_vm_boot status $rc; see console-sd.log)"; tail -n 30 "$OUT/console-sd.log" 2>/dev/null; exit 1 ;;
*) say "FAIL: guest exit $guest (see node.log, console-sd.log)"; exit 1 ;;
esac
