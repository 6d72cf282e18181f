#!/bin/bash
# A rolling upgrade across a release change that makes the two nodes refuse each other's link
# (a new mirror-link protocol version), step by step as docs/upgrade.md gives it. A different
# cluster secret stands in for the other release: the handshake refuses it as it refuses
# another protocol version (the link stays down and the refusal is logged). Both nodes serve at
# first; node-b hands its range to node-a and stops; node-b, "upgraded", starts and its link
# is refused while node-a serves every range without a mirror; node-a stops cleanly and gives
# its lease up, so node-b takes every range over at once; node-a, "upgraded", starts, the link
# comes up, mirroring resumes, and a giveback restores the configured owners. The data written
# at every step reads back through both devices at the end.
# vm-timeout: 300
source "$NVM_REPO/tests/vm/lib/nvm.sh"
nvm_init
modprobe ublk_drv

owners() { nvm_field "$1" '" ".join(r["owner"] for r in e["ranges"])'; }
mirror_state() { nvm_field "$1" 'e["mirror"]["state"]'; }
wait_owners() { # NODE WANT
	for _ in $(seq 150); do [[ $(owners "$1") == "$2" ]] && return 0; sleep 0.2; done
	fail "node-$1 sees owners '$(owners "$1")', not '$2'"
}
upgrade() { # NODE: the "new release" (the other secret)
	sed -i "s|^secret_file = .*|secret_file = \"$PWD/secret-new\"|" "node-$1.toml"
}

medium=$(nvm_medium shared 160)
for n in a b; do nvm_cluster_config $n "$medium" auto tcp 127.0.0.1 7861; done
head -c 48 /dev/urandom | base64 >secret-new
nvm_start node-a.toml daemon-a.log
pid_a=$NVM_LAST_PID
nvm_start node-b.toml daemon-b.log
pid_b=$NVM_LAST_PID
nvm_wait_link
size=$(blockdev --getsize64 /dev/ublkb0)
half=$((size / 2 / 1048576 + 1)) # MiB: the first whole MiB of range 1
declare -A seek_of
put() { # NAME DEVICE SEEK_MIB: 2 MiB of fresh data
	head -c 2M /dev/urandom >"$1"
	dd if="$1" of="$2" bs=1M seek="$3" oflag=direct status=none || fail "writing $1 through $2"
	seek_of[$1]=$3
}
check() { # DEVICE WHEN: every piece written so far reads back
	local name
	for name in "${!seek_of[@]}"; do
		cmp -s "$name" <(dd if="$1" bs=1M count=2 skip="${seek_of[$name]}" iflag=direct status=none) ||
			fail "$2: $name (at ${seek_of[$name]} MiB) reads back wrong through $1"
	done
}

"$NVMD" --version | grep -q "mirror-link protocol [0-9]" || fail "nvmirrord --version does not name the mirror-link protocol"
say "$("$NVMD" --version) (docs/upgrade.md: compare the two releases' lines)"
say "1. both nodes on the old release, mirroring; each writes its own range"
[[ $(owners a) == "node-a node-b" ]] || fail "configured owners: $(owners a)"
put d1 /dev/ublkb0 0
put d2 /dev/ublkb1 "$half"

say "2. node-b hands its range to node-a and stops"
"$NVMCTL" --config node-b.toml handover --timeout 60 >handover.out 2>&1 || { cat handover.out; fail "handover"; }
wait_owners a "node-a node-a"
kill -TERM "$pid_b"
nvm_wait_gone "$pid_b"
wait "$pid_b" || fail "node-b's clean stop exited $?"
put d3 /dev/ublkb0 $((half + 4))

say "3. node-b on the new release starts: the link is refused, node-a serves every range alone"
upgrade b
nvm_start node-b.toml daemon-b2.log
pid_b=$NVM_LAST_PID
sleep 4
[[ $(mirror_state a) != mirroring ]] || fail "node-a mirrors to a node-b whose handshake it must refuse"
grep -q "same cluster secret" daemon-a.log daemon-b2.log || fail "neither node logged why the link is refused"
[[ $(owners b) == "node-a node-a" ]] || fail "node-b took ranges while node-a was alive: $(owners b)"
[[ $(mirror_state a) == degraded ]] || fail "node-a does not report running degraded"
put d4 /dev/ublkb0 4
check /dev/ublkb0 "node-a alone"

say "4. node-a stops cleanly (drained, its lease given up): node-b takes every range over"
t0=$(date +%s%N)
kill -TERM "$pid_a"
nvm_wait_gone "$pid_a"
wait "$pid_a" || fail "node-a's clean stop exited $? (it must drain before node-b takes over)"
wait_owners b "node-b node-b"
took_ms=$((($(date +%s%N) - t0) / 1000000))
check /dev/ublkb1 "after node-b took over"
put d5 /dev/ublkb1 8
say "node-b serves every range $took_ms ms after node-a's stop began; every write reads back"

say "5. node-a on the new release starts: the link comes up, mirroring resumes, giveback"
upgrade a
nvm_start node-a.toml daemon-a2.log
pid_a=$NVM_LAST_PID
nvm_wait_link
"$NVMCTL" --config node-b.toml giveback --timeout 60 >giveback.out 2>&1 || { cat giveback.out; fail "giveback"; }
wait_owners a "node-a node-b"
wait_owners b "node-a node-b"
put d6 /dev/ublkb0 12
check /dev/ublkb0 "after the upgrade, through node-a"
check /dev/ublkb1 "after the upgrade, through node-b"
say "PASS: rolling upgrade across a refused link: node-a then node-b served every range, mirroring resumed, configured owners back, all 6 writes read back through both devices"
