# shellcheck shell=bash
# tests/twovm/guest/lib/guest-node.sh - helpers shared by the two-VM tests' guest scripts
# (sourced by tests/twovm/guest/ship-power-cut-node.sh and partition-node.sh after they set
# role, SYNC and, for guest_link_and_devdax, transport and nvram); not a test itself.
#   say MSG / mark NAME [CONTENT] / fail MSG / skip MSG / await NAME SECONDS
#   guest_link_and_devdax MY_IP [keep]   eth0 up with MY_IP/24 (Soft-RoCE on it with
#                                 transport=rdma), ublk_drv, and the emulated NVDIMM's
#                                 namespace as device-DAX at $nvram (made on a first boot,
#                                 found again with "keep" on a reboot)

say() { printf '[%s %s] %s\n' "$(date +%T.%2N)" "$role" "$*"; }
# mark NAME [CONTENT]: the sync file NAME, created atomically (tmp + rename).
mark() { printf '%s\n' "${2:-$(date +%s.%N)}" >"$SYNC/$1.tmp" && mv -f "$SYNC/$1.tmp" "$SYNC/$1"; }
fail() {
	say "FAIL: $*"
	mark abort "$role: $*" 2>/dev/null || true
	exit 1
}
skip() { say "SKIPPED: $*"; exit 77; }
# await NAME SECONDS: until the sync file NAME exists (or `abort` does).
await() {
	local i
	for ((i = 0; i < $2 * 5; i++)); do
		[[ -e $SYNC/$1 ]] && return 0
		[[ -e $SYNC/abort ]] && fail "gave up waiting for $1: $(cat "$SYNC/abort")"
		sleep 0.2
	done
	fail "timed out after $2 s waiting for $1"
}

guest_link_and_devdax() { # MY_IP [keep]
	local me=$1 keep=${2:-} nic=eth0 i
	[[ -e /sys/class/net/$nic ]] || fail "no $nic: the VM has no link NIC"
	ip link set "$nic" up
	ip addr add "$me/24" dev "$nic"
	if [[ $transport == rdma ]]; then
		modprobe rdma_rxe || skip "modprobe rdma_rxe failed"
		rdma link add nvmrxe0 type rxe netdev "$nic" || fail "rdma link add (rxe over $nic)"
	fi
	modprobe ublk_drv || fail "modprobe ublk_drv"
	modprobe -a dax_pmem device_dax || fail "modprobe dax_pmem device_dax"
	command -v ndctl >/dev/null || skip "ndctl is not installed"
	# A first boot turns the raw namespace into device-DAX (the NVRAM is new then); a
	# reboot ("keep") finds it again with its contents.
	if [[ $keep != keep ]]; then
		ndctl create-namespace --force --reconfig=namespace0.0 --mode=devdax >ndctl.json 2>&1 ||
			fail "ndctl create-namespace --mode=devdax: $(cat ndctl.json)"
	fi
	for ((i = 0; i < 50; i++)); do [[ -c $nvram ]] && break; sleep 0.1; done
	[[ -c $nvram ]] || fail "no $nvram (device-DAX on the emulated NVDIMM)"
}
