#!/bin/bash
# The quorum arbiter (issue #17): `storage = "own"` with `[cluster.voters]` instead of an
# arbiter device. The ownership table and the leases live on a majority of three voters:
# each daemon's own, and a diskless nvmirror-tiebreaker. node-b reaches node-a's mirror link
# and vote link through silent proxies (tests/vm/lib/partition.py), so the pair can be cut
# while both reach the tie-breaker.
# 0. `config check` names the voters; a node without voter state refuses to start and names
#    `nvmirrorctl init-voter`, which creates it once and refuses a second time; so does
#    `nvmirror-tiebreaker --create-state` (the systemd unit's first set-up).
# 1. fio writes through node-a (node-b's range forwarded); drained, both media are equal.
# 2. The tie-breaker is killed (-9): both nodes keep their leases through each other's
#    voter for longer than a lease, and node-b's writes to both ranges go on (and read back
#    through node-a). It restarts from its state.
# 3. The pair is cut (mirror and vote links) with both nodes alive, for two and a half times
#    the time after which a node counts as dead: each still sees the other's heartbeat
#    through the tie-breaker, so no range moves on either node (no split brain), and both
#    keep their leases. The cut heals and both mirror again.
# 3b. node-a is cut off from both other voters (the pair's vote link and its link to the
#    tie-breaker) with the mirror link up, for two and a half times the dead-after time: its
#    lease runs out, but node-b still hears it over the mirror link and vouches for it, so
#    node-a goes on serving its range (a write through it reads back) and nothing moves.
# 4. node-a's flusher is paused, 300 blocks written, node-a killed (-9): node-b takes over
#    with its voter and the tie-breaker (2 of 3) and every acknowledged write verifies
#    through node-b.
# 5. node-a restarts: node-b resyncs its medium, the giveback works, every write verifies
#    through both devices and after a drain both media are equal.
# 5b. The tie-breaker's disk dies: its state is replaced from copies of both nodes' voter
#    states (`--create-state --seed-from`; a copy of its own old state is refused), and the
#    new tie-breaker is the third voter of step 6.
# 6. node-a is cut off from node-b and from the tie-breaker (its link to the tie-breaker runs
#    through a proxy too) while a write through node-a is under way: node-b takes node-a's
#    range with the tie-breaker, node-a's lease runs out, and the write is either not
#    acknowledged or reads back through node-b. The cut heals: node-a serves nothing of its
#    own, and the earlier writes verify through both devices.
# vm-timeout: 400
source "$NVM_REPO/tests/vm/lib/nvm.sh"
nvm_init
P="python3 $NVM_REPO/tests/vm/lib/partition.py"
TB=$NVM_BIN/nvmirror-tiebreaker
[[ -x $TB ]] || fail "$TB missing (cargo build --release --workspace --bins)"
ma=$(nvm_medium medium-a 24)
mb=$(nvm_medium medium-b 24)
lun_mib=16
for n in a b; do
	medium=$ma
	[[ $n == b ]] && medium=$mb
	nvm_own_storage_config $n "$medium" unused $lun_mib 7871
	sed -i '/^arbiter = /d' node-$n.toml
	# node-b dials node-a's mirror link (7871) and vote link (7873) through the proxies.
	vote=7873
	[[ $n == b ]] && vote=7883 && sed -i 's/address = "127.0.0.1:7871"/address = "127.0.0.1:7881"/' node-b.toml
	# node-a reaches the tie-breaker through a proxy (7893 -> 7891), for step 6.
	cat >>node-$n.toml <<-CFG

	[cluster.voters]
	port = $vote
	tiebreaker_id = 3
	tiebreaker = ["127.0.0.1:7893", "127.0.0.1:7892"]
	state_dir = "$PWD/voter-$n"
	CFG
done
$P proxy 7881 7871 proxy-mirror.pid >proxy-mirror.log 2>&1 &
$P proxy 7883 7873 proxy-vote.pid >proxy-vote.log 2>&1 &
$P proxy 7893 7891 proxy-tb-a.pid >proxy-tb-a.log 2>&1 &
for f in proxy-mirror.pid proxy-vote.pid proxy-tb-a.pid; do
	for _ in $(seq 50); do [[ -s $f ]] && break; sleep 0.1; done
