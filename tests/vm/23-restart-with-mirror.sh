#!/bin/bash
# A node restarts with its partner alive and takeover = "manual": the partner keeps its hands
# off, the restarted daemon replays its own NVRAM and re-attaches its /dev/ublkb0 (ublk user
# recovery, in-flight I/O re-issued), fio verifies every acknowledged write, and the partner's
# second store lets go of the copies the replay made redundant.
# vm-timeout: 300
source "$NVM_REPO/tests/vm/lib/nvm.sh"
nvm_init
medium=$(nvm_medium shared 320)
for n in a b; do nvm_cluster_config $n "$medium" manual tcp 127.0.0.1 7821; done
link_up() { nvm_status_has "node-$1.toml" '"link": "Up'; }
nvm_start node-a.toml daemon-a.log
pid_a=$NVM_LAST_PID
nvm_start node-b.toml daemon-b.log
for _ in $(seq 100); do link_up a && break; sleep 0.2; done
"$NVMCTL" --config node-a.toml flush pause >/dev/null
job=(--name=restart --direct=1 --ioengine=libaio --iodepth=16 --rw=randwrite --bs=16k
	--offset=0 --size=24M --rate=3m --randseed=31 --verify=crc32c --verify_fatal=1 --verify_state_save=1)
fio "${job[@]}" --filename=/dev/ublkb0 --do_verify=0 --trigger-timeout=3 --trigger="kill -9 $pid_a" \
	--output=fio-write.log &
fio_pid=$!
nvm_wait_gone "$pid_a"
held=$("$NVMCTL" --config node-b.toml status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["engine"]["mirror"]["second_store"]["records"])')
say "node-a killed; node-b holds $held mirrored record(s) of it and, with takeover = manual, waits"
((held > 0)) || fail "node-b holds no mirrored records of node-a"
sleep 1.5 # past the heartbeat timeout: node-b must not take over by itself
nvm_start node-a.toml daemon-a.log
nvm_status_has node-a.toml '"attach": "recovered"' || fail "node-a did not recover /dev/ublkb0"
wait "$fio_pid" || true
"$NVMCTL" --config node-b.toml status --json | python3 -c '
import json, sys
r = json.load(sys.stdin)["engine"]["ranges"]
assert r[0]["owner"] == "node-a" and r[0]["epoch"] == 1, r
print("node-b did not take over:", [(x["owner"], x["epoch"]) for x in r])' || fail "node-b took over although takeover = manual"
replayed=$("$NVMCTL" --config node-a.toml status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["engine"]["replay"]["records"])')
say "node-a replayed $replayed record(s) of its own NVRAM"
((replayed > 0)) || fail "nothing replayed"
fio "${job[@]}" --filename=/dev/ublkb0 --verify_only=1 --verify_state_load=1 --output=fio-verify.log ||
	{ cat fio-verify.log; fail "an acknowledged write was lost across the restart"; }
for _ in $(seq 100); do link_up a && break; sleep 0.2; done
"$NVMCTL" --config node-a.toml drain --timeout 60
for _ in $(seq 50); do
	left=$("$NVMCTL" --config node-b.toml status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["engine"]["mirror"]["second_store"]["records"])')
	((left == 0)) && break
	sleep 0.2
done
((left == 0)) || fail "node-b still holds $left stale record(s) of node-a"
say "PASS: restart with the partner alive: verify passed, the partner's copies released"
