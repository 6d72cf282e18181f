#!/bin/bash
# scripts/test.sh [--unit-only | --vm-only] [TEST_NAME ...]
#
# The project's one test command (CI runs it through .ci/run, as root, on a
# fresh Debian 12 machine with CI=true).
#   1. installs the Debian packages it needs (quick no-op when present)
#   2. unless --vm-only: cargo build --release --workspace, cargo test --release --workspace
#   3. unless --unit-only: prepares the cached Debian 6.12 kernel + initramfs
#      (scripts/vm/lib.sh) and boots ONE VM that runs the VM tests
#      (tests/vm/*.sh in name order, or the TEST_NAMEs given) one by one;
#      see scripts/vm/run-tests-in-guest.sh for the VM test contract.
#   4. unless --unit-only: then runs the two-VM tests (tests/twovm/*.sh in name
#      order, or the TEST_NAMEs given) one by one ON THE HOST; each boots its
#      own VMs (contract below).
#   5. prints PASS/FAIL/SKIP per item (log tail on FAIL) and a closing line
#      "N passed, N failed, N skipped"; exits non-zero on any failure.
#      With CI=true a SKIP counts as a FAIL: VM tests must really run in CI.
#
# TEST_NAME is a file name in tests/vm or tests/twovm with or without .sh
# (tests/vm wins if both have it), or a path to any test script (a path into
# tests/twovm/ is a two-VM test; any other path is a single-VM test and must
# be readable from the VM, i.e. anywhere on the host).  When only two-VM tests
# are named, the single-VM phase is skipped, and vice versa.
#
# Two-VM test contract: tests/twovm/NAME.sh (helpers for the guests live in
# subdirectories such as tests/twovm/guest/, which are not tests) runs on the
# host as `bash NAME.sh`, stdin </dev/null, cwd = the repo, with NVM_REPO,
# NVM_BIN (release binaries) and NVM_OUT (a fresh results dir for it:
# <results>/twovm/NAME, writable, may be exported to its VMs).  It sources
# scripts/vm/lib.sh and boots its VMs with nvm_vm_boot (each with its own
# --timeout), coordinates them, and must leave no QEMU running when it exits
# (it gets SIGTERM at its hard timeout: trap it).  Exit 0 = PASS, 77 = SKIP
# (print the reason), anything else = FAIL.  Hard timeout: a line
#       # twovm-timeout: SECONDS
# in the file, else $NVM_TWOVM_TIMEOUT (600); SIGKILL 30 s after the SIGTERM.
# Its output goes to <results>/twovm/NAME/NAME.log and, prefixed, to stdout.
#
# Environment: NVM_RESULTS (results dir; default target/vm-results/<stamp>),
# NVM_TEST_TIMEOUT (default per-test timeout, 300), NVM_VM_TIMEOUT (whole VM,
# 4500), NVM_TWOVM_TIMEOUT (default per two-VM test, 600), NVM_VM_MEM,
# NVM_VM_CPUS, NVM_VM_ACCEL, NVM_VM_PMEM_SIZE, NVM_VM_CACHE, NVM_VM_QUIET=1,
# NVM_VM_BOOT_OPTS (extra nvm_vm_boot options for the single-VM run,
# word-split, e.g. "--disk /path/img --qemu-arg -s"); see scripts/vm/lib.sh.
# NVM_MSRV_CHECK=1 also builds the workspace with the Rust version Cargo.toml declares
# (rustup installs it). NVM_SOAK=1 runs the long versions (more partition cycles in 24 and 42,
# more kill cycles in 20 and 21, ocf-tester in 50, all three filesystems in 31, all of 33,
# the switchover in twovm/46) and the tests marked `# soak-only:` (21-two-node-failover-rdma,
# twovm/41-power-cut-both, twovm/43-power-cut-own, twovm/44-power-cut-fs,
# twovm/47-power-cut-ship): about 40 minutes more than CI's run;
# NVM_PARTITION_CYCLES caps test 24's.
set -euo pipefail

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }

mode=all
names=()
while (($#)); do
	case $1 in
	--unit-only) mode=unit ;;
	--vm-only) mode=vm ;;
	-h | --help) usage; exit 0 ;;
	-*) usage >&2; echo "unknown option $1" >&2; exit 2 ;;
	*) names+=("$1") ;;
	esac
	shift