done
proxies=("$(cat proxy-mirror.pid)" "$(cat proxy-vote.pid)")
proxy_tb_a=$(cat proxy-tb-a.pid)
tb_pid=
start_tiebreaker() {
	"$TB" --cluster-id 42 --secret-file "$PWD/secret" --node-id 3 \
		--serve 1=127.0.0.1:7891 --serve 2=127.0.0.1:7892 --state "$PWD/tiebreaker.state" "$@" \
		>>tiebreaker.log 2>&1 &
	tb_pid=$!
}
nvm_extra_cleanup() {
	[[ -n $tb_pid ]] && kill -9 "$tb_pid" 2>/dev/null
	kill -CONT "${proxies[@]}" "$proxy_tb_a" 2>/dev/null
	kill "${proxies[@]}" "$proxy_tb_a" 2>/dev/null
}
js() { "$NVMCTL" --config "node-$1.toml" status --json 2>/dev/null; }
q() { js "$1" | python3 -c "import json,sys; e=json.load(sys.stdin)['engine']; print($2)"; }
owners() { q "$1" '",".join(r["owner"] for r in e["ranges"])'; }
lease() { q "$1" 'e["lease"]["state"]'; }
until_true() { # SECONDS WHAT COMMAND...
	local secs=$1 what=$2
	shift 2
	for _ in $(seq $((secs * 5))); do "$@" && return 0; sleep 0.2; done
	tail -n 15 daemon-a.log daemon-b.log
	fail "$what: not within $secs s"
}
b_serves_both() { [[ $(owners b) == "node-b,node-b" ]]; }
a_lease_lost() { [[ $(lease a) != held ]]; }
a_lease_held() { [[ $(lease a) == held ]]; }
# Both nodes' links up to a tie-breaker started when the log held $ups of them.
tb_connected() { (($(grep -c 'mirror link up' tiebreaker.log) >= ups + 2)); }
a_serves_none() { [[ $(owners a) == "node-b,node-b" ]]; }
b_resynced() { [[ $(q b 'e["outdated_media"]') == "{}" ]]; }
both_mirroring() { nvm_status_has node-a.toml '"state": "mirroring"' && nvm_status_has node-b.toml '"state": "mirroring"'; }

say "0. config check, and the voter state"
out=$("$NVMCTL" config check node-a.toml 2>&1) || fail "config check: $out"
grep -q "arbiter: three voters (tie-breaker node 3" <<<"$out" || fail "config check does not name the voters: $out"
out=$(timeout 60 "$NVMD" --config node-a.toml --state-dir "$PWD/state" 2>&1) &&
	fail "nvmirrord started without its voter state"
grep -q "nvmirrorctl init-voter --config $PWD/node-a.toml" <<<"$out" ||
	fail "the refusal does not name init-voter: $(tail -3 <<<"$out")"
refusal=$(grep -o 'voter state [^ ]* or ballot file [^ ]* does not exist' <<<"$out")
for n in a b; do
	"$NVMCTL" --config node-$n.toml init-voter >/dev/null || fail "init-voter on node-$n"
done
out=$("$NVMCTL" --config node-a.toml init-voter 2>&1) && fail "a second init-voter succeeded"
grep -q "exists" <<<"$out" || fail "the second init-voter refused for another reason: $out"
say "ok: without its state the daemon refused ($refusal); init-voter created it once"

start_tiebreaker --create-state
wait "$tb_pid" || fail "nvmirror-tiebreaker --create-state: $(tail -3 tiebreaker.log)"
out=$("$TB" --cluster-id 42 --secret-file "$PWD/secret" --node-id 3 --serve 1=127.0.0.1:7891 \
	--serve 2=127.0.0.1:7892 --state "$PWD/tiebreaker.state" --create-state 2>&1) &&
	fail "a second --create-state of the tie-breaker succeeded"
grep -q "exists" <<<"$out" || fail "the second --create-state refused for another reason: $out"
start_tiebreaker
nvm_start node-a.toml daemon-a.log
pid_a=$NVM_LAST_PID
nvm_start node-b.toml daemon-b.log
pid_b=$NVM_LAST_PID
until_true 60 "the mirror link up through the proxy" both_mirroring
dead_ms=$(q a 'e["lease"]["dead_after_ms"]')

say "1. fio over the whole LUN through node-a, then a drain"
whole=(--name=whole --direct=1 --ioengine=libaio --iodepth=16 --rw=randwrite --bsrange=4k-64k
	--size=${lun_mib}M --number_ios=800 --randseed=3601 --verify=crc32c --verify_fatal=1)
fio "${whole[@]}" --filename=/dev/ublkb0 --do_verify=0 --output=fio-whole.log ||
	{ cat fio-whole.log; fail "fio write through node-a"; }
nvm_drain_both "after the whole-LUN fio"
nvm_same_media $lun_mib "$ma" "$mb" || fail "the two media differ after the drain"
say "ok: both media hold the same $lun_mib MiB"

say "2. kill -9 the tie-breaker: the two nodes are a majority"
kill -9 "$tb_pid"
wait "$tb_pid" 2>/dev/null || true
renewals=$(q b 'e["lease"]["renewals"]')
sleep 3
for n in a b; do
	[[ $(lease $n) == held ]] || fail "node-$n lost its lease without the tie-breaker: $(q $n 'e["lease"]')"
