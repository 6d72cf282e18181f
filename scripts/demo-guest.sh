#!/bin/bash
# Runs inside the VM (see scripts/demo.sh). Single node for now: the two-node story
# (mirroring, a node killed, the partner takes over) comes with the mirroring work.
set -euo pipefail
BIN=${NVM_BIN:?}
work=$(mktemp -d /tmp/nvmirror-demo.XXXX)
cd "$work"
step() { printf '\n==> %s\n' "$*"; }
die() { printf '\nDEMO FAILED: %s\n' "$*"; exit 1; }

modprobe ublk_drv
nvram=${NVM_PMEM:-}
if [[ -z $nvram && -b /dev/pmem0 ]]; then nvram=/dev/pmem0; fi
[[ -n $nvram ]] || { nvram=$work/nvram.img; echo "(no NVDIMM: NVRAM is a file)"; }
dd if=/dev/zero of="$nvram" bs=1M count=1 status=none
truncate -s 512M medium.img
medium=$(losetup --find --show medium.img)
cat >node.toml <<CFG
[node]
name = "demo-node"

[nvram]
path = "$nvram"     # an emulated NVDIMM: persistent memory
size = "48MiB"
partitions = 4

[[lun]]
name = "lun0"
medium = "$medium"  # the storage medium behind the LUN
device_id = 0
CFG
step "config ($work/node.toml):"
cat node.toml

step "start nvmirrord: it formats the NVRAM and serves /dev/ublkb0"
"$BIN/nvmirrord" --config node.toml 2>daemon.log &
pid=$!
"$BIN/nvmirrorctl" --config node.toml wait --timeout 60
step "mkfs.ext4 and mount"
mkfs.ext4 -q -F /dev/ublkb0
mkdir mnt && mount /dev/ublkb0 mnt
step "write 40 files and fsync each one: each fsync returning = acknowledged"
for i in $(seq 1 40); do
	head -c $((i * 16 * 1024)) /dev/urandom >"mnt/file$i"
	sync -d "mnt/file$i"
done
sync -f mnt
(cd mnt && sha256sum file*) >acked.sha256
"$BIN/nvmirrorctl" --config node.toml status

step "pause the flusher so acknowledged writes stay only in the NVRAM, write more, then kill -9 the daemon mid-write"
"$BIN/nvmirrorctl" --config node.toml flush pause
# Small enough to fit in the NVRAM while the flusher is paused (a full NVRAM would make
# writers wait for the flusher: back-pressure).
for i in $(seq 41 60); do
	head -c $((i * 1024)) /dev/urandom >"mnt/file$i"
	sync -d "mnt/file$i"
	(cd mnt && sha256sum "file$i") >>acked.sha256
done
dd if=/dev/urandom of=mnt/unacked bs=64k count=32 status=none &
writer=$!
sleep 1
"$BIN/nvmirrorctl" --config node.toml status | sed -n '/PART/,/^$/p'
kill -9 "$pid"
echo "nvmirrord (pid $pid) killed with SIGKILL; /dev/ublkb0 stays, its I/O waits (ublk user recovery)"
sleep 1

step "restart nvmirrord: it replays the NVRAM into the medium, then re-attaches /dev/ublkb0"
"$BIN/nvmirrord" --config node.toml 2>>daemon.log &
pid=$!
"$BIN/nvmirrorctl" --config node.toml wait --timeout 60
wait "$writer" || true
grep -E "replayed|recovering|live" daemon.log | tail -4
"$BIN/nvmirrorctl" --config node.toml status | head -6

step "every acknowledged file is intact (same mount, then again after fsck and a remount)"
(cd mnt && sha256sum -c --quiet ../acked.sha256) || die "an acknowledged file differs"
echo "$(wc -l <acked.sha256) acknowledged files: all match"
umount mnt
fsck.ext4 -fn /dev/ublkb0 >fsck.log 2>&1 || { cat fsck.log; die "fsck found problems"; }
echo "fsck.ext4 -fn: clean"
mount /dev/ublkb0 mnt
(cd mnt && sha256sum -c --quiet ../acked.sha256) || die "an acknowledged file differs after remount"
echo "after remount: all $(wc -l <acked.sha256) acknowledged files match"
umount mnt
kill -TERM "$pid"
wait "$pid" || true
losetup -d "$medium"
step "DEMO OK: no acknowledged write was lost across the crash"
