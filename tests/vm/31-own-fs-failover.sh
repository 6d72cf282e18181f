#!/bin/bash
# Shared-nothing mode (issue #17): ext4, xfs and btrfs on the mirrored device across a
# failover, each mounted on one node at a time.  Two daemons with `storage = "own"` (each its
# own medium, a small shared arbiter), the mirror link over TCP.  For each filesystem:
# 1. mkfs and mount on node-a's /dev/ublkb0 (range 1 is forwarded to node-b); files are
#    written and synced, then node-a's flusher is paused and more files are written and
#    synced: those acknowledged writes exist only in the two NVRAMs.
# 2. kill -9 node-a with the filesystem mounted: node-b takes node-a's range over and replays
#    node-a's mirrored writes into ITS medium.
# 3. On node-b's /dev/ublkb1: mount (the journal replays), every file's sha256 matches what
#    was acknowledged, umount, and the filesystem's own checker finds it clean.
# 4. node-a restarts; node-b resyncs what node-a's medium missed and gives range 0 back.
#    The next filesystem is made on node-a again; after the last one node-a mounts it and
#    reads every file back through its resynced medium, and after a drain both media are
#    byte-identical (cmp).
# CI makes one filesystem (btrfs; ext4, xfs and btrfs under kill -9 with the shared medium
# are test 42's); NVM_SOAK=1 makes all three in turn.
# vm-timeout: 480
source "$NVM_REPO/tests/vm/lib/nvm.sh"
nvm_init
for t in mkfs.ext4 mkfs.xfs mkfs.btrfs btrfs xfs_repair; do
	command -v $t >/dev/null || skip "$t is not installed (scripts/test.sh installs btrfs-progs and xfsprogs)"
done
modprobe -a xfs btrfs || fail "modprobe xfs btrfs"
filesystems=(btrfs)
[[ ${NVM_SOAK:-0} == 1 ]] && filesystems=(ext4 xfs btrfs)
# xfsprogs refuses filesystems below 300 MB.
lun_mib=320
arbiter=$(nvm_medium arbiter 4)
ma=$(nvm_medium medium-a $lun_mib)
mb=$(nvm_medium medium-b $lun_mib)
for n in a b; do
	medium=$ma
	[[ $n == b ]] && medium=$mb
	nvm_own_storage_config $n "$medium" "$arbiter" $lun_mib 7861
	# The writes staged while node-a's flusher is paused (files plus the filesystem's
	# journal and metadata) must fit in range 0's partition: 128 MiB of NVRAM gives each of
	# the 4 partitions 16 MiB (half the NVRAM is the second store).
	sed -i 's/^size = "48MiB"/size = "128MiB"/' node-$n.toml
	grep -q '^size = "128MiB"' node-$n.toml || fail "node-$n.toml: the NVRAM size did not change"
	# A link that drops while node-a's flusher is paused marks node-b's medium outdated for
	# range 0 (a batch missed it), and node-b may then not take the range over: that is
	# right, but not this test's scenario.  Under TCG a busy host stalls a link thread for
	# more than a second now and then: 3 s, as the two-VM tests use.
	sed -i 's/^heartbeat_interval_ms = .*/heartbeat_interval_ms = 250/; s/^heartbeat_timeout_ms = .*/heartbeat_timeout_ms = 3000/' node-$n.toml
done

# owners NODE: the owners of both ranges as node-NODE sees them, "owner/state,owner/state".
owners() { nvm_field $1 '",".join(x["owner"] + "/" + x["state"] for x in e["ranges"])'; }
start_a() {
	nvm_start node-a.toml daemon-a.log
	pid_a=$NVM_LAST_PID
}
sums() { (cd mnt && find . -type f ! -path './lost+found/*' -exec sha256sum {} + | sort -k2); }
fs_check() { # FS DEV: the filesystem's own checker, read-only
	case $1 in
	ext4) fsck.ext4 -fn "$2" ;;
	xfs) xfs_repair -n "$2" ;;
	btrfs) btrfs check --readonly "$2" ;;
	esac >"fsck-$1.log" 2>&1 || { cat "fsck-$1.log"; fail "$1: the checker finds problems on $2 after the failover"; }
}

