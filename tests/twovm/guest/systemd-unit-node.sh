#!/bin/bash
# tests/twovm/guest/systemd-unit-node.sh (runs INSIDE the VM of tests/twovm/45-systemd-unit.sh,
# under systemd as PID 1, as root).  The shipped unit systemd/nvmirrord@.service, run by a
# real systemd and journald: start (READY only once the device is live, STATUS=), the
# watchdog petted, kill -9 of the daemon then the automatic restart that re-attaches the same
# /dev/ublkbN (ublk user recovery: a process holding the device open keeps it, the data
# reads back through it), the runtime directory kept across the restart and removed at the
# stop, SIGHUP ignored, journal priorities, a clean stop, and a bad config that fails with exit status 2 and
# is not restarted (RestartPreventExitStatus=2).
# Environment: NVM_BIN, NVM_REPO, NVM_OUT.  Exit 0 PASS, 77 SKIP, else FAIL.
set -euo pipefail
: "${NVM_BIN:?}" "${NVM_REPO:?}" "${NVM_OUT:?}"
exec > >(tee -a "$NVM_OUT/node.log") 2>&1
say() { printf '[%s] %s\n' "$(date +%T.%2N)" "$*"; }
fail() {
	say "FAIL: $*"
	journalctl --no-pager -n 40 -u 'nvmirrord@*' >"$NVM_OUT/journal-tail.log" 2>&1 || true
	tail -n 25 "$NVM_OUT/journal-tail.log"
	exit 1
}
skip() { say "SKIPPED: $*"; exit 77; }
NVMCTL=$NVM_BIN/nvmirrorctl
unit=nvmirrord@node-a.service
show() { systemctl show -P "$2" "$1"; }

[[ $(ps -o comm= -p 1) == systemd ]] || fail "PID 1 is $(ps -o comm= -p 1), not systemd"
systemctl is-active --quiet systemd-journald || fail "journald is not running"
modprobe ublk_drv || fail "modprobe ublk_drv"
say "systemd $(systemctl --version | head -n 1 | cut -d' ' -f2) is PID 1 ($(systemctl is-system-running 2>/dev/null || true)); journald runs"

# The unit hides /tmp (PrivateTmp) and /root (ProtectHome): the node's files live in /var/lib.
work=/var/lib/nvmirror-test
mkdir -p "$work" /etc/nvmirror /etc/systemd/system
cd "$work"
truncate -s 64M medium.img
medium=$(losetup --find --show "$work/medium.img")
cat >/etc/nvmirror/node-a.toml <<-CFG
[node]
name = "node-a"
control_socket = "$work/node-a.sock"

[nvram]
path = "$work/nvram.img"
size = "32MiB"
partitions = 2

[[lun]]
name = "lun0"
medium = "$medium"
device_id = 0
CFG
printf '[node]\nname = "node-a"\nbogus_field = 1\n' >/etc/nvmirror/bad.toml
# The shipped unit, with the binary where this build put it (scripts/install.sh rewrites
# the path the same way).
sed "s|/usr/local/sbin/nvmirrord|$NVM_BIN/nvmirrord|" "$NVM_REPO/systemd/nvmirrord@.service" \
	>/etc/systemd/system/nvmirrord@.service
systemctl daemon-reload

# ---------------------------------------------------------------- start ---
t0=$SECONDS
timeout 120 systemctl start "$unit" || fail "systemctl start $unit"
[[ $(show "$unit" ActiveState)/$(show "$unit" SubState) == active/running ]] ||
	fail "after start: $(show "$unit" ActiveState)/$(show "$unit" SubState)"
[[ -b /dev/ublkb0 ]] || fail "systemctl start returned (READY=1) but /dev/ublkb0 is not there"
status=$(show "$unit" StatusText)
[[ $status == serving* ]] || fail "STATUS= after start is '$status', expected 'serving ...'"
pid1=$(show "$unit" MainPID)
[[ -d /run/nvmirror/node-a ]] || fail "no RuntimeDirectory /run/nvmirror/node-a"
say "ok: systemctl start returned after READY=1 in $((SECONDS - t0)) s; STATUS=$status; main pid $pid1"

head -c 4M /dev/urandom >data
dd if=data of=/dev/ublkb0 bs=1M oflag=direct status=none || fail "write to /dev/ublkb0"
want=$(sha256sum <data | cut -c1-64)
# A process holding the device open across the crash, as a mount would.
sleep 600 </dev/ublkb0 &
holder=$!
rdev=$(stat -c %t:%T /dev/ublkb0)

for _ in $(seq 100); do
	[[ $(show "$unit" WatchdogTimestampMonotonic) != 0 ]] && break
	sleep 0.2
done
[[ $(show "$unit" WatchdogTimestampMonotonic) != 0 ]] || fail "no WATCHDOG=1 reached systemd (WatchdogSec=$(show "$unit" WatchdogUSec))"
say "ok: the watchdog is petted (WatchdogSec $(show "$unit" WatchdogUSec), last pet at monotonic $(show "$unit" WatchdogTimestampMonotonic) us)"