done

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
# shellcheck source=scripts/vm/lib.sh
source "$repo/scripts/vm/lib.sh"
t_start=$SECONDS

# Results of everything we ran: parallel arrays.
item_names=() item_status=() item_detail=() item_log=()
add_item() { item_names+=("$1"); item_status+=("$2"); item_detail+=("$3"); item_log+=("${4:-}"); }

nvm_ensure_apt_packages "${NVM_APT_PACKAGES[@]}"

# ------------------------------------------------------------------ cargo ---
run_cargo() {
	if ! command -v cargo >/dev/null && [[ -f $HOME/.cargo/env ]]; then
		# shellcheck source=/dev/null
		source "$HOME/.cargo/env"
	fi
	if ! command -v cargo >/dev/null; then
		nvm_log "cargo not found (no rustup toolchain); falling back to Debian's cargo"
		nvm_ensure_apt_packages cargo rustc
	fi
	if [[ ! -f $repo/Cargo.toml ]]; then
		echo "NOTE: no Cargo.toml in $repo yet: skipping cargo build/test"
		return 0
	fi
	local log=$repo/target/cargo-test.log
	mkdir -p "$repo/target"
	# --all-targets: the tests' dev-dependencies turn on features of shared dependencies
	# (resolver 2), so building the binaries alone compiled the daemon's dependency chain a
	# second time for `cargo test` (100 s on 2 cores).
	nvm_log "cargo build --release --workspace --all-targets"
	if ! cargo build --release --workspace --all-targets; then
		add_item "cargo build --release --workspace --all-targets" FAIL "build failed" ""
		return 0
	fi
	# --release reuses the build above (a debug build of everything takes 4 more minutes
	# on 2 cores); overflow checks stay on for our crates (Cargo.toml) and the simulator
	# turns on the log's full invariant checks itself (nvmirror::log::audit_queues).
	if [[ ${NVM_MSRV_CHECK:-0} == 1 ]]; then
		# Our own code against the declared MSRV (the dependencies' declared ones are checked
		# by ublk-target/tests/msrv.rs in every run). Off in CI: it is a second compile.
		local msrv
		msrv=$(sed -n 's/^rust-version = "\(.*\)"$/\1/p' "$repo/Cargo.toml")
		nvm_log "MSRV check: cargo +$msrv check --workspace --all-targets"
		if rustup toolchain install "$msrv" --profile minimal >&2 &&
			CARGO_TARGET_DIR=$repo/target/msrv cargo "+$msrv" check --workspace --all-targets --locked; then
			add_item "MSRV $msrv: cargo check" PASS "" ""
		else
			add_item "MSRV $msrv: cargo check" FAIL "does not build with Rust $msrv" ""
		fi
	fi
	nvm_log "cargo test --release --workspace"
	if cargo test --release --workspace 2>&1 | tee "$log"; then
		add_item "cargo test --release --workspace" PASS "" ""
	else
		add_item "cargo test --release --workspace" FAIL "see $log" "$log"
	fi
}
[[ $mode == vm ]] || run_cargo
[[ $mode != vm ]] || echo "NOTE: --vm-only: using the binaries already in target/release as they are"

# --------------------------------------------------------------- VM tests ---
# A test marked `# soak-only:` runs with NVM_SOAK=1 or when named.
soak_only() {
	[[ ${NVM_SOAK:-0} != 1 ]] && grep -q '^# soak-only:' "$1" || return 1
	nvm_log "not running $(basename "$1" .sh) (soak-only: NVM_SOAK=1 or name it)"
}

