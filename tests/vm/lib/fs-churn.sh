# shellcheck shell=bash
# tests/vm/lib/fs-churn.sh - ext4, xfs and btrfs at once on one mirrored device, under the
# metadata-heavy load of fs_churn.py, and the checks after a crash.  Sourced (inside a VM)
# by tests/vm/42-fs-churn-kill.sh (kill -9) and tests/twovm/guest/power-cut-node.sh with
# NVM_PC_LOAD=fs (power cut); the caller defines say and fail and runs in a scratch dir.
#
# The device is cut into three dm-linear slices, /dev/mapper/churn-FS-SUFFIX, so that one
# crash hits all three filesystems with their loads running.  With a 640 MiB LUN of two
# ranges (split at 320 MiB) ext4 lies in range 0, btrfs in range 1 and xfs across both
# (xfsprogs refuses filesystems below 300 MB).
#   churn_require                 skip unless the tools and modules are there
#   churn_start DEV SUFFIX JDIR   slices over DEV, mkfs, mount on ./mnt/FS, a load on each
#                                 (journals JDIR/journal-FS; pids in churn_pids)
#   churn_alive                   fail unless every load still runs
#   churn_journal_lines JDIR      "ext4 N xfs N btrfs N": operations made durable so far
#   churn_teardown SUFFIX         after the node under them died: stop the loads, umount,
#                                 remove the slices (the caller deletes the dead device
#                                 first so that their blocked I/O fails)
#   churn_verify DEV SUFFIX JDIR  slices over DEV (the survivor's device), mount, every
#                                 fsync'ed change checked, umount, the filesystem's checker

CHURN_PY=$(dirname "${BASH_SOURCE[0]}")/fs_churn.py
CHURN_LUN_MIB=640
churn_slices=("ext4 0 96" "xfs 96 320" "btrfs 416 208") # name, start MiB, length MiB
churn_pids=()

churn_require() {
	local t
	for t in mkfs.ext4 mkfs.xfs mkfs.btrfs btrfs xfs_repair fsck.ext4 dmsetup python3; do
		command -v $t >/dev/null || skip "$t is not installed (scripts/test.sh installs e2fsprogs, xfsprogs, btrfs-progs and dmsetup)"
	done
	modprobe -a xfs btrfs dm_mod || fail "modprobe xfs btrfs dm_mod"
}

churn_slices_on() { # DEV SUFFIX
	local s name start len
	for s in "${churn_slices[@]}"; do
		read -r name start len <<<"$s"
		dmsetup create "churn-$name-$2" --table "0 $((len * 2048)) linear $1 $((start * 2048))" ||
			fail "dmsetup create churn-$name-$2 over $1"
		# No udev in the test VMs: dmsetup makes the /dev/mapper node itself.
		dmsetup mknodes "churn-$name-$2" && [[ -b /dev/mapper/churn-$name-$2 ]] ||
			fail "no /dev/mapper/churn-$name-$2 after dmsetup mknodes"
	done
}

churn_start() { # DEV SUFFIX JDIR
	local s fs seed=1
	churn_slices_on "$1" "$2"
	churn_pids=()
	for s in "${churn_slices[@]}"; do
		read -r fs _ <<<"$s"
		case $fs in
		ext4) mkfs.ext4 -q -F -E nodiscard "/dev/mapper/churn-$fs-$2" ;;
		xfs) mkfs.xfs -q -f -K "/dev/mapper/churn-$fs-$2" ;;
		btrfs) mkfs.btrfs -q -f -K "/dev/mapper/churn-$fs-$2" >/dev/null ;;
		esac || fail "mkfs.$fs on /dev/mapper/churn-$fs-$2"
		mkdir -p "mnt/$fs"
		mount "/dev/mapper/churn-$fs-$2" "mnt/$fs" || fail "mount $fs (/dev/mapper/churn-$fs-$2)"
		mkdir "mnt/$fs/churn"
		python3 "$CHURN_PY" run "mnt/$fs/churn" "$3/journal-$fs" --seed $((seed++)) 2>"churn-$fs.log" &
		churn_pids+=($!)
	done
	say "ext4, xfs and btrfs on slices of $1; a metadata-heavy load runs on each"
}

churn_alive() {
	local p
	for p in "${churn_pids[@]}"; do
		kill -0 "$p" 2>/dev/null || { cat churn-*.log; fail "a load stopped before the crash"; }
	done
}

churn_journal_lines() { # JDIR
	local s fs out=()
	for s in "${churn_slices[@]}"; do
		read -r fs _ <<<"$s"
		out+=("$fs" "$(grep -c '^[PAD] ' "$1/journal-$fs")")
	done
	echo "${out[*]}"
}

churn_teardown() { # SUFFIX
	local s fs p
	kill -9 "${churn_pids[@]}" 2>/dev/null || true
	for p in "${churn_pids[@]}"; do
		for _ in $(seq 300); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
		kill -0 "$p" 2>/dev/null && fail "load $p still alive 30 s after its device died"
	done
	for s in "${churn_slices[@]}"; do
		read -r fs _ <<<"$s"
		umount "mnt/$fs" 2>/dev/null || umount -l "mnt/$fs"
		dmsetup remove --retry "churn-$fs-$1" >/dev/null 2>&1 || dmsetup remove --force "churn-$fs-$1" ||
			fail "dmsetup remove churn-$fs-$1"
	done
	# btrfs remembers the device it scanned under the dead slice; the same filesystem
	# appears under another path next.
	btrfs device scan --forget >/dev/null 2>&1 || true
}

churn_fs_check() { # FS DEV: the filesystem's own checker, read-only
	case $1 in
	ext4) fsck.ext4 -fn "$2" ;;
	xfs) xfs_repair -n "$2" ;;
	btrfs) btrfs check --readonly "$2" ;;
	esac >"fsck-$1.log" 2>&1 || { tail -40 "fsck-$1.log"; fail "$1: the checker finds problems on $2 after the crash"; }
}

churn_verify() { # DEV SUFFIX JDIR
	local s fs result
	churn_slices_on "$1" "$2"
	mkdir -p mnt
	for s in "${churn_slices[@]}"; do
		read -r fs _ <<<"$s"
		mkdir -p "mnt/$fs"
		mount "/dev/mapper/churn-$fs-$2" "mnt/$fs" || { dmesg | tail -20; fail "$fs: mount through $1 after the crash"; }
		result=$(python3 "$CHURN_PY" check "mnt/$fs/churn" "$3/journal-$fs") ||
			{ echo "$result"; fail "$fs: an fsync'ed change is lost or wrong through $1"; }
		say "ok: $fs: $result"
		umount "mnt/$fs" || fail "umount $fs"
		churn_fs_check "$fs" "/dev/mapper/churn-$fs-$2"
		say "ok: $fs: $(case $fs in ext4) echo fsck.ext4 -fn ;; xfs) echo xfs_repair -n ;; btrfs) echo btrfs check ;; esac) finds it clean"
	done
}

churn_cleanup() { # for EXIT traps: whatever is left of the mounts and slices
	local m
	for m in mnt/*; do umount -l "$m" 2>/dev/null || true; done
	dmsetup ls 2>/dev/null | awk '/^churn-/ {print $1}' | xargs -r -n1 dmsetup remove --force 2>/dev/null || true
}
