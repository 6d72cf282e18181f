# shellcheck shell=bash
# scripts/vm/lib.sh - host-side helpers for booting real-kernel test VMs.
#
# Source this file (it only defines functions and a few defaults); it is used
# by scripts/test.sh and scripts/vm/boot.sh, and is meant to be reused by
# future multi-VM tests (two nodes over a socket netdev + a shared disk).
#
# Why a VM at all: the host kernel has no ublk / rdma_rxe / nvdimm / drbd, so
# anything touching them must run against a real kernel.  We use Debian's own
# bookworm-security 6.12 kernel (downloaded with apt, unpacked into a cache,
# never installed as the host kernel), a tiny busybox initramfs, and the host's
# root filesystem shared read-only over 9p (with a tmpfs overlay on top so the
# guest can write anywhere without touching the host).
#
# Main entry points:
#   nvm_ensure_apt_packages PKG...   install missing Debian packages
#   nvm_ensure_promtool              promtool (from Debian's prometheus) into the cache; sets NVM_PROMTOOL
#   nvm_vm_prepare                   kernel + initramfs into the cache; sets
#                                    NVM_KVER NVM_KERNEL NVM_INITRD NVM_MODROOT
#   nvm_vm_boot [opts] [-- CMD ARGS] boot one VM (see nvm_vm_boot_usage)
#
# Environment knobs (all optional):
#   NVM_VM_CACHE          cache dir (default /var/cache/nvmirror-vm)
#   NVM_VM_KERNEL_VERSION pin a kernel, e.g. 6.12.117+deb12-amd64
#   NVM_VM_KERNEL_REFRESH=1  re-pick the newest 6.12 kernel apt offers
#   NVM_VM_ACCEL          kvm | tcg (default: probe kvm, fall back to tcg)
#   NVM_VM_MEM            guest RAM in MiB (default 2048)
#   NVM_VM_CPUS           guest vCPUs (default 2)
#   NVM_VM_TIMEOUT        hard limit on one VM run in seconds (default 3000)
#   NVM_VM_PMEM_SIZE      size of the default emulated NVDIMM (default 64M)
#   NVM_VM_QUIET=1        do not echo the guest console to stdout

NVM_VM_LIB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NVM_VM_CACHE=${NVM_VM_CACHE:-/var/cache/nvmirror-vm}

# Everything the harness, the build and the VM tests need on the host (the
# guest runs the host's userspace, so guest tools are host packages too).
# shellcheck disable=SC2034 # used by the scripts that source this file
NVM_APT_PACKAGES=(
	qemu-system-x86 gcc libc6-dev busybox-static cpio kmod xz-utils
	fio rdma-core ibverbs-utils ibverbs-providers rdmacm-utils perftest
	e2fsprogs xfsprogs btrfs-progs iproute2 util-linux procps psmisc coreutils dmsetup
	libclang-dev libibverbs-dev librdmacm-dev pkg-config
	resource-agents libxml2-utils pacemaker-cli-utils drbd-utils ndctl dpkg-dev
)

nvm_log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
nvm_die() {
	printf 'ERROR: %s\n' "$*" >&2
	exit 1
}