done
(($(q b 'e["lease"]["renewals"]') > renewals + 5)) || fail "node-b's lease was not renewed without the tie-breaker"
# A write through node-b to each range (node-a's forwarded) reads back through node-a.
head -c 8192 /dev/urandom >no-tb.blk
for at in 8 $(((lun_mib << 20) / 4096 - 8)); do
	dd if=no-tb.blk of=/dev/ublkb1 bs=4k seek=$at count=2 oflag=direct conv=notrunc status=none ||
		fail "a write through node-b without the tie-breaker"
	dd if=/dev/ublkb0 of=no-tb-a.blk bs=4k skip=$at count=2 iflag=direct status=none
	cmp no-tb.blk no-tb-a.blk || fail "a write through node-b without the tie-breaker does not read back through node-a"
done
start_tiebreaker
say "ok: both leases held and renewed for 3 s without the tie-breaker, writes went on; it restarted from its state"

say "3. cut the pair (mirror and vote links) for $((dead_ms * 5 / 2)) ms: nobody takes over"
sleep 1
kill -STOP "${proxies[@]}"
end=$(($(date +%s%3N) + dead_ms * 5 / 2))
while (($(date +%s%3N) < end)); do
	for n in a b; do
		[[ $(owners $n) == "node-a,node-b" ]] ||
			{ kill -CONT "${proxies[@]}"; tail -20 daemon-$n.log; fail "node-$n moved a range during the cut: $(owners $n)"; }
	done
	sleep 0.5
done
for n in a b; do
	[[ $(lease $n) == held ]] || { kill -CONT "${proxies[@]}"; fail "node-$n lost its lease during the cut: $(q $n 'e["lease"]')"; }
done
kill -CONT "${proxies[@]}"
until_true 60 "mirroring again after the cut" both_mirroring
say "ok: during the cut each node kept its lease and its range (the other's heartbeat reached it through the tie-breaker)"

say "3b. node-a cut off from both other voters, the mirror link up: vouched for, it goes on serving"
kill -STOP "${proxies[1]}" "$proxy_tb_a"
end=$(($(date +%s%3N) + dead_ms * 5 / 2))
heal_3b() { kill -CONT "${proxies[1]}" "$proxy_tb_a"; }
for _ in $(seq 150); do a_lease_lost && break; sleep 0.2; done
a_lease_lost || { heal_3b; fail "node-a kept its lease without a majority of the voters: $(q a 'e["lease"]')"; }
head -c 4096 /dev/urandom >vouched.blk
# The vouch lasts 0.8 heartbeat timeouts from the last heartbeat node-b answered: a TCG stall
# of the link thread longer than that refuses I/O (EIO) until the next answer. Up to three
# tries, counted in the log: the point is that node-a serves at all without its lease.
refused=0
until dd if=vouched.blk of=/dev/ublkb0 bs=4k seek=300 count=1 oflag=direct conv=notrunc status=none &&
	dd if=/dev/ublkb0 of=vouched-a.blk bs=4k skip=300 count=1 iflag=direct status=none; do
	((++refused < 3)) || { heal_3b; tail -5 daemon-a.log; fail "a write through node-a failed 3 times while node-b vouched for it"; }
	sleep 0.5
done
((refused == 0)) || say "node-a refused $refused try(s) (a lapse of the vouch), then served"
cmp vouched.blk vouched-a.blk || { heal_3b; fail "the vouched write does not read back through node-a"; }
while (($(date +%s%3N) < end)); do
	for n in a b; do
		[[ $(owners $n) == "node-a,node-b" ]] ||
			{ heal_3b; tail -20 daemon-$n.log; fail "node-$n moved a range while node-a was cut off from the voters: $(owners $n)"; }
	done
	sleep 0.5
done
heal_3b
until_true 30 "node-a's lease held again" a_lease_held
dd if=/dev/ublkb1 of=vouched-b.blk bs=4k skip=300 count=1 iflag=direct status=none || fail "read through node-b"
cmp vouched.blk vouched-b.blk || fail "the write node-a acknowledged while cut off from the voters does not read back through node-b"
say "ok: node-a lost its lease, went on serving under node-b's vouch (its write reads back through both), and nothing moved"

say "4. node-a's flusher paused, 300 blocks, kill -9 node-a: node-b takes over with the tie-breaker"
"$NVMCTL" --config node-a.toml flush pause >/dev/null || fail "flush pause"
staged=(--name=staged --direct=1 --ioengine=libaio --iodepth=8 --rw=randwrite --bs=4k
	--offset=0 --size=8M --number_ios=300 --randseed=3602
	--verify=crc32c --verify_fatal=1 --verify_state_save=1)
fio "${staged[@]}" --filename=/dev/ublkb0 --do_verify=0 --output=fio-staged.log ||
	{ cat fio-staged.log; fail "fio staged writes"; }
