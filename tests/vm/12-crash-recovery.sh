#!/bin/bash
# No acknowledged write is lost across a daemon crash: fio writes with verify state,
# a trigger kill -9s nvmirrord mid-run, the restarted daemon recovers /dev/ublkb0 (ublk
# user recovery) after replaying the NVRAM, and fio verifies everything it saw complete.
# Several cycles; in one the flusher is paused so every write must come back from NVRAM.
# vm-timeout: 600
source "$NVM_REPO/tests/vm/lib/nvm.sh"
nvm_init
medium=$(nvm_medium medium 256)
nvram=${NVM_PMEM:-$PWD/nvram.img}
nvm_config node.toml node-a "$nvram" 48 "$medium" 0
nvm_start node.toml daemon.log
cycles=${NVM_CRASH_CYCLES:-4}

for cycle in $(seq 1 "$cycles"); do
	pid=$NVM_LAST_PID
	# A rate limit keeps fio writing past the trigger however fast the machine is; one
	# pass over `size` (no block written twice, so the verify state stays exact).
	size=256M rate=8m
	if ((cycle % 2 == 0)); then
		"$NVMCTL" --config node.toml flush pause >/dev/null
		size=24M rate=3m # fits in the NVRAM with the flusher paused
		say "cycle $cycle: flusher paused: every acknowledged write must come back from the NVRAM"
	fi
	rm -f ./*verify.state
	job=(--name=crash --filename=/dev/ublkb0 --direct=1 --ioengine=libaio --iodepth=32
		--rw=randwrite --bssplit=4k/50:16k/30:64k/20 --size=$size --randseed=$((7000 + cycle))
		--rate=$rate
		--verify=crc32c --verify_fatal=1 --verify_state_save=1)
	fio "${job[@]}" --do_verify=0 --trigger-timeout=3 --trigger="kill -9 $pid" \
		--output=fio-write-$cycle.log &
	fio_pid=$!
	nvm_wait_gone "$pid"
	say "cycle $cycle: nvmirrord $pid killed mid-run; restarting it"
	# fio's in-flight I/O waits on the quiesced device; the restarted daemon recovers it.
	nvm_start node.toml daemon.log
	nvm_status_has node.toml '"attach": "recovered"' ||
		fail "the restarted daemon did not recover the device (ublk user recovery)"
	wait "$fio_pid" || true
	ls ./*verify.state >/dev/null 2>&1 || { cat fio-write-$cycle.log; fail "fio saved no verify state"; }
	replayed=$("$NVMCTL" --config node.toml status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["engine"]["replay"]["records"])')
	say "cycle $cycle: daemon replayed $replayed record(s) from the NVRAM"
	if ((cycle % 2 == 0)) && ((replayed == 0)); then fail "flusher was paused but nothing was replayed"; fi
	fio "${job[@]}" --verify_only=1 --verify_state_load=1 --output=fio-verify-$cycle.log ||
		{ cat fio-verify-$cycle.log; nvm_explain_verify_failure fio-verify-$cycle.log daemon*.log; fail "cycle $cycle: verify after crash failed: an acknowledged write was lost"; }
	say "cycle $cycle: verify passed ($(grep -o 'READ: bw=[^,]*' fio-verify-$cycle.log))"
done
say "PASS: $cycles crash/recover cycles, no acknowledged write lost"
