#!/bin/bash
# ext4 and xfs on /dev/ublkb0: write files, umount, fsck clean, remount, checksums match,
# also after a graceful daemon restart (the NVRAM is the emulated NVDIMM when present).
# vm-timeout: 300
source "$NVM_REPO/tests/vm/lib/nvm.sh"
nvm_init

medium=$(nvm_medium medium 400)
nvram=${NVM_PMEM:-$PWD/nvram.img}
say "NVRAM: $nvram"
nvm_config node.toml node-a "$nvram" 48 "$medium" 0
nvm_start node.toml daemon.log
pid=$NVM_LAST_PID

for fs in ext4 xfs; do
	say "--- $fs"
	if [[ $fs == ext4 ]]; then mkfs.ext4 -q -F /dev/ublkb0; else mkfs.xfs -q -f /dev/ublkb0; fi
	mkdir -p mnt
	mount /dev/ublkb0 mnt
	mkdir -p mnt/dir
	for i in $(seq 1 20); do head -c $((i * 37 * 1024 + 123)) /dev/urandom >"mnt/dir/file$i"; done
	dd if=/dev/urandom of=mnt/big bs=1M count=24 status=none
	(cd mnt && find . -type f -exec sha256sum {} + | sort -k2) >sums.expected
	umount mnt
	if [[ $fs == ext4 ]]; then fsck.ext4 -fn /dev/ublkb0 >fsck.log 2>&1 || { cat fsck.log; fail "fsck.ext4 found problems"; }
	else xfs_repair -n /dev/ublkb0 >fsck.log 2>&1 || { cat fsck.log; fail "xfs_repair -n found problems"; }; fi
	say "$fs: fsck clean"
	mount /dev/ublkb0 mnt
	(cd mnt && find . -type f -exec sha256sum {} + | sort -k2) >sums.got
	umount mnt
	diff -u sums.expected sums.got || fail "$fs: checksums differ after remount"
	say "$fs: checksums match after remount"
done

say "graceful restart of the daemon, then check the xfs files again"
nvm_stop "$pid"
[[ ! -e /sys/class/ublk-char/ublkc0 ]] || fail "device still present after a graceful stop"
nvm_start node.toml daemon.log
mount /dev/ublkb0 mnt
(cd mnt && find . -type f -exec sha256sum {} + | sort -k2) >sums.got
umount mnt
diff -u sums.expected sums.got || fail "checksums differ after daemon restart"
"$NVMCTL" --config node.toml status
say "PASS"