# Install whatever of "$@" is missing.  Fast path: one dpkg-query, no network.
# `apt-get update` runs only when something has to be installed (and its
# failure is not fatal: unrelated third-party sources may be unreachable).
nvm_ensure_apt_packages() {
	local missing=() pkg status
	for pkg in "$@"; do
		status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null || true)
		[[ $status == ii* ]] || missing+=("$pkg")
	done
	((${#missing[@]} == 0)) && return 0
	nvm_log "installing missing packages: ${missing[*]}"
	local sudo=()
	((EUID == 0)) || sudo=(sudo)
	"${sudo[@]}" apt-get update -q || nvm_log "warning: apt-get update reported errors; trying to install anyway"
	DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q \
		--no-install-recommends "${missing[@]}"
}

# ---------------------------------------------------------------------------
# Kernel + initramfs
# ---------------------------------------------------------------------------

# Newest linux-image-6.12.N+deb12-amd64-unsigned in the apt lists, printed as
# the kernel release string (6.12.N+deb12-amd64).
nvm__newest_kernel() {
	local re='^linux-image-6\.12\.[0-9]+\+deb12-amd64-unsigned$' list
	list=$(apt-cache search --names-only "$re" | awk '{print $1}')
	if [[ -z $list ]]; then
		nvm_log "apt lists have no 6.12 kernel yet; running apt-get update"
		apt-get update -q >&2 || nvm_log "warning: apt-get update reported errors"
		list=$(apt-cache search --names-only "$re" | awk '{print $1}')
	fi
	[[ -n $list ]] || nvm_die "no package matches $re (is bookworm-security in the apt sources?)"
	sed -e 's/^linux-image-//' -e 's/-unsigned$//' <<<"$list" | sort -V | tail -n1
}

# Download + unpack kernel $1 into $NVM_VM_CACHE/kernel/$1 (dpkg -x, depmod).
nvm__fetch_kernel() {
	local ver=$1 dest=$NVM_VM_CACHE/kernel/$1 tmp deb
	tmp=$(mktemp -d "$NVM_VM_CACHE/.dl.XXXXXX")
	nvm_log "downloading linux-image-$ver-unsigned (apt-get download; not installed on the host)"
	# Sandbox user root: the download dir is root-only, _apt could not write it.
	if ! (cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root "linux-image-$ver-unsigned" >&2); then
		nvm_log "download failed; refreshing apt lists and retrying"
		apt-get update -q >&2 || true
		(cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root "linux-image-$ver-unsigned" >&2) ||
			{ rm -rf "$tmp"; nvm_die "cannot download linux-image-$ver-unsigned"; }
	fi
	deb=$(echo "$tmp"/*.deb)
	rm -rf "$dest" "$dest.tmp"
	dpkg -x "$deb" "$dest.tmp"
	rm -rf "$tmp"
	[[ -f $dest.tmp/boot/vmlinuz-$ver && -d $dest.tmp/lib/modules/$ver ]] ||
		nvm_die "unexpected layout in linux-image-$ver-unsigned"
	# modprobe in the guest needs modules.dep & co for this tree.
	depmod -b "$dest.tmp" "$ver"
	mv "$dest.tmp" "$dest"
	touch "$dest/.complete"
}

# Sets NVM_PROMTOOL to Prometheus's `promtool` (the metrics test checks a scrape with it),
# unpacked from Debian's prometheus package into $NVM_VM_CACHE/promtool: installing the
# package would start a Prometheus server on the test machine.
nvm_ensure_promtool() {
	local dest=$NVM_VM_CACHE/promtool tmp
	NVM_PROMTOOL=$dest/usr/bin/promtool
	[[ -x $NVM_PROMTOOL ]] && return 0
	mkdir -p "$NVM_VM_CACHE"
	tmp=$(mktemp -d "$NVM_VM_CACHE/.dl.XXXXXX")
	nvm_log "downloading prometheus (apt-get download) for its promtool; not installed on the host"
	if ! (cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root prometheus >&2); then
		nvm_log "download failed; refreshing apt lists and retrying"
		apt-get update -q >&2 || true
		(cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root prometheus >&2) ||
			{ rm -rf "$tmp"; nvm_die "cannot download the prometheus package (for promtool)"; }
	fi
	rm -rf "$dest" "$dest.tmp"
	dpkg -x "$(echo "$tmp"/*.deb)" "$dest.tmp"
	rm -rf "$tmp"
	[[ -x $dest.tmp/usr/bin/promtool ]] || nvm_die "no usr/bin/promtool in the prometheus package"
	mv "$dest.tmp" "$dest"
}

# Sets NVM_KVER, NVM_KERNEL (vmlinuz), NVM_MODROOT (dir holding
# lib/modules/$NVM_KVER) and NVM_INITRD.  Downloads/rebuilds only when needed;
# serialised with a lock so concurrent runs can share the cache.
nvm_vm_prepare() {
	mkdir -p "$NVM_VM_CACHE/kernel"
	local lockfd
	exec {lockfd}>"$NVM_VM_CACHE/.lock"
	flock "$lockfd"

	local ver=${NVM_VM_KERNEL_VERSION:-}
	if [[ -z $ver && ${NVM_VM_KERNEL_REFRESH:-0} != 1 && -f $NVM_VM_CACHE/kernel/current ]]; then
		ver=$(<"$NVM_VM_CACHE/kernel/current")
		[[ -f $NVM_VM_CACHE/kernel/$ver/.complete ]] || ver=
	fi
	[[ -n $ver ]] || ver=$(nvm__newest_kernel)
	if [[ ! -f $NVM_VM_CACHE/kernel/$ver/.complete ]]; then
		nvm__fetch_kernel "$ver"
	fi
	if [[ $(cat "$NVM_VM_CACHE/kernel/current" 2>/dev/null) != "$ver" ]]; then
		echo "$ver" >"$NVM_VM_CACHE/kernel/current"
		# Keep the cache lean: drop kernels we no longer use.
		local d
		for d in "$NVM_VM_CACHE"/kernel/*/; do
			[[ $(basename "$d") == "$ver" ]] || rm -rf "$d"
		done
		rm -f "$NVM_VM_CACHE"/initramfs-*
	fi

	NVM_KVER=$ver
	NVM_MODROOT=$NVM_VM_CACHE/kernel/$ver
	NVM_KERNEL=$NVM_MODROOT/boot/vmlinuz-$ver
	NVM_INITRD=$NVM_VM_CACHE/initramfs-$ver.cpio.gz

	# Rebuild the initramfs when missing or when its recipe changed.
	local stamp
	stamp=$(cat "$NVM_VM_LIB_DIR/build-initramfs.sh" "$NVM_VM_LIB_DIR/initramfs-init.sh" \
		/bin/busybox | sha256sum | cut -c1-64)
	if [[ ! -f $NVM_INITRD || $(cat "$NVM_INITRD.stamp" 2>/dev/null) != "$stamp" ]]; then
		nvm_log "building initramfs for $ver"
		bash "$NVM_VM_LIB_DIR/build-initramfs.sh" "$NVM_MODROOT" "$ver" "$NVM_INITRD.tmp"
		mv "$NVM_INITRD.tmp" "$NVM_INITRD"
		echo "$stamp" >"$NVM_INITRD.stamp"
	fi
	flock -u "$lockfd"
	exec {lockfd}>&-
	export NVM_KVER NVM_KERNEL NVM_INITRD NVM_MODROOT
}

# ---------------------------------------------------------------------------
# Acceleration
# ---------------------------------------------------------------------------

# nvm__kvm_probe: 0 when a short boot under KVM ends cleanly.
nvm__kvm_probe() {
	local out pid i
	out=$(mktemp)
	# (group with stderr dropped: keeps bash's "Aborted" note quiet)
	{ qemu-system-x86_64 -accel kvm -cpu host -m 256 -nodefaults -display none -no-reboot \
		-serial null -kernel "$NVM_KERNEL" -append "panic=-1 console=ttyS0" \
		</dev/null >"$out" 2>&1 & } 2>/dev/null
	pid=$!
	# A broken KVM does not exit: QEMU prints "KVM internal error" and stops the guest. Stop
	# looking at once instead of waiting out the minute (CI machines are like that).
	for ((i = 0; i < 300; i++)); do
		kill -0 "$pid" 2>/dev/null || break
		if grep -q 'KVM internal error\|emulation failure' "$out"; then
			kill -KILL "$pid" 2>/dev/null
			break
		fi
		sleep 0.2
	done
	kill -KILL "$pid" 2>/dev/null
	local rc=0
	wait "$pid" 2>/dev/null || rc=$?
	rm -f "$out"
	return "$rc"
}

# Sets NVM_VM_ACCEL_ARGS.  KVM is used only if a short probe boot under KVM
# ends cleanly: on some nested hypervisors /dev/kvm exists but QEMU aborts
# ("failed to set MSR 0x10a").  The probe boots our kernel with no root fs and
# panic=-1, so it reboots at once and -no-reboot makes QEMU exit 0.
nvm_vm_detect_accel() {
	[[ -n ${NVM_VM_ACCEL_ARGS+x} ]] && return 0
	local accel=${NVM_VM_ACCEL:-}
	if [[ -z $accel ]]; then
		accel=tcg
		if [[ -r /dev/kvm && -w /dev/kvm ]] && nvm__kvm_probe; then
			accel=kvm
		fi
	fi
	# shellcheck disable=SC2054 # the commas are QEMU syntax
	# TCG without CMPXCHG16B: twice a guest died of a double fault right after the SLUB
	# fast path's cmpxchg16b in kmalloc, with EFLAGS holding pointer bits (a TCG emulation
	# fault, not guest code); without CX16 SLUB takes its locked path.
	case $accel in
	kvm) NVM_VM_ACCEL_ARGS=(-accel kvm -cpu host) ;;
	tcg) NVM_VM_ACCEL_ARGS=(-accel tcg,thread=multi -cpu max,cx16=off) ;;
	*) nvm_die "NVM_VM_ACCEL must be kvm or tcg, not '$accel'" ;;
	esac
	NVM_VM_ACCEL_NAME=$accel
	nvm_log "VM acceleration: $accel"
	[[ $accel != tcg ]] || nvm__host_tsc_khz
}

