#!/bin/bash
# scripts/vm/boot.sh [options] [-- CMD [ARGS...]]
#
# Boot one test VM by hand (debugging) or from a future multi-VM test script.
# Prepares the cached kernel/initramfs first.  With no CMD you get an
# interactive root shell on the serial console (exit it to power off).
# Options are those of nvm_vm_boot (scripts/vm/lib.sh); --help lists them.
#
# Examples:
#   scripts/vm/boot.sh                              # interactive shell
#   scripts/vm/boot.sh -- /bin/sh -c 'modprobe ublk_drv && ls -l /dev/ublk-control'
#   # two nodes (each in the background, sharing a disk and a socket link):
#   scripts/vm/boot.sh --name a --results R --net-listen 4321 --disk R/shared.img -- CMD_A &
#   scripts/vm/boot.sh --name b --results R --net-connect 4321 --disk R/shared.img -- CMD_B &
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=scripts/vm/lib.sh
source "$here/lib.sh"

case ${1:-} in -h | --help) nvm_vm_boot_usage; exit 0 ;; esac

args=("$@")
have_results=0
for a in "$@"; do
	[[ $a == -- ]] && break
	[[ $a == --results ]] && have_results=1
done
if ((!have_results)); then
	results=$repo/target/vm-results/boot-$(date +%Y%m%d-%H%M%S)
	args=(--results "$results" "${args[@]}")
fi

nvm_ensure_apt_packages "${NVM_APT_PACKAGES[@]}"
nvm_vm_prepare
rc=0
nvm_vm_boot "${args[@]}" || rc=$?
exit "$rc"
