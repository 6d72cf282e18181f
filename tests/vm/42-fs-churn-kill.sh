#!/bin/bash
# Filesystems across a kill -9 of the owner (issue #19 item 2), two nodes sharing one medium.
# node-a's /dev/ublkb0 is cut into three dm-linear slices holding ext4, xfs and btrfs at
# once (tests/vm/lib/fs-churn.sh): ext4 in range 0 (node-a's), btrfs in range 1 (node-b's:
# node-a forwards those writes), xfs across both.  A metadata-heavy load
# (tests/vm/lib/fs_churn.py: many small files created, overwritten, truncated, renamed and
# unlinked, directories made, each step fsync'ed as an application would, plus never
# fsync'ed noise) runs on all three; halfway node-a's flusher is paused, so the last
# acknowledged writes exist only in the two NVRAMs; then node-a's daemon is killed with the
# load running.  node-b takes range 0 over and replays node-a's mirrored writes.  The same
# slices over node-b's /dev/ublkb1 are mounted (journals and logs replay), every fsync'ed
# file has the content fsync acknowledged, every fsync'ed unlink and rename left the old
# name absent, and after umount fsck.ext4 -fn, xfs_repair -n and btrfs check find nothing
# wrong.  The power-cut version is tests/twovm/44-power-cut-fs.sh.
# Knob: NVM_CHURN_SECONDS (10): load before the flusher pauses, and again before the kill.
# vm-timeout: 360
source "$NVM_REPO/tests/vm/lib/nvm.sh"
source "$NVM_REPO/tests/vm/lib/fs-churn.sh"
nvm_init
churn_require
load_s=${NVM_CHURN_SECONDS:-10}

medium=$(nvm_medium shared $CHURN_LUN_MIB)
for n in a b; do
	nvm_cluster_config $n "$medium" auto tcp 127.0.0.1 7871
	# The load staged while node-a's flusher is paused must fit in range 0's partitions.
	sed -i 's/^size = "48MiB"/size = "128MiB"/' node-$n.toml
	grep -q '^size = "128MiB"' node-$n.toml || fail "node-$n.toml: the NVRAM size did not change"
	# Under TCG a busy host stalls a link thread for more than a second now and then.
	sed -i 's/^heartbeat_interval_ms = .*/heartbeat_interval_ms = 250/; s/^heartbeat_timeout_ms = .*/heartbeat_timeout_ms = 3000/' node-$n.toml
done
nvm_extra_cleanup() { churn_cleanup; }
nvm_start node-a.toml daemon-a.log
pid_a=$NVM_LAST_PID
nvm_start node-b.toml daemon-b.log
nvm_wait_link

churn_start /dev/ublkb0 a "$PWD"
sleep "$load_s"
"$NVMCTL" --config node-a.toml flush pause >/dev/null || fail "flush pause on node-a"
say "node-a's flusher paused: from here its acknowledged writes live only in the two NVRAMs"
sleep "$load_s"
churn_alive
unflushed=$(nvm_field a 'sum(p["records_unflushed"] for p in e["partitions"])')
((unflushed > 0)) || fail "node-a's log holds no unflushed record before the kill"

say "kill -9 node-a with the loads running ($unflushed record(s) unflushed; durable operations so far: $(churn_journal_lines "$PWD"))"
kill -9 "$pid_a"
nvm_wait_gone "$pid_a"
owners() { nvm_field b '",".join(x["owner"] + "/" + x["state"] for x in e["ranges"])'; }
for _ in $(seq 300); do
	[[ $(owners) == "node-b/local,node-b/local" ]] && break
	sleep 0.1
done
[[ $(owners) == "node-b/local,node-b/local" ]] || { tail -20 daemon-b.log; fail "node-b did not take node-a's range over: $(owners)"; }
replayed=$(nvm_field b '(e.get("takeover") or {}).get("records_done", 0)')
say "node-b serves the whole LUN ($replayed record(s) of node-a's replayed); node-a's dead device goes"
# The loads are blocked on the dead device; deleting it fails their I/O.
"$NVMCTL" del 0 >/dev/null 2>&1 || true
churn_teardown a
nvm_wait_dev_gone 0

churn_verify /dev/ublkb1 b "$PWD"
say "PASS: ext4, xfs and btrfs under a metadata-heavy load survived a kill -9 of their node: every fsync'ed change is there through the survivor ($replayed record(s) replayed), every checker clean"