# nvm__host_tsc_khz: exports NVM_VM_TSC_KHZ, the host's TSC rate, for TCG guests'
# tsc_early_khz= (why: scripts/vm/host-tsc-khz.c). Empty when it cannot be measured; the
# guest then calibrates by itself as before.
nvm__host_tsc_khz() {
	[[ -z ${NVM_VM_TSC_KHZ+x} ]] || return 0
	NVM_VM_TSC_KHZ=
	local src=$NVM_VM_LIB_DIR/host-tsc-khz.c bin khz
	bin=$NVM_VM_CACHE/host-tsc-khz-$(sha256sum <"$src" | cut -c1-12)
	if [[ ! -x $bin ]] && ! cc -O2 -o "$bin.tmp" "$src" 2>/dev/null; then
		nvm_log "WARNING: cannot build $src; TCG guests calibrate their TSC themselves"
	else
		[[ -x $bin ]] || mv "$bin.tmp" "$bin"
		khz=$("$bin" 2>/dev/null) || khz=
		if [[ $khz =~ ^[0-9]+$ ]] && ((khz > 100000 && khz < 10000000)); then
			NVM_VM_TSC_KHZ=$khz
			nvm_log "host TSC: $khz kHz (passed to TCG guests as tsc_early_khz)"
		else
			nvm_log "WARNING: host TSC rate unmeasurable ('$khz'); TCG guests calibrate it themselves"
		fi
	fi
	export NVM_VM_TSC_KHZ
}

