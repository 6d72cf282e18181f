#!/bin/bash
# scripts/demo.sh — the main job, end to end, on a real kernel.
#
# Builds nvmirror, boots the test VM (Debian's 6.12 kernel under QEMU) and runs
# scripts/demo-guest.sh in it: two nodes share one medium and mirror into each other's
# NVRAM; ext4 on node-a's device; files written and fsync'ed with the flushers paused;
# node-a's daemon killed with SIGKILL; node-b takes over by itself (heartbeats), replays
# node-a's mirrored writes, and every acknowledged file is checked through node-b's device.
# DEMO_TRANSPORT=rdma runs the mirror link over Soft-RoCE instead of TCP.
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
nvm_vm_boot --results "$results" --name demo --env "NVM_BIN=${CARGO_TARGET_DIR:-$repo/target}/release" --env "DEMO_TRANSPORT=${DEMO_TRANSPORT:-tcp}" \
	-- "$repo/scripts/demo-guest.sh"
rc=$?
set -e
if ((rc == 0)); then
	echo "demo: OK (console log: $results/console-demo.log)"
else
	echo "demo: FAILED with status $rc (console log: $results/console-demo.log)" >&2
fi
exit $rc
