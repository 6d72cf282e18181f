#!/bin/bash
# scripts/bench.sh - nvmirror side by side with its floor and with DRBD, in one VM run (issue #6).
#
# On a Debian 12 host as root: installs what it needs (scripts/vm/lib.sh), builds the release
# binaries, measures the engine alone on the host (examples/write_path), creates a virtio disk
# image (a real file on the host, next to the results), boots ONE test VM with three emulated
# NVDIMMs (2b's /dev/pmem0 and the two device-DAX NVRAMs of configuration 3) that runs
# scripts/bench-guest.sh, and prints the
# Markdown report. The report is saved to target/bench/<stamp>/results.md, and a full run
# (not BENCH_QUICK, every configuration) also replaces the results section of
# docs/benchmarks.md. Benchmarks are not part of CI's pass/fail.
#
# Configurations (see scripts/bench-guest.sh): 1 ublk null device, 2 nvmirror one node
# (2b: NVRAM on an emulated NVDIMM instead of a tmpfs file), 3 nvmirror two nodes over RDMA
# (rxe; NVRAM on device-DAX, as RDMA needs in production), 4 the same over TCP (NVRAM in
# tmpfs), 4o configuration 4 in shared-nothing mode (each node its own medium), 5 DRBD
# protocol C, 6 the loop device with O_DIRECT and with O_DIRECT + fsync per
# write, and "scale": one node with 1, 2 and 4 ublk queues under 1, 2 and 4 fio jobs (and
# the daemon's memory with each queue count), and "ship": 1, 2 and 3 log-shipping sources into
# one destination (claim set C). Before the VM boots, the engine alone on the
# host (examples/write_path, CPU per 4 KiB write).
#
# Knobs (environment):
#   BENCH_RUNTIME   seconds measured per fio run (default 4)
#   BENCH_RAMP      warm-up seconds per fio run (default 1)
#   BENCH_REPEATS   runs per workload and configuration (default 3)
#   BENCH_QUICK=1   smoke run: 1 repeat of 2 s (unless set explicitly); docs not updated
#   BENCH_CONFIGS   a subset, e.g. "null single" (default: all); docs not updated
#   BENCH_MEDIUM_MB / BENCH_REGION_MB / BENCH_NVRAM_MB  medium file size (1024), the part
#                   fio uses (896), a node's own NVRAM log (256)
#   BENCH_PERF=1    also profile (perf record -a, cpu-clock) one extra run of each write
#                   workload per configuration: raw/<config>/perf-*.txt; docs not updated;
#                   BENCH_PERF_WORKLOADS="qd32r mixed" names the workloads (qd1 qd32w seqw qd32r mixed)
#   BENCH_VM_MEM (MiB, 3072), BENCH_VM_CPUS (2), BENCH_VM_TIMEOUT (s, 2500)
#   BENCH_SKIP_BUILD=1  use target/release as it is
#   BENCH_BUSY_POLL_US  the two-node configs' cluster.busy_poll_us (default: the daemon's)
#   BENCH_QUEUES    the nvmirror configs' lun queues (default: the daemon's, one per vCPU up to 4)
#   BENCH_UPDATE_DOCS=0|1  force (not) updating docs/benchmarks.md
# Other engineers share the machine: run it as `flock /work/vm-run.lock scripts/bench.sh`.
set -euo pipefail

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }
case ${1:-} in
-h | --help) usage; exit 0 ;;
"") ;;
*) usage >&2; exit 2 ;;
esac

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
# shellcheck source=scripts/vm/lib.sh
source "$repo/scripts/vm/lib.sh"
t_start=$SECONDS

quick=${BENCH_QUICK:-0}
if [[ $quick == 1 ]]; then
	export BENCH_RUNTIME=${BENCH_RUNTIME:-2} BENCH_RAMP=${BENCH_RAMP:-1} BENCH_REPEATS=${BENCH_REPEATS:-1}
fi
export BENCH_RUNTIME=${BENCH_RUNTIME:-4} BENCH_RAMP=${BENCH_RAMP:-1} BENCH_REPEATS=${BENCH_REPEATS:-3}
medium_mb=${BENCH_MEDIUM_MB:-1024}
nvram_mb=${BENCH_NVRAM_MB:-256}
vm_mem=${BENCH_VM_MEM:-3072}
vm_cpus=${BENCH_VM_CPUS:-2}
vm_timeout=${BENCH_VM_TIMEOUT:-2500}