# ---------------------------------------------------------------------------
# Booting
# ---------------------------------------------------------------------------

nvm_vm_boot_usage() {
	cat <<'EOF'
nvm_vm_boot / scripts/vm/boot.sh [options] [-- CMD [ARGS...]]

Boots one VM with the host root (read-only, writable overlay in RAM), runs
CMD (an absolute path as seen on the host; same path in the guest) as root
and powers off.  Without CMD it starts an interactive bash on the console.

  --results DIR      host dir exported read-write at the same path (required
                     for nvm_vm_boot; boot.sh defaults to a fresh target dir)
  --name NAME        VM name (default vm): console-NAME.log, vm-NAME.conf,
                     guest-rc-NAME in DIR; use distinct names for 2-VM tests
  --mem MIB          guest RAM (default $NVM_VM_MEM or 2048)
  --cpus N           vCPUs (default $NVM_VM_CPUS or 2)
  --timeout SECS     hard VM timeout (default $NVM_VM_TIMEOUT or 3000)
  --nvdimm FILE[:SIZE]  emulated NVDIMM backed by FILE (created sparse if
                     missing; kept if present so contents survive VM kills).
                     Repeatable -> /dev/pmem0, /dev/pmem1, ...  Default: one,
                     DIR/pmem0-NAME.img of $NVM_VM_PMEM_SIZE (64M)
  --no-nvdimm        no NVDIMM at all
  --disk FILE        raw image as virtio-blk (/dev/vda, vdb, ... in order;
                     serial nvmdiskN), cache=none + share-rw=on + no locking
                     so two VMs can share it.  Repeatable.
  --net-listen PORT  virtio-net NIC (guest eth0) on a socket netdev listening
  --net-connect PORT   on / connecting to 127.0.0.1:PORT (two-VM link)
  --mac MAC          MAC for that NIC (default 52:54:00:4e:56:01 for listen,
                     ...:02 for connect)
  --guest-module M   modprobe M in the guest before CMD.  Repeatable.
  --env NAME=VALUE   extra environment for CMD.  Repeatable.
  --append STR       extra kernel command line
  --qemu-arg ARG     extra raw QEMU argument.  Repeatable.
  --interactive      console on this terminal (stdin), no output filter

Exit status: CMD's exit status; 124 if the VM hit the hard timeout; 125 if
the VM ended without CMD finishing (crash/panic/early error).
EOF
}

