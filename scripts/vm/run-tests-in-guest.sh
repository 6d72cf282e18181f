#!/bin/bash
# scripts/vm/run-tests-in-guest.sh TEST_FILE...   (runs INSIDE the test VM)
#
# Runs the given VM tests one after another.  Started by guest-init.sh via
# scripts/test.sh; needs NVM_RESULTS (writable, host-visible) and NVM_REPO.
#
# ============================ VM test contract ============================
# A VM test is an executable-or-not bash script tests/vm/NAME.sh.  It runs:
#   - as root, inside the VM (Debian's real 6.12 kernel, the host's Debian
#     userspace), with `bash NAME.sh`, stdin </dev/null
#   - in its own session / process group
#   - with cwd = a fresh, empty tmpfs scratch directory
#   - with this environment:
#       NVM_REPO     repo root (same path as on the host; read-only view)
#       NVM_BIN      release binaries: ${CARGO_TARGET_DIR:-$NVM_REPO/target}/release
#       NVM_OUT      writable per-test dir on the results export, visible on
#                    the host afterwards ($NVM_RESULTS/tests/NAME)
#       NVM_SCRATCH  = cwd (tmpfs, removed after the test)
#       NVM_PMEM     /dev/pmem0 if the VM has an emulated NVDIMM, else unset
#       NVM_RESULTS  the run's results dir; NVM_KVER the guest kernel release
#       NVM_TEST_NAME  NAME
# Exit status: 0 = PASS, 77 = SKIP (print the reason), anything else = FAIL.
# stdout+stderr go to $NVM_OUT/NAME.log (the host prints its tail on FAIL);
# the kernel log of the test's run goes to $NVM_OUT/dmesg.log.
# Timeout: 300 s by default ($NVM_TEST_TIMEOUT), or per test with a line
#       # vm-timeout: SECONDS
# anywhere in the file.  On timeout the whole process group gets SIGTERM, then
# SIGKILL 5 s later, and the test is a FAIL.
# After every test the runner best-effort kills what is left in the test's
# process group (and anything with its cwd in the scratch dir) and unmounts
# everything below the scratch dir.  Undoing other state (loop devices, ublk
# devices, rxe links, netdevs, loaded modules) is the test's own job: tests
# share one VM and run in sorted order.
# Tests can reach /dev/ublk-control (modprobe ublk_drv), rdma_rxe, drbd, nfit/
# nd_pmem, loop, dummy netdevs.  There is no udev and no network to the host.
# ==========================================================================
#
# Results: $NVM_RESULTS/status/NAME holds "rc=N secs=N timeout=0|1"; the
# console shows NVM-TEST-BEGIN NAME / NVM-TEST-END NAME RC.
set -euo pipefail

: "${NVM_RESULTS:?}" "${NVM_REPO:?}"
default_timeout=${NVM_TEST_TIMEOUT:-300}
export NVM_REPO NVM_RESULTS
export NVM_BIN=${NVM_BIN:-$NVM_REPO/target/release}
if [[ -b /dev/pmem0 ]]; then export NVM_PMEM=/dev/pmem0; else unset NVM_PMEM; fi
mkdir -p "$NVM_RESULTS/status" "$NVM_RESULTS/tests" /nvm-scratch

# Kill every process of group $1 and every process whose cwd is under $2.
kill_leftovers() {
	local pgid=$1 scratch=$2 p
	kill -KILL -- "-$pgid" 2>/dev/null || true
	# One find(1) instead of a readlink fork per process: forks are slow
	# under TCG (that loop cost ~5 s per test).
	while read -r p; do
		kill -KILL "${p#/proc/}" 2>/dev/null || true
	done < <(find /proc/[0-9]*/cwd -maxdepth 0 \( -lname "$scratch" -o -lname "$scratch/*" \) \
		-printf '%h\n' 2>/dev/null)
	return 0
}

