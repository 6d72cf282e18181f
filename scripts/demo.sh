#!/bin/bash
# scripts/demo.sh — the main job, end to end, on a real kernel.
#
# Builds nvmirror, boots the test VM (Debian's 6.12 kernel under QEMU, with an emulated
# NVDIMM as the NVRAM) and runs scripts/demo-guest.sh in it: a node serves /dev/ublkb0,
# ext4 goes on it, files are written and fsync'ed, the daemon is killed with SIGKILL in the
# middle of more writes, a restarted daemon replays the NVRAM and re-attaches the same
# /dev/ublkb0, and every acknowledged (fsync'ed) file is checked byte for byte.
# Installs what it needs (Debian packages, the test kernel) on a fresh Debian 12 machine.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
# shellcheck source=scripts/vm/lib.sh
source "$repo/scripts/vm/lib.sh"

nvm_ensure_apt_packages "${NVM_APT_PACKAGES[@]}"
if ! command -v cargo >/dev/null && [[ -f $HOME/.cargo/env ]]; then
	# shellcheck source=/dev/null
	source "$HOME/.cargo/env"
fi
nvm_log "building (cargo build --release)"
cargo build --release --workspace
nvm_vm_prepare
results=$repo/target/demo/$(date +%Y%m%d-%H%M%S)
mkdir -p "$results"
nvm_log "booting the VM; the demo's own output follows"
set +e
nvm_vm_boot --results "$results" --name demo --env "NVM_BIN=$repo/target/release" \
	-- "$repo/scripts/demo-guest.sh"
rc=$?
set -e
if ((rc == 0)); then
	echo "demo: OK (console log: $results/console-demo.log)"
else
	echo "demo: FAILED with status $rc (console log: $results/console-demo.log)" >&2
fi
exit $rc