# --------------------------------------------------- kill -9, restart ---
say "kill -9 of the daemon (pid $pid1); Restart=on-failure brings it back"
kill -9 "$pid1"
for _ in $(seq 300); do
	[[ $(show "$unit" NRestarts) == 1 && $(show "$unit" ActiveState) == active && $(show "$unit" MainPID) != "$pid1" &&
		$(show "$unit" StatusText) == serving* ]] && break
	sleep 0.2
done
[[ $(show "$unit" NRestarts) == 1 && $(show "$unit" ActiveState) == active ]] ||
	fail "not restarted: NRestarts=$(show "$unit" NRestarts) $(show "$unit" ActiveState)/$(show "$unit" SubState)"
pid2=$(show "$unit" MainPID)
journalctl --no-pager -u "$unit" -o cat | grep -q 'recovering /dev/ublkb0 left by a previous nvmirrord' ||
	fail "the restarted daemon did not re-attach /dev/ublkb0 (no 'recovering' line in the journal)"
[[ $(stat -c %t:%T /dev/ublkb0) == "$rdev" ]] || fail "/dev/ublkb0 changed across the restart"
kill -0 "$holder" 2>/dev/null || fail "the process holding /dev/ublkb0 open died with the daemon"
got=$(head -c 4M /dev/ublkb0 | sha256sum | cut -c1-64)
[[ $got == "$want" ]] || fail "the data written before the kill reads back differently after the restart"
[[ -d /run/nvmirror/node-a ]] || fail "the RuntimeDirectory was not kept across the restart"
say "ok: restarted by systemd (NRestarts=1, pid $pid1 -> $pid2), /dev/ublkb0 recovered in place ($rdev, held open throughout), 4 MiB read back, runtime dir kept"

# -------------------------------------------------------------- journal ---
# SIGHUP: logged at warning and ignored (the daemon must not stop undrained).
systemctl kill -s HUP "$unit"
for _ in $(seq 50); do
	journalctl --no-pager -u "$unit" -o cat | grep -q 'SIGHUP ignored' && break
	sleep 0.2
done
[[ $(show "$unit" MainPID) == "$pid2" && $(show "$unit" ActiveState) == active ]] || fail "SIGHUP stopped the daemon"
journalctl --no-pager -u "$unit" -p warning -o cat >journal-warning.log
journalctl --no-pager -u "$unit" -p info -o cat >journal-info.log
grep -q 'is live on\|serving' journal-info.log || fail "journalctl -p info lacks the daemon's start lines"
grep -q 'SIGHUP ignored' journal-warning.log || fail "the SIGHUP warning is not at -p warning"
if grep -q 'is live on' journal-warning.log; then fail "an info line shows at -p warning: the priorities are not passed"; fi
say "ok: SIGHUP logged at warning and ignored; journald keeps the priorities ($(wc -l <journal-info.log) lines at -p info, $(wc -l <journal-warning.log) at -p warning)"

# ----------------------------------------------------------------- stop ---
# With the holder still there: the daemon must stop anyway, drained, and say why the device
# lingers (a synchronous ublk delete waited for the holder forever); the kernel frees the
# device once the holder closes it.
t_stop=$SECONDS
timeout 200 systemctl stop "$unit" || fail "systemctl stop $unit"
t_stop=$((SECONDS - t_stop))
[[ $(show "$unit" ActiveState) == inactive && $(show "$unit" Result) == success ]] ||
	fail "after stop: $(show "$unit" ActiveState), Result=$(show "$unit" Result)"
journalctl --no-pager -u "$unit" -o cat | grep -q 'still held open' ||
	fail "the daemon stopped without saying that /dev/ublkb0 was still held open"
kill "$holder" 2>/dev/null || true
wait "$holder" 2>/dev/null || true
for _ in $(seq 50); do [[ -e /dev/ublkb0 ]] || break; sleep 0.2; done
[[ ! -e /dev/ublkb0 ]] || fail "/dev/ublkb0 is still there after the stop and its holder's exit"
[[ ! -d /run/nvmirror/node-a ]] || fail "the RuntimeDirectory outlived the stop"
say "ok: systemctl stop with /dev/ublkb0 held open: inactive in $t_stop s, Result=success, the journal says the device lingers; gone once its holder closed it, runtime dir removed"

# ------------------------------------------------------------ bad config ---
timeout 60 systemctl start nvmirrord@bad.service && fail "a bad config started"
sleep 3 # RestartSec=1: a restart would have happened by now
bad_status=$(show nvmirrord@bad.service ExecMainStatus)
[[ $bad_status == 2 && $(show nvmirrord@bad.service NRestarts) == 0 && $(show nvmirrord@bad.service ActiveState) == failed ]] ||
	fail "bad config: ExecMainStatus=$bad_status NRestarts=$(show nvmirrord@bad.service NRestarts) $(show nvmirrord@bad.service ActiveState)"
journalctl --no-pager -u nvmirrord@bad.service -p err -o cat | grep -q 'bogus_field' ||
	fail "the journal (-p err) does not name the bad field"
say "ok: a bad config fails with status 2, is not restarted, and the journal names the field at -p err"
losetup -d "$medium" 2>/dev/null || true
say "PASS: the unit under systemd as PID 1: READY after the device is live, watchdog, kill -9 then restart with the device recovered in place, journal priorities, clean stop, no restart loop on a bad config"