# Delete every ublk device a killed test left.  Their daemons are gone, and a device that
# waits for a new daemon (user recovery) holds its I/O: a process blocked on it (and an
# unmount of a filesystem on it) would wait forever.  Deleting it fails that I/O.
delete_ublk_devices() {
	local f
	for f in /sys/class/ublk-char/ublkc*; do
		[[ -e $f ]] && timeout 30 "$NVM_BIN/nvmirrorctl" del "${f##*ublkc}" >/dev/null 2>&1
	done
	return 0
}

# Detach the loop devices backed by files under $1: a loop device keeps its deleted tmpfs
# file, and so the test's RAM, alive after the unmount (tests create them in command
# substitutions, where their own cleanup list is lost).
detach_loops_below() {
	local dir=$1 dev back
	while read -r dev back; do
		[[ $back == "$dir"/* ]] && losetup -d "$dev" 2>/dev/null
	done < <(losetup -l -n -O NAME,BACK-FILE 2>/dev/null)
	return 0
}

# Unmount everything at or below $1, deepest first.
umount_below() {
	local dir=$1 m
	for _ in 1 2 3; do
		mapfile -t mounts < <(awk -v d="$dir" '$2 == d || index($2, d "/") == 1 { print $2 }' /proc/self/mounts | sort -r)
		((${#mounts[@]})) || return 0
		for m in "${mounts[@]}"; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
	done
}

for file in "$@"; do
	name=$(basename "$file" .sh)
	out=$NVM_RESULTS/tests/$name
	log=$out/$name.log
	mkdir -p "$out"
	tmo=$(sed -n 's/^#[[:space:]]*vm-timeout:[[:space:]]*\([0-9][0-9]*\).*/\1/p' "$file" | head -n1)
	tmo=${tmo:-$default_timeout}
	scratch=/nvm-scratch/$name
	mkdir -p "$scratch"
	mount -t tmpfs -o mode=0755 tmpfs "$scratch"
	dmesg -C 2>/dev/null || true

	echo "NVM-TEST-BEGIN $name (timeout ${tmo}s)"
	start=$SECONDS
	# The subshell is not a process-group leader, so setsid(1) calls setsid()
	# in place and execs bash: $! is the test's pid, session id and pgid.
	(
		cd "$scratch"
		export NVM_OUT=$out NVM_SCRATCH=$scratch NVM_TEST_NAME=$name
		exec setsid bash "$file"
	) </dev/null >"$log" 2>&1 &
	pid=$!
	sleep "$tmo" &
	watchdog=$!
	timed_out=0
	rc=0
	wait -n -p finished "$pid" "$watchdog" || rc=$?
	if [[ $finished == "$watchdog" ]]; then
		timed_out=1
		echo "NVM-TEST-TIMEOUT $name after ${tmo}s: killing its process group"
		echo "=== vm-test runner: TIMEOUT after ${tmo}s, killing process group $pid ===" >>"$log"
		# A test stuck in uninterruptible I/O never runs its exit trap: keep its daemon logs
		# (and a last status of every daemon still answering) for the post-mortem.
		cp -f "$scratch"/*.log "$out/" 2>/dev/null || true
		for cfg in "$scratch"/*.toml; do
			[[ -f $cfg ]] || continue
			timeout 10 "$NVM_BIN/nvmirrorctl" --config "$cfg" status >"$out/timeout-status-$(basename "$cfg" .toml).txt" 2>&1 || true
		done
		kill -TERM -- "-$pid" 2>/dev/null || true
		for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
		kill -KILL -- "-$pid" 2>/dev/null || true
		wait "$pid" 2>/dev/null || true
		rc=124
	else
		kill "$watchdog" 2>/dev/null || true
		wait "$watchdog" 2>/dev/null || true
	fi
	secs=$((SECONDS - start))
	kill_leftovers "$pid" "$scratch"
	delete_ublk_devices
	dmesg >"$out/dmesg.log" 2>/dev/null || true
	detach_loops_below "$scratch"
	umount_below "$scratch"
	rmdir "$scratch" 2>/dev/null || true
	echo "rc=$rc secs=$secs timeout=$timed_out" >"$NVM_RESULTS/status/$name"
	sync
	echo "NVM-TEST-END $name $rc (${secs}s)"
done
