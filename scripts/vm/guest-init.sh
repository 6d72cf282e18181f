#!/bin/bash
# Stage-2 init of the test VM: PID 1 after switch_root, running from the host
# root (read-only 9p + tmpfs overlay).  Sets up a minimal system, runs the
# command from the VM config (written by lib.sh's nvm_vm_boot), stores its
# exit status in $NVM_RESULTS/guest-rc-$NVM_VM_NAME, and powers off.
#
# Guest environment provided to the command:
#   - proc, sysfs, devtmpfs, devpts, /dev/shm, configfs, debugfs mounted
#   - the whole root is writable (RAM overlay); /tmp, /run, /var/tmp get fresh
#     tmpfs unless the repo/results/cache live there
#   - /lib/modules/$KVER = the cached Debian kernel's modules, so plain
#     `modprobe X` works (there is no udev: load device modules yourself)
#   - $NVM_RESULTS (same path as on the host) is a writable 9p export
#   - lo is up; hostname nvm-<name>
#   - modules requested by the host (nfit nd_pmem for NVDIMMs, virtio_blk,
#     virtio_net) are loaded
set -euo pipefail
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 TERM=${TERM:-dumb}

poweroff_now() {
	sync || true
	echo o >/proc/sysrq-trigger 2>/dev/null || true
	sleep 60
}
# PID 1 must never just exit (that panics the kernel); always power off.
trap 'echo "NVM-VM-FATAL (guest-init): line $LINENO: $BASH_COMMAND"; poweroff_now' ERR
trap poweroff_now EXIT

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
# devtmpfs lacks these; bash process substitution needs /dev/fd.
ln -sfn /proc/self/fd /dev/fd
ln -sfn /proc/self/fd/0 /dev/stdin
ln -sfn /proc/self/fd/1 /dev/stdout
ln -sfn /proc/self/fd/2 /dev/stderr

conf=
for arg in $(</proc/cmdline); do
	case $arg in nvm_conf=*) conf=${arg#nvm_conf=} ;; esac
done
[[ -n $conf && -f $conf ]] || { echo "NVM-VM-FATAL: no VM config (nvm_conf=$conf)"; exit 1; }
# shellcheck source=/dev/null
source "$conf"

# Fresh tmpfs for scratch dirs, except where that would hide something we need.
keep=("$NVM_RESULTS" "$NVM_MODROOT" "$(dirname "$(dirname "${BASH_SOURCE[0]}")")" "${NVM_GUEST_CMD[@]}")
fresh_tmpfs() {
	local dir=$1 mode=$2 p
	for p in "${keep[@]}"; do
		if [[ $p == "$dir" || $p == "$dir"/* ]]; then
			echo "guest-init: keeping host $dir (it holds $p); writes go to the RAM overlay"
			return 0
		fi
	done
	mount -t tmpfs -o "mode=$mode" tmpfs "$dir"
}
fresh_tmpfs /run 0755
fresh_tmpfs /tmp 1777
fresh_tmpfs /var/tmp 1777

# modprobe looks in /lib/modules/$(uname -r): bind the cached tree there
# (inside the overlay; the host's /lib/modules is never written).
mkdir -p "/lib/modules/$NVM_KVER"
mount --bind "$NVM_MODROOT/lib/modules/$NVM_KVER" "/lib/modules/$NVM_KVER"
# Static device nodes that load their module on first open (what systemd's
# kmod-static-nodes does): e.g. /dev/loop-control -> loop, so `losetup -f`
# works as on a normal system.  Format: "module devname cMAJ:MIN".
while read -r _ devname spec; do
	[[ $spec =~ ^([cb])([0-9]+):([0-9]+)$ ]] || continue
	[[ -e /dev/$devname ]] && continue
	mkdir -p "$(dirname "/dev/$devname")"
	mknod -m 0600 "/dev/$devname" "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}" "${BASH_REMATCH[3]}" || true
done < <(grep -v '^#' "/lib/modules/$NVM_KVER/modules.devname" 2>/dev/null || true)

modprobe configfs 2>/dev/null || true
mount -t configfs configfs /sys/kernel/config 2>/dev/null || true
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null || true

# Writable results export, mounted over the same path the host uses.
# cache=none: every write goes straight to the host, so logs survive a crash.
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=none results "$NVM_RESULTS"

ip link set lo up
hostname "nvm-$NVM_VM_NAME"

for m in "${NVM_GUEST_MODULES[@]}"; do
	modprobe "$m" || echo "guest-init: warning: modprobe $m failed"
done
# No udev: wait briefly for the device nodes of what we just loaded.
for m in "${NVM_GUEST_MODULES[@]}"; do
	if [[ $m == nd_pmem ]]; then
		for _ in $(seq 50); do [[ -b /dev/pmem0 ]] && break; sleep 0.1; done
		[[ -b /dev/pmem0 ]] || echo "guest-init: warning: NVDIMM attached but no /dev/pmem0"
	fi
done

for kv in "${NVM_GUEST_ENV[@]}"; do
	export "${kv?}"
done
export NVM_RESULTS NVM_VM_NAME NVM_KVER

# nvm_systemd=1 (tests of the systemd unit): systemd becomes PID 1 and runs the command as
# a service (scripts/vm/guest-systemd.sh).
if [[ " $(</proc/cmdline) " == *" nvm_systemd=1 "* ]]; then
	trap - ERR EXIT
	exec /bin/bash "$(dirname "${BASH_SOURCE[0]}")/guest-systemd.sh" boot "$conf"
fi

read -r up _ </proc/uptime
echo "NVM-VM-READY $NVM_VM_NAME kernel=$(uname -r) uptime=${up}s"

rc=0
trap - ERR
if [[ $NVM_GUEST_INTERACTIVE == 1 && ${#NVM_GUEST_CMD[@]} -eq 0 ]]; then
	echo "guest-init: interactive shell; exit it to power off"
	setsid -c bash -l </dev/ttyS0 >/dev/ttyS0 2>&1 || rc=$?
else
	(cd / && exec "${NVM_GUEST_CMD[@]}") || rc=$?
fi
echo "$rc" >"$NVM_RESULTS/guest-rc-$NVM_VM_NAME"
echo "NVM-VM-EXIT $NVM_VM_NAME rc=$rc"
