#!/bin/bash
# A flipped byte in a staged NVRAM record makes the next start fail with a clear error that
# names the record and the recovery command; salvage then brings the node back.
# vm-timeout: 300
source "$NVM_REPO/tests/vm/lib/nvm.sh"
nvm_init
medium=$(nvm_medium medium 128)
nvm_config node.toml node-a "$PWD/nvram.img" 32 "$medium" 0
nvm_start node.toml daemon.log
pid=$NVM_LAST_PID
"$NVMCTL" --config node.toml flush pause >/dev/null
fio --name=w --filename=/dev/ublkb0 --direct=1 --ioengine=libaio --iodepth=8 --rw=randwrite \
	--bs=4k --size=4M --output=fio.log || fail "fio"
kill -9 "$pid"
nvm_wait_gone "$pid"
"$NVMCTL" --config node.toml nvram inspect --json >inspect.json
off=$(python3 -c '
import json; r = json.load(open("inspect.json"))
p = [p for p in r["partitions"] if p["records"] > 2][0]
print(p["first_record_offset"] + 64 + 100)')
say "flipping a byte at NVRAM offset $off (inside the first staged record's data)"
python3 - "$off" <<'PY'
import sys
off = int(sys.argv[1])
with open("nvram.img", "r+b") as f:
    f.seek(off); b = f.read(1); f.seek(off); f.write(bytes([b[0] ^ 0x5a]))
PY
set +e
timeout 60 "$NVMD" --config node.toml --state-dir "$PWD/state" >start.log 2>&1
rc=$?
set -e
cat start.log
((rc != 0)) || fail "nvmirrord started on a corrupt NVRAM"
grep -q "data checksum mismatch" start.log || fail "error does not say what is wrong"
grep -q "nvmirrorctl nvram salvage" start.log || fail "error does not offer the recovery command"
say "refused with exit $rc and a clear message"
"$NVMCTL" --config node.toml nvram inspect | tee inspect.txt
grep -q CORRUPT inspect.txt || fail "inspect does not show the corruption"
"$NVMCTL" --config node.toml nvram salvage
nvm_start node.toml daemon2.log
say "PASS"
