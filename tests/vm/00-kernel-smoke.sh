#!/bin/bash
# VM test: the real kernel provides everything nvmirror builds on.
# Runs inside the test VM (contract: scripts/vm/run-tests-in-guest.sh).
# No skips here on purpose: if the kernel cannot give us ublk, soft-RoCE,
# pmem, loop or drbd, the environment is broken and that is a failure.
# vm-timeout: 240
set -euo pipefail

failures=0
ok() { echo "ok:   $*"; }
bad() {
	echo "FAIL: $*"
	failures=$((failures + 1))
}

rxe_added=0 dummy_added=0 loopdev=''
cleanup() {
	set +e
	pkill -P $$ ib_write_lat 2>/dev/null
	mountpoint -q "$NVM_SCRATCH/mnt" 2>/dev/null && umount "$NVM_SCRATCH/mnt"
	[[ -n $loopdev ]] && losetup -d "$loopdev"
	((rxe_added)) && rdma link delete rxe0
	((dummy_added)) && ip link delete d0
	return 0
}
trap cleanup EXIT

echo "kernel: $(uname -r)"

# --- ublk: the block device transport ---------------------------------------
if modprobe ublk_drv && [[ -c /dev/ublk-control ]]; then
	ok "modprobe ublk_drv -> /dev/ublk-control"
else
	bad "modprobe ublk_drv did not give /dev/ublk-control"
	exit 1 # real-kernel test: no ublk means nothing else matters
fi

# --- soft-RoCE on a dummy netdev (no namespaces: rxe in netns hangs) -------
# 192.0.2.0/24 is the RFC 5737 documentation range; d0 is a dummy device
# inside the VM, so nothing leaves the guest.
addr=192.0.2.1
if modprobe rdma_rxe && modprobe dummy &&
	ip link add d0 type dummy && dummy_added=1 &&
	ip addr add "$addr/24" dev d0 && ip link set d0 up &&
	rdma link add rxe0 type rxe netdev d0 && rxe_added=1; then
	ok "rdma_rxe link rxe0 on dummy d0 ($addr)"
else
	bad "could not create rxe0 on a dummy netdev"
fi
if ((rxe_added)); then
	for _ in $(seq 50); do rdma link show rxe0/1 2>/dev/null | grep -q ACTIVE && break; sleep 0.1; done
	rdma link show
	if rdma link show rxe0/1 | grep -q 'state ACTIVE' && ibv_devices | grep -qw rxe0; then
		ok "rxe0 is ACTIVE and listed by ibv_devices"
	else
		bad "rxe0 not ACTIVE or not in ibv_devices"
		ibv_devices || true
	fi
	# RoCEv2 GID for the IPv4 address (GID index 1 on a fresh rxe device).
	gid_idx=$(ibv_devinfo -v -d rxe0 2>/dev/null | awk -v a="$addr" '
		/GID\[/ && index($0, a) { gsub(/.*GID\[ */, ""); gsub(/\].*/, ""); print; exit }')
	gid_idx=${gid_idx:-1}
	echo "using GID index $gid_idx"
	port=18515
	timeout 60 ib_write_lat -d rxe0 -x "$gid_idx" -s 4096 -n 200 -p "$port" >server.log 2>&1 &
	server=$!
	sleep 1
	client_rc=0
	timeout 60 ib_write_lat -d rxe0 -x "$gid_idx" -s 4096 -n 200 -p "$port" "$addr" >client.log 2>&1 || client_rc=$?
	server_rc=0
	wait "$server" || server_rc=$?
	cat client.log
	if ((client_rc == 0 && server_rc == 0)) && grep -qE '^ *4096 +200 ' client.log; then
		ok "ib_write_lat 4096 B x 200 over rxe0 (client $client_rc, server $server_rc)"
	else
		bad "ib_write_lat failed (client rc $client_rc, server rc $server_rc)"
		echo "--- server log"
		cat server.log
	fi
fi

# --- emulated NVDIMM -> /dev/pmem0 ----------------------------------------
modprobe nfit || true
modprobe nd_pmem || true
for _ in $(seq 50); do [[ -b /dev/pmem0 ]] && break; sleep 0.1; done
if [[ -b /dev/pmem0 ]]; then
	head -c 65536 /dev/urandom >pattern
	if dd if=pattern of=/dev/pmem0 bs=4096 oflag=direct conv=fsync status=none &&
		dd if=/dev/pmem0 of=readback bs=4096 count=16 iflag=direct status=none &&
		cmp pattern readback; then
		ok "/dev/pmem0 ($(blockdev --getsize64 /dev/pmem0) bytes): 64 KiB written and read back"
	else
		bad "/dev/pmem0 write/read-back mismatch"
	fi
else
	bad "modprobe nfit nd_pmem gave no /dev/pmem0 (is an NVDIMM attached?)"
fi

# --- loop device ------------------------------------------------------------
truncate -s 64M loop.img
if loopdev=$(losetup -f --show loop.img) && mkfs.ext4 -q -F "$loopdev" &&
	mkdir -p mnt && mount "$loopdev" mnt && echo hello >mnt/f && sync &&
	umount mnt && mount -o ro "$loopdev" mnt && [[ $(cat mnt/f) == hello ]] && umount mnt; then
	ok "loop device $loopdev with ext4 works"
else
	bad "loop device / ext4 on it failed"
fi

# --- drbd ---------------------------------------------------------------------
if modprobe drbd && [[ -e /proc/drbd ]]; then
	ok "modprobe drbd ($(head -n1 /proc/drbd))"
else
	bad "modprobe drbd failed"
fi

if ((failures)); then
	echo "$failures check(s) failed"
	exit 1
fi
echo "all kernel smoke checks passed"