# nvm_vm_boot [options] [-- CMD ARGS...]   (requires nvm_vm_prepare first)
nvm_vm_boot() {
	local results='' name=vm mem=${NVM_VM_MEM:-2048} cpus=${NVM_VM_CPUS:-2}
	local timeout_s=${NVM_VM_TIMEOUT:-3000} no_nvdimm=0 interactive=0 append='' mac=''
	local nvdimms=() disks=() qemu_extra=() modules=() envs=() net=() cmd=()
	while (($#)); do
		case $1 in
		--results) results=$2; shift 2 ;;
		--name) name=$2; shift 2 ;;
		--mem) mem=$2; shift 2 ;;
		--cpus) cpus=$2; shift 2 ;;
		--timeout) timeout_s=$2; shift 2 ;;
		--nvdimm) nvdimms+=("$2"); shift 2 ;;
		--no-nvdimm) no_nvdimm=1; shift ;;
		--disk) disks+=("$2"); shift 2 ;;
		--net-listen) net=(listen "$2"); shift 2 ;;
		--net-connect) net=(connect "$2"); shift 2 ;;
		--mac) mac=$2; shift 2 ;;
		--guest-module) modules+=("$2"); shift 2 ;;
		--env) envs+=("$2"); shift 2 ;;
		--append) append+=" $2"; shift 2 ;;
		--qemu-arg) qemu_extra+=("$2"); shift 2 ;;
		--interactive) interactive=1; shift ;;
		--) shift; cmd=("$@"); break ;;
		*) nvm_vm_boot_usage >&2; nvm_die "nvm_vm_boot: unknown option '$1'" ;;
		esac
	done
	[[ -n $results ]] || nvm_die "nvm_vm_boot: --results DIR is required"
	[[ -n ${NVM_KERNEL:-} ]] || nvm_die "nvm_vm_boot: call nvm_vm_prepare first"
	mkdir -p "$results"
	results=$(cd "$results" && pwd)
	# These paths travel on the kernel command line (space-separated).
	[[ $results != *[[:space:]]* && $NVM_VM_LIB_DIR != *[[:space:]]* ]] ||
		nvm_die "paths with whitespace are not supported: $results / $NVM_VM_LIB_DIR"
	[[ $name =~ ^[A-Za-z0-9_.-]+$ ]] || nvm_die "bad VM name '$name'"
	((${#cmd[@]})) || interactive=1
	nvm_vm_detect_accel

	local machine=pc maxmem=$mem slots=0 i=0 spec file size
	local -a qargs=()
	if ((!no_nvdimm)) && ((${#nvdimms[@]} == 0)); then
		nvdimms=("$results/pmem0-$name.img:${NVM_VM_PMEM_SIZE:-64M}")
	fi
	for spec in "${nvdimms[@]}"; do
		file=${spec%%:*}
		size=64M
		[[ $spec == *:* ]] && size=${spec#*:}
		[[ -e $file ]] || truncate -s "$size" "$file"
		size=$(stat -c %s "$file")
		((size % (2 * 1024 * 1024) == 0)) || nvm_die "NVDIMM $file: size must be a multiple of 2 MiB"
		machine=pc,nvdimm=on
		slots=$((slots + 1))
		maxmem=$((maxmem + size / 1024 / 1024))
		qargs+=(-object "memory-backend-file,id=nvmem$i,share=on,mem-path=$file,size=$size"
			-device "nvdimm,id=nvdimm$i,memdev=nvmem$i")
		i=$((i + 1))
	done
	((slots)) && modules+=(nfit nd_pmem)
	i=0
	for file in "${disks[@]}"; do
		[[ -e $file ]] || nvm_die "disk image $file does not exist"
		qargs+=(-drive "file=$file,format=raw,if=none,id=disk$i,file.locking=off,cache=none"
			-device "virtio-blk-pci,drive=disk$i,share-rw=on,serial=nvmdisk$i")
		i=$((i + 1))
	done
	((${#disks[@]})) && modules+=(virtio_blk)
	if ((${#net[@]})); then
		[[ -n $mac ]] || { [[ ${net[0]} == listen ]] && mac=52:54:00:4e:56:01 || mac=52:54:00:4e:56:02; }
		qargs+=(-netdev "socket,id=n0,${net[0]}=127.0.0.1:${net[1]}"
			-device "virtio-net-pci,netdev=n0,mac=$mac")
		modules+=(virtio_net)
	fi
	local memarg=$mem
	((slots)) && memarg="$mem,slots=$((slots + 1)),maxmem=$((maxmem + 1024))M"

	# Guest configuration, read by guest-init.sh through the read-only root.
	local conf=$results/vm-$name.conf rcfile=$results/guest-rc-$name
	rm -f "$rcfile"
	{
		echo "# written by scripts/vm/lib.sh for VM '$name'"
		printf 'NVM_VM_NAME=%q\nNVM_KVER=%q\nNVM_MODROOT=%q\nNVM_RESULTS=%q\n' \
			"$name" "$NVM_KVER" "$NVM_MODROOT" "$results"
		declare -p modules envs cmd | sed -e 's/^declare -a modules/NVM_GUEST_MODULES/' \
			-e 's/^declare -a envs/NVM_GUEST_ENV/' -e 's/^declare -a cmd/NVM_GUEST_CMD/'
		printf 'NVM_GUEST_INTERACTIVE=%q\n' "$interactive"
	} >"$conf"

	local kcmd="console=ttyS0 quiet panic=-1 nvm_init=$NVM_VM_LIB_DIR/guest-init.sh nvm_conf=$conf$append"
	# Under TCG the clocksource watchdog, its readings delayed by the emulation, now and then
	# marks the TSC unstable mid-run; the kernel then patches its code (a static key of
	# sched_clock), and TCG's patching of code another vCPU runs panicked a guest ("Oops:
	# int3" in sched_clock_cpu, CI 2026-12-06). TCG's TSC comes from QEMU's one clock, so it
	# is trusted instead.
	# The boot-time calibration it would then trust can itself be far off on a loaded host,
	# so the host's measured rate is given instead (nvm__host_tsc_khz).
	if [[ ${NVM_VM_ACCEL_NAME:-} == tcg ]]; then
		kcmd+=" tsc=reliable"
		[[ -z ${NVM_VM_TSC_KHZ:-} ]] || kcmd+=" tsc_early_khz=$NVM_VM_TSC_KHZ"
	fi
	# shellcheck disable=SC2054 # the commas are QEMU syntax
	local -a qemu=(qemu-system-x86_64 "${NVM_VM_ACCEL_ARGS[@]}"
		-machine "$machine" -m "$memarg" -smp "$cpus"
		-nodefaults -display none -no-reboot
		-kernel "$NVM_KERNEL" -initrd "$NVM_INITRD" -append "$kcmd"
		-virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap
		-virtfs "local,path=$results,mount_tag=results,security_model=none"
		"${qargs[@]}" "${qemu_extra[@]}")

	local console=$results/console-$name.log rc=0
	echo "${qemu[*]}" >"$results/qemu-$name.cmd"
	if ((interactive)); then
		nvm_log "booting VM '$name' interactively (Ctrl-a x quits)"
		timeout --foreground "$timeout_s" "${qemu[@]}" -serial mon:stdio || rc=$?
	else
		nvm_log "booting VM '$name' ($NVM_VM_ACCEL_NAME, ${cpus} cpu, ${mem} MiB, timeout ${timeout_s}s); console: $console"
		local t0=$SECONDS
		# SIGTERM at the limit, SIGKILL 15 s later if QEMU ignores it.
		timeout -k 15 "$timeout_s" "${qemu[@]}" -serial stdio </dev/null 2>&1 |
			nvm__console_filter "$console" "$results/boot-seconds-$name" || rc=$?
		nvm_log "VM '$name' ended after $((SECONDS - t0))s (qemu/timeout status $rc)"
	fi
	if ((rc == 124 || rc == 137)); then
		nvm_log "VM '$name' hit the hard timeout of ${timeout_s}s and was killed"
		return 124
	fi
	if [[ -f $rcfile ]]; then
		return "$(<"$rcfile")"
	fi
	nvm_log "VM '$name' ended without its command finishing (crash, panic or boot failure; see $console)"
	return 125
}

# Copies the console to a log (CRs stripped) and to stdout, and records how
# long the guest took to become ready (NVM-VM-READY marker from guest-init.sh).
nvm__console_filter() {
	local log=$1 bootfile=$2 line t0=$EPOCHREALTIME
	: >"$log"
	while IFS= read -r line || [[ -n $line ]]; do
		line=${line//$'\r'/}
		printf '%s\n' "$line" >>"$log"
		[[ ${NVM_VM_QUIET:-0} == 1 ]] || printf '  | %s\n' "$line"
		if [[ $line == NVM-VM-READY* ]]; then
			awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f\n", b - a }' >"$bootfile"
		fi
	done
}