kill -9 "$pid_a"
nvm_wait_gone "$pid_a"
"$NVMCTL" del 0 >/dev/null 2>&1 || true
until_true 60 "node-b serving both ranges" b_serves_both
fio "${staged[@]}" --filename=/dev/ublkb1 --verify_only=1 --verify_state_load=1 --output=fio-staged-verify.log ||
	{ cat fio-staged-verify.log; fail "an acknowledged write was lost after node-b took over"; }
say "ok: node-b took over on 2 of 3 voters; every acknowledged write verifies through node-b"

say "5. node-a restarts: resync, giveback, verify through both, equal media"
nvm_start node-a.toml daemon-a.log
pid_a=$NVM_LAST_PID
until_true 60 "mirroring after node-a's restart" both_mirroring
until_true 120 "node-b's resync of node-a's medium" b_resynced
"$NVMCTL" --config node-b.toml giveback --timeout 60 >/dev/null || fail "giveback after the resync"
[[ $(owners a) == "node-a,node-b" ]] || fail "after the giveback node-a sees $(owners a)"
for dev in /dev/ublkb0 /dev/ublkb1; do
	fio "${staged[@]}" --filename=$dev --verify_only=1 --verify_state_load=1 --output=fio-final.log ||
		{ cat fio-final.log; fail "the staged writes do not verify through $dev"; }
done
nvm_drain_both "after the giveback"
nvm_same_media $lun_mib "$ma" "$mb" || fail "the two media differ after the resync, the giveback and a drain"
say "ok: resynced, given back, verified through both devices, media identical"

say "5b. the tie-breaker's state lost: a new one seeded from copies of both nodes' voter states"
kill -9 "$tb_pid"
wait "$tb_pid" 2>/dev/null || true
mv tiebreaker.state tiebreaker-lost.state
# Copies taken once no operation can still count its last answer (an operation's deadline:
# medium_io_timeout_ms / 4 = 250 ms).
sleep 1
cp voter-a/voter.state copy-a.state
cp voter-b/voter.state copy-b.state
tb_args=(--cluster-id 42 --secret-file "$PWD/secret" --node-id 3 --serve 1=127.0.0.1:7891
	--serve 2=127.0.0.1:7892 --state "$PWD/tiebreaker.state" --create-state)
out=$("$TB" "${tb_args[@]}" --seed-from tiebreaker-lost.state --seed-from copy-a.state 2>&1) &&
	fail "the tie-breaker was seeded from a copy of its own lost state"
grep -q "a copy of this voter's own state" <<<"$out" || fail "the seeding refused for another reason: $out"
out=$("$TB" "${tb_args[@]}" --seed-from copy-a.state --seed-from copy-b.state 2>&1) ||
	fail "seeding the tie-breaker from both nodes' copies: $out"
ups=$(grep -c 'mirror link up' tiebreaker.log)
start_tiebreaker
until_true 30 "both nodes connected to the new tie-breaker" tb_connected
say "ok: $out (a copy of its own lost state refused)"

say "6. node-a cut off from node-b and the tie-breaker during a write: node-b takes its range"
head -c 4096 /dev/urandom >isolated.blk
kill -STOP "${proxies[@]}" "$proxy_tb_a"
(
	rc=0
	timeout 30 dd if=isolated.blk of=/dev/ublkb0 bs=4k seek=100 count=1 oflag=direct conv=notrunc status=none || rc=$?
	echo $rc >isolated.rc
) &
writer=$!
until_true 60 "node-b serving both ranges while node-a is cut off" b_serves_both
until_true 30 "node-a's lease running out without a majority" a_lease_lost
wait $writer || true
rc=$(cat isolated.rc)
if [[ $rc == 0 ]]; then
	dd if=/dev/ublkb1 of=isolated-b.blk bs=4k skip=100 count=1 iflag=direct status=none || fail "read block 100 through node-b"
	cmp isolated.blk isolated-b.blk || fail "node-a acknowledged a write while cut off that node-b, now serving its range, does not have"
	say "the write through node-a was acknowledged (before its lease ran out) and reads back through node-b"
else
	say "the write through node-a was not acknowledged (dd exit $rc)"
fi
kill -CONT "${proxies[@]}" "$proxy_tb_a"
until_true 60 "mirroring after the cut healed" both_mirroring
until_true 30 "node-a knowing node-b serves its range" a_serves_none
for dev in /dev/ublkb0 /dev/ublkb1; do
	fio "${staged[@]}" --filename=$dev --verify_only=1 --verify_state_load=1 --output=fio-after-cut.log ||
		{ cat fio-after-cut.log; fail "the staged writes do not verify through $dev after the cut"; }
done
say "ok: node-b took node-a's range on 2 of 3 voters; node-a's lease ran out; no acknowledged write lost"
