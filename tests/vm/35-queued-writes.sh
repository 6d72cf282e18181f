#!/bin/bash
# Issue 17, item 2 (claim set B: "a write without priority is queued until granted"): with
# [cluster.write_priority] queue_writes = true, a write to a range the other node holds is
# not forwarded: it waits until the holder hands the range over (after holding it for
# min_hold_ms), then is staged where it was written. Two daemons, each its own medium (TCP,
# two ranges: range 0 node-a's, range 1 node-b's).
#  1. node-b writes only into node-a's range 0: its first write waits, range 0 moves to
#     node-b (new epoch), and no write is forwarded. fio verifies through both devices.
#  2. Both nodes write the same 64 blocks of range 0 at once: they take turns holding it
#     (moves counted), no write is forwarded, every write is acknowledged, and after a drain
#     each block holds a value a single disk could hold, the same through both devices and
#     on both media, and both media are identical.
# vm-timeout: 300
source "$NVM_REPO/tests/vm/lib/nvm.sh"
nvm_init
arbiter=$(nvm_medium arbiter 4)
ma=$(nvm_medium medium-a 40)
mb=$(nvm_medium medium-b 40)
lun_mib=32
for n in a b; do
	m=$ma
	[[ $n == b ]] && m=$mb
	nvm_own_storage_config $n "$m" "$arbiter" $lun_mib 7853
	# Two daemons on 2 TCG vCPUs: as in test 29.
	sed -i 's/^heartbeat_timeout_ms = .*/heartbeat_timeout_ms = 3000/' node-$n.toml
	cat >>node-$n.toml <<-CFG

	[cluster.write_priority]
	queue_writes = true
	min_hold_ms = 300
	queue_timeout_ms = 60000
	CFG
done
"$NVMCTL" config check node-a.toml >/dev/null || fail "config check of node-a.toml"
nvm_start node-a.toml daemon-a.log
nvm_start node-b.toml daemon-b.log
nvm_wait_link

owner0() { nvm_field "$1" 'e["ranges"][0]["owner"] + "/" + str(e["ranges"][0]["epoch"])'; }
queued() { nvm_field "$1" 'str(e["writes_queued"]) + "/" + str(e["writes_queued_then_forwarded"])'; }
moves() { nvm_field "$1" 'e["write_priority_moves"]'; }
[[ $(owner0 a) == node-a/* ]] || fail "range 0 should start as node-a's: $(owner0 a)"
[[ $(nvm_field b 'e["write_priority_queues"]') == True ]] || fail "node-b's status does not say writes queue"
epoch0=$(owner0 a)
epoch0=${epoch0#*/}

say "1. node-b writes only into node-a's range 0: its writes wait for the range, none is forwarded"
first=(--name=b-first --direct=1 --ioengine=libaio --iodepth=8 --rw=randwrite --bs=4k
	--offset=0 --size=8M --number_ios=1500 --randseed=3501
	--verify=crc32c --verify_fatal=1 --verify_state_save=1)
fio "${first[@]}" --filename=/dev/ublkb1 --do_verify=0 --output=fio-b-first.log ||
	{ cat fio-b-first.log; fail "fio through node-b"; }
[[ $(owner0 a) == node-b/* && $(owner0 b) == node-b/* ]] ||
	fail "range 0 did not move to node-b: a says $(owner0 a), b says $(owner0 b)"
epoch1=$(owner0 b)
epoch1=${epoch1#*/}
((epoch1 > epoch0)) || fail "range 0 moved without a new epoch ($epoch0 -> $epoch1)"
q=$(queued b)
[[ ${q%/*} -ge 1 && ${q#*/} == 0 ]] || fail "node-b's queued/forwarded writes are $q: expected some queued, none forwarded"
say "range 0 moved to node-b at epoch $epoch1 (was $epoch0); node-b: $q writes queued/forwarded"
for dev in /dev/ublkb0 /dev/ublkb1; do
	fio "${first[@]}" --filename=$dev --verify_only=1 --verify_state_load=1 \
		--output="verify-b-first-${dev##*/}.log" ||
		{ cat "verify-b-first-${dev##*/}.log"; fail "a write of step 1 does not read back through $dev"; }
done

say "2. both nodes write the same 64 blocks of range 0 at once: they take turns"
moves_before=$(($(moves a) + $(moves b)))
O="python3 $NVM_REPO/tests/vm/lib/overlap.py"
# Blocks 12 MiB in: inside range 0, apart from step 1's first 8 MiB.
blk=3072
$O write /dev/ublkb0 a $blk 64 8 3511 overlap-a.log &
wa=$!
$O write /dev/ublkb1 b $blk 64 8 3512 overlap-b.log || fail "the overlapping writer on node-b failed"
wait $wa || fail "the overlapping writer on node-a failed"
# Each hand-over is counted by both nodes (the giver and the one it went to).
turns=$((($(moves a) + $(moves b) - moves_before) / 2))
acks_a=$(grep -c '^ack' overlap-a.log)
acks_b=$(grep -c '^ack' overlap-b.log)
say "node-a $acks_a and node-b $acks_b writes acknowledged; range 0 was handed over $turns time(s); queued/forwarded: node-a $(queued a), node-b $(queued b)"
((acks_a > 0 && acks_b > 0)) || fail "a writer got no write acknowledged"
grep -q '^err' overlap-a.log overlap-b.log && fail "a write failed: $(grep -h '^err' overlap-a.log overlap-b.log | head -3)"
((turns >= 2)) || fail "range 0 was handed over $turns time(s) while both wrote it: the writers did not take turns"
for n in a b; do
	q=$(queued $n)
	[[ ${q#*/} == 0 ]] || fail "node-$n forwarded $q (queued/forwarded) writes: a queued write must wait for the range"
done
nvm_drain_both "after the overlapping writers"
nvm_overlap_check $blk 64 "$ma" "$mb"
nvm_same_media $lun_mib "$ma" "$mb" || fail "the two media differ after the overlapping writers and a drain"
for dev in /dev/ublkb0 /dev/ublkb1; do
	fio "${first[@]}" --filename=$dev --verify_only=1 --verify_state_load=1 \
		--output="verify-b-first-again-${dev##*/}.log" ||
		{ cat "verify-b-first-again-${dev##*/}.log"; fail "a write of step 1 no longer reads back through $dev"; }
done
say "PASS: writes without priority waited for range 0 and none was forwarded; two writers took turns ($turns hand-overs) and both media are identical"
