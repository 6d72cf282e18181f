#!/bin/busybox sh
# shellcheck shell=sh
# Stage-1 init of the test VM (runs from the busybox initramfs as PID 1).
#
# 1. load the 9p/overlay modules shipped in the initramfs (build-initramfs.sh)
# 2. mount the host root (9p tag "hostroot", exported read-only by QEMU)
# 3. put a tmpfs-backed overlay on top, so the guest can write anywhere
#    (/tmp, /var/lib, /lib/modules, ...) while the host stays untouched and
#    paths (repo, results, cache) are the same as on the host
# 4. switch_root into it and exec stage 2: bash <nvm_init> (guest-init.sh)
#
# Any failure prints NVM-VM-FATAL and powers off, so the host never waits for
# the hard timeout on a broken boot.
set -eu
/bin/busybox --install -s /bin
export PATH=/bin

fatal() {
	echo "NVM-VM-FATAL (initramfs): $*"
	echo o >/proc/sysrq-trigger
	sleep 60
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

while read -r m; do
	insmod "/modules/$m" || fatal "insmod $m failed"
done </modules/order

nvm_init=
# shellcheck disable=SC2013 # the command line is words, not lines
for arg in $(cat /proc/cmdline); do
	case $arg in
	nvm_init=*) nvm_init=${arg#nvm_init=} ;;
	esac
done
[ -n "$nvm_init" ] || fatal "no nvm_init= on the kernel command line"

# cache=loose: the host root does not change while the VM runs (everything is
# built before boot), and caching makes exec/reads much faster under TCG.
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /lower ||
	fatal "cannot mount the host root over 9p"
mount -t tmpfs -o mode=0755 tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot ||
	fatal "cannot mount the overlay root"
[ -x "/newroot$nvm_init" ] || [ -f "/newroot$nvm_init" ] || fatal "$nvm_init not found in the host root"

mount --move /dev /newroot/dev
umount /sys /proc
exec switch_root /newroot /bin/bash "$nvm_init"
