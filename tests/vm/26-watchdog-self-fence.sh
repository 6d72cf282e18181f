#!/bin/bash
# Issue 14, item 3: the self-fence. A node whose medium write hangs (its path queues I/O:
# here a suspended device-mapper device, as multipath's queue_if_no_path would) must reset
# itself before its partner may take its ranges over, so that the hung write can never land
# over the new owner's. nvmirrord pets /dev/watchdog (softdog in the VM) only while none of
# its medium writes is older than medium_io_timeout_ms.
#
# softdog is loaded with soft_noboot=1: it logs "Triggered - Reboot ignored" where a real
# machine would reset, so the suite keeps running and the test measures when it fired.
# Checked:
# 1. with the watchdog set to a missing device the daemon refuses to start and says why;
#    `config check` warns about a node on takeover = "auto" without a watchdog;
# 2. a healthy node keeps it petted (no trigger over 3 x its timeout); status shows it armed;
# 3. node-a's path is suspended: its flusher's and heartbeat's writes hang; the watchdog
#    fires within the I/O timeout + the watchdog timeout (+ slack), before node-b may take
#    node-a's range over (node-b's dead_after), and status said NOT PETTED;
# 4. a clean stop disarms it (no trigger after), kill -9 leaves it counting (trigger).
# vm-timeout: 240
source "$NVM_REPO/tests/vm/lib/nvm.sh"
nvm_init
modprobe softdog soft_noboot=1 nowayout=0 || skip "no softdog module in this kernel"
[[ -c /dev/watchdog ]] || skip "softdog loaded but /dev/watchdog is missing"

shared=$(nvm_medium shared 320)
sectors=$(blockdev --getsz "$shared")
dmsetup create nvm-wd-path --table "0 $sectors linear $shared 0" || fail "dmsetup create"
path_dev=/dev/dm-$(dmsetup info -c --noheadings -o minor nvm-wd-path | tr -d ' ')
nvm_extra_cleanup() {
	dmsetup resume nvm-wd-path 2>/dev/null
	dmsetup remove --force nvm-wd-path 2>/dev/null
	rmmod softdog 2>/dev/null
}

nvm_cluster_config a "$path_dev" auto tcp 127.0.0.1 7861
nvm_cluster_config b "$shared" auto tcp 127.0.0.1 7861
# Timings with room for a 2 s watchdog: (2 s + 0.5 s) / 1.1 - 0.25 s = 2.02 s.
for n in a b; do
	sed -i -e 's/^disk_heartbeat_ms = .*/disk_heartbeat_ms = 500/' \
		-e 's/^disk_lease_ms = .*/disk_lease_ms = 3000/' \
		-e 's/^medium_io_timeout_ms = .*/medium_io_timeout_ms = 2000/' node-$n.toml
done
# dead_after = 1.1 x 3 + 2 + 0.5 s
dead_after=5.8
triggers() { dmesg | grep -c "softdog: Triggered" || true; }

say "1. a missing watchdog device is refused at start, and its absence is warned about"
sed 's/^takeover = .*/&\nwatchdog = "\/dev\/watchdog-missing"/' node-a.toml >node-a-missing.toml
if "$NVMD" --config node-a-missing.toml --state-dir "$PWD/state" >missing.log 2>&1; then
	fail "nvmirrord started with a missing watchdog device"
fi
grep -q "cluster.watchdog: cannot open the watchdog /dev/watchdog-missing.*softdog" missing.log ||
	{ cat missing.log; fail "the refusal does not name cluster.watchdog and the fix"; }
say "   refused: $(grep -o 'cluster.watchdog: cannot open.*' missing.log | head -1 | cut -c1-160)"
"$NVMCTL" config check node-b.toml >check-b.log 2>&1 || { cat check-b.log; fail "config check of node-b"; }
grep -q "cluster.watchdog is not set" check-b.log || { cat check-b.log; fail "config check does not warn about the missing watchdog"; }
sed -i 's/^takeover = .*/&\nwatchdog = "\/dev\/watchdog"/' node-a.toml
"$NVMCTL" config check node-a.toml >check-a.log 2>&1 || { cat check-a.log; fail "config check of node-a"; }
! grep -q "cluster.watchdog" check-a.log || { cat check-a.log; fail "config check warns although the watchdog is set"; }

