#!/bin/bash
# The owner's path to the medium fails (device-mapper `error` target under node-a's view of
# the shared disk): node-b writes node-a's mirrored records from its second store, every
# acknowledged write reaches the medium, and node-a reports its failed path. Reads through
# node-a's device, which its failed path cannot serve, come from node-b's path and match
# the disk.
# vm-timeout: 300
source "$NVM_REPO/tests/vm/lib/nvm.sh"
nvm_init
modprobe dm_mod || fail "modprobe dm_mod"
shared=$(nvm_medium shared 320)
sectors=$(blockdev --getsz "$shared")
dmsetup create nvm-a-path --table "0 $sectors linear $shared 0" || fail "dmsetup create"
# No udev in the VM: use the kernel's /dev/dm-N node.
dm_dev=/dev/dm-$(dmsetup info -c --noheadings -o minor nvm-a-path | tr -d ' ')
[[ -b $dm_dev ]] || fail "$dm_dev missing"
nvm_extra_cleanup() { dmsetup remove --force nvm-a-path 2>/dev/null; }
nvm_cluster_config a "$dm_dev" manual tcp 127.0.0.1 7811
nvm_cluster_config b "$shared" manual tcp 127.0.0.1 7811
nvm_start node-a.toml daemon-a.log
nvm_start node-b.toml daemon-b.log
for _ in $(seq 100); do nvm_status_has node-a.toml '"link": "Up' && break; sleep 0.2; done

say "node-a's path to the medium now returns I/O errors"
dmsetup suspend nvm-a-path
dmsetup load nvm-a-path --table "0 $sectors error"
dmsetup resume nvm-a-path
job=(--name=pathfail --direct=1 --ioengine=libaio --iodepth=16 --rw=randwrite --bs=16k
	--offset=0 --size=64M --randseed=77 --verify=crc32c --verify_fatal=1 --verify_state_save=1)
fio "${job[@]}" --filename=/dev/ublkb0 --do_verify=0 --output=fio-write.log ||
	{ cat fio-write.log; fail "writes failed although the partner can write for node-a"; }
"$NVMCTL" --config node-a.toml drain --timeout 60 || fail "node-a's staged writes did not reach the medium"
"$NVMCTL" --config node-a.toml status
"$NVMCTL" --config node-a.toml status --json | python3 -c '
import json, sys
e = json.load(sys.stdin)["engine"]
assert e["delegated_batches"] > 0 and e["medium_errors"] > 0, (e["delegated_batches"], e["medium_errors"])
assert "medium path failed" in (e["last_medium_error"] or ""), e["last_medium_error"]
print("node-a: medium errors", e["medium_errors"], "- batches written by node-b:", e["delegated_batches"])'
grep -q "medium path failed" daemon-b.log || grep -q "wrote its records" daemon-b.log || fail "node-b did not log the handover"
say "verify the acknowledged writes on the shared disk itself"
fio "${job[@]}" --filename="$shared" --verify_only=1 --verify_state_load=1 --output=fio-verify.log ||
	{ cat fio-verify.log; fail "an acknowledged write is not on the medium"; }
say "read 16 MiB back through node-a's device (its path fails reads too): the same bytes as the disk"
cmp <(dd if=/dev/ublkb0 bs=1M count=16 iflag=direct status=none) \
	<(dd if="$shared" bs=1M count=16 iflag=direct status=none) ||
	{ tail -20 daemon-a.log; fail "reads through node-a with its medium path failing differ from the disk"; }
served=$("$NVMCTL" --config node-a.toml status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["engine"]["luns"][0]["reads_from_partner"])')
((served > 0)) || fail "node-a's status counts no reads served from node-b's path"
say "PASS: node-b wrote node-a's records through its own path; $served read(s) of node-a's came from node-b's path"