start_a
nvm_start node-b.toml daemon-b.log
pid_b=$NVM_LAST_PID
nvm_wait_link
mkdir -p mnt
for fs in "${filesystems[@]}"; do
	say "--- $fs: mkfs and files on node-a's /dev/ublkb0"
	case $fs in
	ext4) mkfs.ext4 -q -F -E nodiscard /dev/ublkb0 ;;
	xfs) mkfs.xfs -q -f -K /dev/ublkb0 ;;
	btrfs) mkfs.btrfs -q -f -K /dev/ublkb0 >/dev/null ;;
	esac || fail "mkfs.$fs on /dev/ublkb0"
	mount /dev/ublkb0 mnt || fail "mount $fs from node-a"
	mkdir mnt/flushed mnt/staged
	for i in $(seq 1 12); do head -c $((i * 41 * 1024 + 7)) /dev/urandom >"mnt/flushed/f$i"; done
	dd if=/dev/urandom of=mnt/flushed/big bs=1M count=12 status=none
	sync -f mnt
	"$NVMCTL" --config node-a.toml drain --timeout 60 >/dev/null || fail "drain node-a"
	"$NVMCTL" --config node-a.toml flush pause >/dev/null || fail "flush pause on node-a"
	# From here node-a's acknowledged writes live only in the two NVRAMs.
	for i in $(seq 1 16); do
		head -c $((i * 13 * 1024 + 3)) /dev/urandom >"mnt/staged/s$i"
		sync -d "mnt/staged/s$i"
	done
	dd if=/dev/urandom of=mnt/staged/big bs=1M count=3 conv=fsync status=none
	sync -f mnt
	sums >"sums-$fs.acked"
	unflushed=$(nvm_field a 'sum(p["records_unflushed"] for p in e["partitions"])')
	((unflushed > 0)) || fail "$fs: node-a's log holds no unflushed record before the kill"
	stale=$(nvm_field b 'e["outdated_media"]')
	[[ $stale == "{}" ]] || fail "$fs: the mirror link dropped during the writes (node-b's medium is marked outdated: $stale), so node-b could not take the range over; not this test's scenario"

	say "$fs: kill -9 node-a ($unflushed record(s) unflushed, the filesystem mounted)"
	kill -9 "$pid_a"
	nvm_wait_gone "$pid_a"
	for _ in $(seq 300); do
		[[ $(owners b) == "node-b/local,node-b/local" ]] && break
		sleep 0.1
	done
	[[ $(owners b) == "node-b/local,node-b/local" ]] ||
		{ tail -20 daemon-b.log; fail "$fs: node-b did not take node-a's range over: $(owners b)"; }
	replayed=$(nvm_field b '(e.get("takeover") or {}).get("records_done", 0)')
	"$NVMCTL" del 0 >/dev/null 2>&1 || true
	umount -l mnt
	nvm_wait_dev_gone 0

	mount /dev/ublkb1 mnt || { dmesg | tail -20; fail "$fs: mount on node-b after the takeover"; }
	sums >"sums-$fs.b"
	umount mnt
	diff -u "sums-$fs.acked" "sums-$fs.b" || fail "$fs: a file differs on node-b from what node-a acknowledged"
	fs_check $fs /dev/ublkb1
	say "ok: $fs on node-b: $(wc -l <"sums-$fs.acked") files match, $replayed record(s) replayed, the checker finds it clean"

	say "$fs: node-a restarts, node-b resyncs its medium and gives range 0 back"
	resyncs_before=$(grep -c 'resync: LUN' daemon-b.log || true)
	start_a
	nvm_wait_link
	for _ in $(seq 600); do
		[[ $(nvm_field b 'e["outdated_media"]') == "{}" ]] && break
		sleep 0.2
	done
	[[ $(nvm_field b 'e["outdated_media"]') == "{}" ]] ||
		{ tail -20 daemon-b.log; fail "$fs: node-b's resync did not clear node-a's outdated marks: $(nvm_field b 'e["outdated_media"]')"; }
	"$NVMCTL" --config node-b.toml giveback --timeout 60 >/dev/null || fail "$fs: giveback to node-a"
	[[ $(owners a) == "node-a/local,node-b/remote" ]] || fail "$fs: after the giveback node-a sees $(owners a)"
	say "ok: range 0 back on node-a after the resync: $(grep -h 'resync: LUN' daemon-b.log | tail -n +$((resyncs_before + 1)) | sed 's/^.*resync: //; s/;.*//' | tr '\n' ' ')"
done

say "node-a mounts the last filesystem ($fs) again: its range now comes from its resynced medium"
mount /dev/ublkb0 mnt || fail "mount $fs on node-a after the giveback"
sums >"sums-$fs.a"
umount mnt
diff -u "sums-$fs.acked" "sums-$fs.a" || fail "$fs: a file differs through node-a after the resync and the giveback"
"$NVMCTL" --config node-a.toml drain --timeout 60 >/dev/null || fail "drain node-a"
"$NVMCTL" --config node-b.toml drain --timeout 60 >/dev/null || fail "drain node-b"
blockdev --flushbufs "$ma" "$mb"
echo 3 >/proc/sys/vm/drop_caches
cmp -n $((lun_mib << 20)) "$ma" "$mb" || fail "the two media differ after the last failover, the resync and a drain"
say "PASS: ${filesystems[*]} each survived a kill -9 of the node that had it mounted (files match, checker clean); both media identical"