# Sets tests (single-VM test files) and twovm_tests (two-VM test files).
resolve_tests() {
	local n f
	tests=() twovm_tests=()
	if ((${#names[@]} == 0)); then
		for f in "$repo"/tests/vm/*.sh; do
			[[ -f $f ]] && ! soak_only "$f" && tests+=("$f")
		done
		for f in "$repo"/tests/twovm/*.sh; do
			[[ -f $f ]] && ! soak_only "$f" && twovm_tests+=("$f")
		done
		return 0
	fi
	for n in "${names[@]}"; do
		if [[ -f $repo/tests/vm/$n.sh ]]; then tests+=("$repo/tests/vm/$n.sh")
		elif [[ -f $repo/tests/vm/$n ]]; then tests+=("$repo/tests/vm/$n")
		elif [[ -f $repo/tests/twovm/$n.sh ]]; then twovm_tests+=("$repo/tests/twovm/$n.sh")
		elif [[ -f $repo/tests/twovm/$n ]]; then twovm_tests+=("$repo/tests/twovm/$n")
		elif [[ -f $n ]]; then
			f=$(cd "$(dirname "$n")" && pwd)/$(basename "$n")
			if [[ $(dirname "$f") == "$repo/tests/twovm" ]]; then twovm_tests+=("$f"); else tests+=("$f"); fi
		else nvm_die "no such VM test: $n (looked in tests/vm/ and tests/twovm/)"
		fi
	done
}

# The run's results dir (created once, shared by both phases).
init_results() {
	[[ -z $results ]] || return 0
	local stamp
	stamp=$(date +%Y%m%d-%H%M%S)
	results=${NVM_RESULTS:-$repo/target/vm-results/$stamp}
	mkdir -p "$results"
	results=$(cd "$results" && pwd)
	if [[ -z ${NVM_RESULTS:-} ]]; then ln -sfn "$stamp" "$repo/target/vm-results/latest"; fi
	nvm_log "VM results: $results"
}

run_vm_tests() {
	local f name
	if ((${#tests[@]} == 0)); then
		((${#names[@]})) || echo "NOTE: no VM tests found in tests/vm/"
		return 0
	fi
	declare -A seen=()
	for f in "${tests[@]}"; do
		name=$(basename "$f" .sh)
		[[ -z ${seen[$name]:-} ]] || nvm_die "two VM tests named $name"
		seen[$name]=1
	done

	init_results
	nvm_vm_prepare
	nvm_ensure_promtool
	local envs=(--env "NVM_REPO=$repo" --env "NVM_BIN=$bin_dir/release" --env "NVM_PROMTOOL=$NVM_PROMTOOL")
	# The Debian package for 41-deb-package, built here (natively: xz under TCG takes a minute).
	local deb
	if deb=$(CARGO_TARGET_DIR=$bin_dir bash "$repo/scripts/package-deb.sh" --no-build --out "$results/deb" 2>"$results/package-deb.log" | tail -n1) &&
		[[ -f $deb ]]; then
		envs+=(--env "NVM_DEB=$deb")
	else
		nvm_log "scripts/package-deb.sh failed (see $results/package-deb.log); 41-deb-package builds the package itself"
	fi
	[[ -z ${NVM_TEST_TIMEOUT:-} ]] || envs+=(--env "NVM_TEST_TIMEOUT=$NVM_TEST_TIMEOUT")
	[[ -z ${NVM_SOAK:-} ]] || envs+=(--env "NVM_SOAK=$NVM_SOAK")
	[[ -z ${NVM_PARTITION_CYCLES:-} ]] || envs+=(--env "NVM_PARTITION_CYCLES=$NVM_PARTITION_CYCLES")
	local -a extra=()
	# shellcheck disable=SC2206 # word splitting is the documented interface
	[[ -z ${NVM_VM_BOOT_OPTS:-} ]] || extra=($NVM_VM_BOOT_OPTS)
	# A reused NVM_RESULTS must not let stale results stand in for new ones.
	rm -rf "$results/status" "$results/guest-rc-vm"
	for f in "${tests[@]}"; do rm -rf "$results/tests/$(basename "$f" .sh)"; done
	printf '%s\n' "${tests[@]}" >"$results/planned"

	local vm_rc=0 t0=$SECONDS attempt
	# A cap for a hung VM only (each test has its own timeout): the CI's tests took 2875 s
	# in one VM on a slow host, too close to the 3000 s every other VM gets.
	local vm_timeout=${NVM_VM_TIMEOUT:-4500}
	local -a to_run=("${tests[@]}")
	local restarted=''
	for attempt in 1 2; do
		vm_rc=0
		nvm_vm_boot --results "$results" --name vm --timeout "$vm_timeout" "${envs[@]}" "${extra[@]}" \
			-- /bin/bash "$repo/scripts/vm/run-tests-in-guest.sh" "${to_run[@]}" || vm_rc=$?
		((vm_rc == 125 && attempt == 1)) || break
		# TCG now and then panics the guest kernel while it patches its own code (an int3
		# Oops in sched_clock_cpu: while it boots, and once in CI mid-run, in the middle of
		# 00-kernel-smoke). That is the emulator, not a test: boot once more and run the
		# tests that had not finished, the one in flight again. Any other crash fails them.
		if ! grep -q "NVM-VM-READY" "$results/console-vm.log" 2>/dev/null; then
			mv "$results/console-vm.log" "$results/console-vm.boot1.log" 2>/dev/null || true
			nvm_log "the VM crashed while booting, before any test ran (console: console-vm.boot1.log); booting it once more"
			continue
		fi
		grep -q "Oops: int3" "$results/console-vm.log" 2>/dev/null || break
		to_run=()
		for f in "${tests[@]}"; do
			name=$(basename "$f" .sh)
			[[ -f $results/status/$name ]] && continue
			to_run+=("$f")
			[[ -f $results/tests/$name/$name.log ]] &&
				mv "$results/tests/$name/$name.log" "$results/tests/$name/$name.crash1.log"
		done
		((${#to_run[@]})) || break
		mv "$results/console-vm.log" "$results/console-vm.crash1.log" 2>/dev/null || true
		nvm_log "WARNING: the VM's kernel panicked under TCG (an int3 Oops: the emulator's code patching; console: console-vm.crash1.log) with ${#to_run[@]} test(s) unfinished; booting it once more to run them (the interrupted one's log: its .crash1.log)"
		restarted="; booted twice: the first boot's kernel panicked under TCG (console-vm.crash1.log)"
	done
	vm_seconds=$((SECONDS - t0))
	boot_seconds=$(cat "$results/boot-seconds-vm" 2>/dev/null || echo '?')

	local why_missing="the VM died before reporting it"
	case $vm_rc in
	124) why_missing="the VM hit its hard timeout (${vm_timeout}s)" ;;
	125) why_missing="the VM crashed or failed to boot (see console-vm.log)" ;;
	esac

	local st rc secs to log
	for f in "${tests[@]}"; do
		name=$(basename "$f" .sh)
		log=$results/tests/$name/$name.log
		st=$results/status/$name
		if [[ ! -f $st ]]; then
			if [[ -f $log ]]; then
				add_item "$name" FAIL "started but did not finish; $why_missing" "$log"
			else
				add_item "$name" FAIL "never started; $why_missing" ""
			fi
			continue
		fi
		rc=$(sed -n 's/.*rc=\([0-9]*\).*/\1/p' "$st")
		secs=$(sed -n 's/.*secs=\([0-9]*\).*/\1/p' "$st")
		to=$(sed -n 's/.*timeout=\([0-9]*\).*/\1/p' "$st")
		if [[ $to == 1 ]]; then
			add_item "$name" FAIL "timed out after ${secs}s" "$log"
		elif [[ $rc == 0 && -f $results/tests/$name/$name.crash1.log ]]; then
			add_item "$name" PASS "${secs}s; run again: the VM's kernel panicked under TCG during its first run" "$log"
		elif [[ $rc == 0 ]]; then
			add_item "$name" PASS "${secs}s" "$log"
		elif [[ $rc == 77 ]]; then
			add_item "$name" SKIP "${secs}s: $(tail -n1 "$log" 2>/dev/null)" "$log"
		else
			add_item "$name" FAIL "exit $rc after ${secs}s" "$log"
		fi
	done
	if ((vm_rc == 124 || vm_rc == 125)) && [[ -f $results/console-vm.log ]]; then
		echo "---- last 40 lines of the VM console ($results/console-vm.log) ----"
		tail -n 40 "$results/console-vm.log" | sed 's/^/  | /'
		echo "----"
	fi
	echo "VM: boot to ready ${boot_seconds}s, whole VM run ${vm_seconds}s (accel ${NVM_VM_ACCEL_NAME:-?}$restarted); results in $results"
}

# ---------------------------------------------------------- two-VM tests ---
run_twovm_tests() {
	((${#twovm_tests[@]})) || return 0
	init_results
	local f name out log tmo rc secs t0
	local -a st
	# The VMs of a two-VM test use the acceleration the single-VM run found.
	[[ -z ${NVM_VM_ACCEL_NAME:-} ]] || export NVM_VM_ACCEL=${NVM_VM_ACCEL:-$NVM_VM_ACCEL_NAME}
	for f in "${twovm_tests[@]}"; do
		name=$(basename "$f" .sh)
		out=$results/twovm/$name
		log=$out/$name.log
		rm -rf "$out"
		mkdir -p "$out"
		tmo=$(sed -n 's/^#[[:space:]]*twovm-timeout:[[:space:]]*\([0-9][0-9]*\).*/\1/p' "$f" | head -n1)
		tmo=${tmo:-${NVM_TWOVM_TIMEOUT:-600}}
		nvm_log "two-VM test $name (runs on the host, timeout ${tmo}s); log $log"
		t0=$SECONDS
		set +e
		NVM_REPO=$repo NVM_BIN=$bin_dir/release NVM_OUT=$out \
			timeout -k 30 "$tmo" bash "$f" </dev/null 2>&1 | tee "$log" | sed -u "s/^/  [$name] /"
		st=("${PIPESTATUS[@]}")
		set -e
		rc=${st[0]}
		secs=$((SECONDS - t0))
		if ((rc == 124 || rc == 137)); then
			add_item "$name" FAIL "two-VM test timed out after ${secs}s (limit ${tmo}s)" "$log"
		elif ((rc == 0)); then
			add_item "$name" PASS "${secs}s, two VMs" "$log"
		elif ((rc == 77)); then
			add_item "$name" SKIP "${secs}s: $(tail -n1 "$log" 2>/dev/null)" "$log"
		else
			add_item "$name" FAIL "exit $rc after ${secs}s" "$log"
		fi
	done
}

vm_seconds=0 boot_seconds='?' results=''
bin_dir=${CARGO_TARGET_DIR:-$repo/target}
[[ $bin_dir == /* ]] || bin_dir=$repo/$bin_dir
tests=() twovm_tests=()
if [[ $mode != unit ]]; then
	resolve_tests
	run_vm_tests
	run_twovm_tests
fi

# ---------------------------------------------------------------- summary ---
passed=0 failed=0 skipped=0 ci_skips=0
echo
echo "==================== test summary ===================="
for i in "${!item_names[@]}"; do
	status=${item_status[$i]}
	if [[ $status == SKIP && ${CI:-} == true ]]; then
		status=FAIL
		item_detail[i]="SKIPPED, which counts as a failure in CI (${item_detail[$i]})"
		ci_skips=$((ci_skips + 1))
	fi
	printf '%-4s  %s  %s\n' "$status" "${item_names[$i]}" "${item_detail[$i]:+(${item_detail[$i]})}"
	case $status in
	PASS) passed=$((passed + 1)) ;;
	SKIP) skipped=$((skipped + 1)) ;;
	FAIL)
		failed=$((failed + 1))
		if [[ -n ${item_log[$i]} && -f ${item_log[$i]} ]]; then
			echo "      ---- last 40 lines of ${item_log[$i]} ----"
			tail -n 40 "${item_log[$i]}" | sed 's/^/      | /'
			echo "      ----"
		fi
		;;
	esac
done
if ((ci_skips)); then
	echo
	echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
	echo "!!! CI=true: $ci_skips test(s) SKIPPED. In CI the VM tests must really run,"
	echo "!!! so every skip is counted as a FAILURE. Fix the environment or the test."
	echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
fi
# Drop the (sparse, up to NVM_VM_PMEM_SIZE) NVDIMM backing file of a clean run.
if ((failed == 0)) && [[ -n $results ]]; then rm -f "$results"/pmem0-vm.img; fi
echo "total time $((SECONDS - t_start))s"
echo "$passed passed, $failed failed, $skipped skipped"
((failed == 0))
