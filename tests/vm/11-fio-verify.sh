#!/bin/bash
# fio random writes of mixed sizes with crc32c verification, then a full read-back verify.
# vm-timeout: 300
source "$NVM_REPO/tests/vm/lib/nvm.sh"
nvm_init
medium=$(nvm_medium medium 256)
nvm_config node.toml node-a "$PWD/nvram.img" 32 "$medium" 0
nvm_start node.toml daemon.log

job=(--name=mixed --filename=/dev/ublkb0 --direct=1 --ioengine=libaio --iodepth=16
	--rw=randwrite --bssplit=4k/40:8k/20:16k/15:64k/15:128k/10 --size=96M
	--verify=crc32c --verify_fatal=1 --randseed=4242)
say "write + inline verify"
fio "${job[@]}" --do_verify=1 --output=fio-write.log || { cat fio-write.log; fail "fio write/verify failed"; }
grep -E "WRITE:|READ:" fio-write.log
say "full read-back verify after the flusher drained"
"$NVMCTL" --config node.toml drain --timeout 120
fio "${job[@]}" --verify_only=1 --output=fio-verify.log || { cat fio-verify.log; fail "read-back verify failed"; }
grep -E "READ:" fio-verify.log
"$NVMCTL" --config node.toml status --json >status.json
python3 - <<'PY'
import json
s = json.load(open("status.json"))
e = s["engine"]
assert all(p["used_bytes"] == 0 for p in e["partitions"]), "NVRAM not empty after drain"
assert e["bytes_flushed"] >= 96 << 20, e["bytes_flushed"]
print("flushed", e["bytes_flushed"], "bytes in", e["flush_batches"], "batches")
PY
say "PASS"
