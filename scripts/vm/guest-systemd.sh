#!/bin/bash
# Runs the guest command of the test VM under systemd as PID 1 (nvm_vm_boot --append
# nvm_systemd=1), for tests of the systemd unit itself.
#
#   guest-systemd.sh boot CONF   exec'ed by guest-init.sh (PID 1) once the system is set up:
#                                writes a target and a service that runs the command, then
#                                exec's systemd, which starts only that target and what it
#                                needs (sysinit: journald, udev, tmpfiles, ...)
#   guest-systemd.sh run CONF    the service: the command from the VM config with its
#                                environment, its exit status in $NVM_RESULTS/guest-rc-NAME as
#                                guest-init.sh writes it, then power off
set -euo pipefail
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

conf=${2:-}
[[ -n $conf && -f $conf ]] || { echo "NVM-VM-FATAL: guest-systemd.sh: no VM config ('$conf')"; exit 1; }
# shellcheck source=/dev/null
source "$conf"

case ${1:-} in
boot)
	units=/run/systemd/system
	mkdir -p "$units"
	cat >"$units/nvm-guest.target" <<-EOF
	[Unit]
	Description=nvmirror test VM: the guest command under systemd
	Wants=nvm-guest.service
	AllowIsolate=yes
	EOF
	cat >"$units/nvm-guest.service" <<-EOF
	[Unit]
	Description=nvmirror test VM: the guest command
	[Service]
	Type=exec
	ExecStart=/bin/bash $(realpath "$0") run $conf
	StandardInput=null
	StandardOutput=tty
	StandardError=tty
	TTYPath=/dev/ttyS0
	EOF
	echo "guest-systemd: handing PID 1 to systemd ($(/lib/systemd/systemd --version | head -n 1))"
	exec /lib/systemd/systemd --unit=nvm-guest.target --log-target=console --show-status=false
	;;
run)
	for kv in "${NVM_GUEST_ENV[@]}"; do export "${kv?}"; done
	export NVM_RESULTS NVM_VM_NAME NVM_KVER HOME=/root LANG=C.UTF-8
	read -r up _ </proc/uptime
	echo "NVM-VM-READY $NVM_VM_NAME kernel=$(uname -r) uptime=${up}s (systemd is PID 1: $(ps -o comm= -p 1))"
	rc=0
	(cd / && exec "${NVM_GUEST_CMD[@]}") || rc=$?
	echo "$rc" >"$NVM_RESULTS/guest-rc-$NVM_VM_NAME"
	echo "NVM-VM-EXIT $NVM_VM_NAME rc=$rc"
	sync
	# Straight off, as guest-init.sh does: nothing in this VM is worth a clean shutdown.
	echo o >/proc/sysrq-trigger
	sleep 60
	;;
*)
	echo "usage: guest-systemd.sh boot|run VM-CONFIG" >&2
	exit 2
	;;
esac
