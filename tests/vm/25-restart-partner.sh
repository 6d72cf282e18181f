#!/bin/bash
# Issue 15, item 0: a planned restart of the partner must not remove the protection of what
# is staged. node-a writes 200 blocks with its flusher paused (they exist only in node-a's
# NVRAM and node-b's second store); node-b's daemon is stopped and started again; its second
# store must still hold every one of them (rebuilt from its NVRAM, not from memory). Then
# node-a is killed with kill -9 before it flushed anything: node-b takes over, replays the
# 200 mirrored writes, and fio verifies every acknowledged write through node-b's device.
# node-a's takeover policy is manual (node-b's clean stop must not hand it node-b's range);
# node-b's is auto.
# Both nodes run with `cluster.frame_mac = false` (the handshake alone proves the secret,
# frames carry crc32c): the whole path works without frame MACs, and a node-b with MACs on
# is refused, naming the setting.
# vm-timeout: 300
source "$NVM_REPO/tests/vm/lib/nvm.sh"
nvm_init
medium=$(nvm_medium shared 320)
nvm_cluster_config a "$medium" manual tcp 127.0.0.1 7831
nvm_cluster_config b "$medium" auto tcp 127.0.0.1 7831
cp node-b.toml node-b-macs.toml
for n in a b; do sed -i 's|^takeover = .*|&\nframe_mac = false|' "node-$n.toml"; done
"$NVMCTL" config check node-a.toml >check-a.log 2>&1 || { cat check-a.log; fail "config check"; }
grep -q 'cluster.frame_mac = false' check-a.log || { cat check-a.log; fail "config check did not warn about frame_mac = false"; }
blocks=200
nvm_start node-a.toml daemon-a.log
pid_a=$NVM_LAST_PID

say "node-b with frame MACs on against node-a with them off: the link must be refused"
nvm_start node-b-macs.toml daemon-b-macs.log
pid_macs=$NVM_LAST_PID
for _ in $(seq 100); do
	grep -q 'set the same cluster.frame_mac on both nodes' daemon-b-macs.log && break
	sleep 0.1
done
grep -q 'set the same cluster.frame_mac on both nodes' daemon-b-macs.log ||
	{ tail -5 daemon-b-macs.log; fail "node-b (MACs on) did not refuse node-a (MACs off) by the setting's name"; }
nvm_status_has node-b-macs.toml '"link": "Up' && fail "the link came up with frame MACs on one node only"
say "refused: $(grep -m1 -o 'frame authentication is[^"]*' daemon-b-macs.log)"
nvm_stop "$pid_macs"

nvm_start node-b.toml daemon-b.log
pid_b=$NVM_LAST_PID
nvm_wait_link
"$NVMCTL" --config node-a.toml flush pause >/dev/null || fail "flush pause"
job=(--name=staged --direct=1 --ioengine=libaio --iodepth=8 --rw=randwrite --bs=4k
	--offset=0 --size=8M --number_ios=$blocks --randseed=2515
	--verify=crc32c --verify_fatal=1 --verify_state_save=1)
fio "${job[@]}" --filename=/dev/ublkb0 --do_verify=0 --output=fio-write.log ||
	{ cat fio-write.log; fail "fio write"; }
held=$(nvm_field b 'e["mirror"]["second_store"]["records"]')
say "node-a wrote $blocks blocks with its flusher paused; node-b holds $held mirrored record(s)"
((held >= blocks)) || fail "node-b holds $held mirrored records, expected at least $blocks"

say "node-b's daemon restarts (graceful stop, start)"
nvm_stop "$pid_b"
nvm_start node-b.toml daemon-b.log
pid_b=$NVM_LAST_PID
nvm_wait_link
rebuilt=$(nvm_field b 'e["mirror"]["second_store"]["records"]')
say "after the restart node-b's second store holds $rebuilt record(s)"
((rebuilt >= blocks)) ||
	{ tail -20 daemon-b.log; fail "node-b's restart dropped mirrored copies: $rebuilt of $held left"; }
# node-a still counts the pair as mirrored and has flushed nothing.
[[ $(nvm_field a 'e["ranges"][0]["owner"]') == node-a ]] || fail "node-a lost its range"

say "kill -9 node-a before it flushed; node-b must take over and replay the mirrored writes"
kill -9 "$pid_a"
nvm_wait_gone "$pid_a"
for _ in $(seq 300); do
	[[ $(nvm_field b '",".join(x["owner"] + "/" + x["state"] for x in e["ranges"])') == "node-b/local,node-b/local" ]] && break
	sleep 0.1
done
[[ $(nvm_field b 'e["ranges"][0]["owner"]') == node-b ]] ||
	{ "$NVMCTL" --config node-b.toml status; tail -20 daemon-b.log; fail "node-b did not take over"; }
replayed=$(nvm_field b '(e.get("takeover") or {}).get("records_done", 0)')
say "node-b took over and replayed $replayed mirrored record(s)"
((replayed >= blocks)) || { tail -20 daemon-b.log; fail "takeover replayed $replayed records, expected at least $blocks"; }
"$NVMCTL" del 0 >/dev/null 2>&1 || true
fio "${job[@]}" --filename=/dev/ublkb1 --verify_only=1 --verify_state_load=1 --output=fio-verify.log ||
	{ cat fio-verify.log; fail "an acknowledged write was lost: node-b's restart dropped its second copy"; }
say "PASS: $blocks staged writes survived node-b's restart and node-a's death ($(grep -o 'READ: bw=[^,]*' fio-verify.log))"