say "2. healthy: the watchdog stays petted"
before=$(triggers)
nvm_start node-a.toml daemon-a.log
pid_a=$NVM_LAST_PID
nvm_start node-b.toml daemon-b.log
pid_b=$NVM_LAST_PID
grep -q "watchdog /dev/watchdog armed: 2 s" daemon-a.log || { cat daemon-a.log; fail "node-a did not arm a 2 s watchdog"; }
dd if=/dev/urandom of=/dev/ublkb0 bs=4k count=256 oflag=direct status=none || fail "writing node-a's device"
sleep 6
(($(triggers) == before)) || fail "the watchdog fired although node-a was healthy"
"$NVMCTL" --config node-a.toml status >status-a.log
grep -q "watchdog: /dev/watchdog armed, 2 s" status-a.log || { cat status-a.log; fail "status does not show the armed watchdog"; }
status_b=$("$NVMCTL" --config node-b.toml status) # captured: see nvm_status_has on pipefail
grep -q "watchdog: none" <<<"$status_b" || fail "node-b's status does not say it has no watchdog"

say "3. node-a's path to the medium hangs (I/O queued): the watchdog must fire"
dd if=/dev/urandom of=/dev/ublkb0 bs=4k count=64 oflag=direct status=none || fail "writing node-a's device"
# Times are the kernel log's own (a marker line before the suspend, softdog's trigger line):
# the polling loop below takes long under TCG and would add its own delay to the measure.
echo "nvm-test-26: suspending node-a's path to the medium" >/dev/kmsg
dmsetup suspend nvm-wd-path || fail "dmsetup suspend"
# New writes through node-a: staged and mirrored at once, their flush hangs on the path.
dd if=/dev/urandom of=/dev/ublkb0 bs=4k count=64 oflag=direct status=none &
dd_pid=$!
fired=
for _ in $(seq 200); do
	if (($(triggers) > before)); then
		fired=$(dmesg | python3 -c '
import re, sys
stamp = lambda line: float(re.match(r"\[\s*([0-9.]+)\]", line).group(1))
lines = sys.stdin.read().splitlines()
t0 = stamp([l for l in lines if "nvm-test-26: suspending" in l][-1])
fired = stamp([l for l in lines if "softdog: Triggered" in l][-1])
print(f"{fired - t0:.2f}")')
		break
	fi
	sleep 0.1
done
timeout 10 "$NVMCTL" --config node-a.toml status >status-a2.log 2>&1 || true
dmsetup resume nvm-wd-path || fail "dmsetup resume"
wait "$dd_pid" || true
[[ -n $fired ]] || { tail -5 daemon-a.log; fail "the watchdog did not fire within 20 s of the path hanging"; }
say "   softdog fired ${fired} s after the path hung (I/O timeout 2 s + watchdog 2 s; node-b may take over only ${dead_after} s after node-a's last heartbeat)"
python3 -c "import sys; sys.exit(0 if $fired <= 2 + 0.25 + 2 + 1 else 1)" ||
	fail "the watchdog fired ${fired} s after the path hung, later than 5.25 s"
grep -q "self-fence: a medium write has been in flight" daemon-a.log || fail "node-a did not log the self-fence"
grep -q "NOT PETTED" status-a2.log || { cat status-a2.log; fail "status did not say the watchdog is not petted"; }
kill -9 "$pid_a" "$pid_b" 2>/dev/null
nvm_wait_gone "$pid_a"
nvm_wait_gone "$pid_b"
"$NVMCTL" del 0 >/dev/null 2>&1 || true
"$NVMCTL" del 1 >/dev/null 2>&1 || true
nvm_wait_dev_gone 0
nvm_wait_dev_gone 1

say "4. a clean stop disarms the watchdog; kill -9 leaves it counting"
nvm_start node-a.toml daemon-a2.log
pid_a=$NVM_LAST_PID
before=$(triggers)
nvm_stop "$pid_a"
grep -q "watchdog disarmed" daemon-a2.log || { tail daemon-a2.log; fail "the clean stop did not disarm the watchdog"; }
sleep 4
(($(triggers) == before)) || fail "the watchdog fired after a clean stop"
nvm_wait_dev_gone 0
nvm_start node-a.toml daemon-a3.log
pid_a=$NVM_LAST_PID
kill -9 "$pid_a"
nvm_wait_gone "$pid_a"
for _ in $(seq 60); do (($(triggers) > before)) && break; sleep 0.1; done
(($(triggers) > before)) || fail "the watchdog did not fire after kill -9 of the daemon"
"$NVMCTL" del 0 >/dev/null 2>&1 || true
say "PASS: the watchdog is petted while healthy, fires ${fired} s after a medium path hangs, is disarmed by a clean stop and fires after kill -9"