nvm_ensure_apt_packages "${NVM_APT_PACKAGES[@]}" python3
if [[ ${BENCH_SKIP_BUILD:-0} != 1 ]]; then
	if ! command -v cargo >/dev/null && [[ -f $HOME/.cargo/env ]]; then
		# shellcheck source=/dev/null
		source "$HOME/.cargo/env"
	fi
	# --bins as well: a target flag alone (--examples) builds only those targets.
	nvm_log "cargo build --release --workspace --bins --examples"
	cargo build --release --workspace --bins --examples
fi
bin=${CARGO_TARGET_DIR:-$repo/target}
[[ $bin == /* ]] || bin=$repo/$bin
bin=$bin/release
for b in nvmirrord nvmirrorctl nvmirror-null; do
	[[ -x $bin/$b ]] || nvm_die "$bin/$b is missing (cargo build --release --workspace)"
done

nvm_vm_prepare
nvm_vm_detect_accel

stamp=$(date +%Y%m%d-%H%M%S)
out=$repo/target/bench/$stamp
mkdir -p "$out"
ln -sfn "$stamp" "$repo/target/bench/latest"

# The medium lives on a virtio disk whose image is a plain file here (never tmpfs).
img=$out/disk.img
img_mb=$((3 * medium_mb + 1024))
truncate -s "${img_mb}M" "$img"
read -r img_fs img_src < <(df --output=fstype,source "$out" | tail -n1)
[[ $img_fs != tmpfs ]] || nvm_die "$out is on tmpfs: the disk image must be a real file"
disk_desc="raw image $img on the host's $img_fs ($img_src)"

host_cpu=$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo)
[[ -n $host_cpu ]] || host_cpu=$(lscpu | awk -F': *' '/Model name/ { print $2; exit }')
{
	echo "DATE=$(date -u '+%Y-%m-%d %H:%M UTC')"
	echo "HOST_CPU=$host_cpu"
	echo "HOST_CORES=$(nproc)"
	echo "ACCEL=$NVM_VM_ACCEL_NAME"
	dirty=$(git -C "$repo" status --porcelain --untracked-files=no -- '*.rs' '*.toml' 2>/dev/null | awk '{ print $2 }' | paste -sd' ')
	echo "BUILD=commit $(git -C "$repo" rev-parse --short HEAD 2>/dev/null)${dirty:+ plus uncommitted changes to $dirty}"
} >"$out/meta-host.env"

# The engine alone on the host's CPUs (issue #16's CPU-per-write targets): 4 KiB random
# writes at QD32 into one node and into two nodes mirroring over loopback TCP, NVRAM in
# /dev/shm, medium in memory; the median of 3 runs of wall and CPU time per write. Measured
# before the VM boots, so nothing else of ours runs.
engine_host() { # MODE -> "WALL CPU" (µs per write), or nothing
	local i
	for i in 1 2 3; do
		timeout 120 "$bin/examples/write_path" "$1" 200000 32 4 2>/dev/null | tail -1
	done | sed -n 's/.* \([0-9.]*\) us per write, .* \([0-9.]*\) us CPU per write$/\1 \2/p' |
		sort -n -k2 | sed -n 2p
}
if [[ -x $bin/examples/write_path && -d /dev/shm ]]; then
	for mode in single tcp tcp-nomac; do
		read -r wall cpu < <(engine_host "$mode") || true
		key=${mode^^}
		[[ -n ${cpu:-} ]] && echo "ENGINE_HOST_${key//-/_}=$wall $cpu" >>"$out/meta-host.env"
	done
	nvm_log "engine on the host (µs per 4K write at QD32, wall and CPU): $(grep ENGINE_HOST "$out/meta-host.env" | tr '\n' ' ')"
fi

# Watch for other work on the machine while we measure (builds, other VMs): reported, not
# prevented. One sample every 5 s: load average, compiler processes, QEMU processes.
(
	while :; do
		printf '%s load=%s rustc=%s qemu=%s\n' "$(date +%T)" "$(cut -d' ' -f1 /proc/loadavg)" \
			"$(pgrep -c -x rustc || true)" "$(pgrep -c -f '^qemu-system' || true)"
		sleep 5
	done
) >"$out/host-load.log" 2>/dev/null &
watch_pid=$!
trap 'kill "$watch_pid" 2>/dev/null || true' EXIT

nvm_log "benchmark: ${BENCH_REPEATS} x (${BENCH_RAMP}+${BENCH_RUNTIME}) s per workload; results in $out"
vm_rc=0
t_vm=$SECONDS
nvm_vm_boot --results "$out" --name bench \
	--mem "$vm_mem" --cpus "$vm_cpus" --timeout "$vm_timeout" \
	--nvdimm "$out/pmem0.img:$((nvram_mb + 64))M" \
	--nvdimm "$out/dax-a.img:$((2 * nvram_mb + 64))M" --nvdimm "$out/dax-b.img:$((2 * nvram_mb + 64))M" \
	--disk "$img" \
	--env "NVM_BIN=$bin" --env "BENCH_OUT=$out" --env "BENCH_DISK_DESC=$disk_desc" \
	--env "BENCH_RUNTIME=$BENCH_RUNTIME" --env "BENCH_RAMP=$BENCH_RAMP" --env "BENCH_REPEATS=$BENCH_REPEATS" \
	--env "BENCH_CONFIGS=${BENCH_CONFIGS:-}" --env "BENCH_MEDIUM_MB=$medium_mb" \
	--env "BENCH_REGION_MB=${BENCH_REGION_MB:-896}" --env "BENCH_NVRAM_MB=$nvram_mb" \
	--env "BENCH_PERF=${BENCH_PERF:-0}" --env "BENCH_PERF_WORKLOADS=${BENCH_PERF_WORKLOADS:-}" --env "BENCH_BUSY_POLL_US=${BENCH_BUSY_POLL_US:-}" \
	--env "BENCH_QUEUES=${BENCH_QUEUES:-}" \
	-- /bin/bash "$repo/scripts/bench-guest.sh" || vm_rc=$?
vm_secs=$((SECONDS - t_vm))
kill "$watch_pid" 2>/dev/null || true
case $vm_rc in
0) ;;
124) nvm_log "WARNING: the VM hit its time limit (${vm_timeout}s); the report shows what finished" ;;
*) nvm_log "WARNING: the VM ended with status $vm_rc (console: $out/console-bench.log)" ;;
esac

# Other work on the host during the run?
load_note=$(awk '{ split($2, l, "="); split($3, r, "="); split($4, q, "=");
	if (l[2] > maxl) maxl = l[2]; if (r[2] > 0) rs++; if (q[2] > 1) qs++; n++ }
	END { if (n == 0) exit;
		printf "Host during the run: peak load average %.1f on %d cores", maxl, '"$(nproc)"';
		if (rs) printf "; a compiler (rustc) ran in %d of %d samples (another engineer'"'"'s build)", rs, n;
		if (qs) printf "; another QEMU ran in %d of %d samples", qs, n;
		if (!rs && !qs) printf "; no other build or VM seen"; printf "." }' "$out/host-load.log")
echo "LOAD_NOTE=$load_note" >>"$out/meta-host.env"
echo "VM_SECONDS=$vm_secs" >>"$out/meta-host.env"

bash "$repo/scripts/bench-guest.sh" --report "$out" >"$out/results.md"
{
	echo
	echo "Run: \`scripts/bench.sh\` (BENCH_RUNTIME=$BENCH_RUNTIME BENCH_RAMP=$BENCH_RAMP BENCH_REPEATS=$BENCH_REPEATS), VM ${vm_secs} s, whole script $((SECONDS - t_start)) s; raw fio JSON under \`target/bench/$stamp/raw\`."
} >>"$out/results.md"
echo
cat "$out/results.md"

# docs/benchmarks.md: replace the part between the markers (the rest is prose kept by hand).
update_docs=0
[[ $quick != 1 && -z ${BENCH_CONFIGS:-} && -z ${BENCH_QUEUES:-} && ${BENCH_PERF:-0} != 1 && $vm_rc == 0 ]] && update_docs=1
[[ -z ${BENCH_UPDATE_DOCS:-} ]] || update_docs=$BENCH_UPDATE_DOCS
if [[ $update_docs == 1 ]]; then
	doc=$repo/docs/benchmarks.md
	mkdir -p "$repo/docs"
	if [[ ! -f $doc ]] || ! grep -q '^<!-- bench:begin' "$doc"; then
		printf '# Benchmarks\n\n<!-- bench:begin (written by scripts/bench.sh) -->\n<!-- bench:end -->\n' >"$doc"
	fi
	python3 - "$doc" "$out/results.md" <<-'PY'
	import re, sys
	doc, res = sys.argv[1], sys.argv[2]
	text = open(doc).read()
	body = open(res).read().rstrip("\n")
	new = re.sub(r"(<!-- bench:begin[^\n]*-->\n).*?(<!-- bench:end -->)",
	             lambda m: m.group(1) + body + "\n" + m.group(2), text, count=1, flags=re.S)
	open(doc, "w").write(new)
	PY
	nvm_log "updated $doc"
fi

# The disk image and NVDIMM files are large; the raw results stay.
rm -f "$img" "$out"/pmem*.img
nvm_log "bench: done in $((SECONDS - t_start)) s (VM ${vm_secs} s); report: $out/results.md"
exit "$vm_rc"
