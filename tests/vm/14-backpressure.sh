#!/bin/bash
# Back-pressure: an NVRAM much smaller than the data written still completes with correct data.
# vm-timeout: 300
source "$NVM_REPO/tests/vm/lib/nvm.sh"
nvm_init
medium=$(nvm_medium medium 256)
# 2 partitions of ~2.5 MiB: every write waits for the flusher many times over.
nvm_config node.toml node-a "$PWD/nvram.img" 6 "$medium" 0 2
nvm_start node.toml daemon.log
job=(--name=bp --filename=/dev/ublkb0 --direct=1 --ioengine=libaio --iodepth=32 --rw=randwrite
	--bssplit=4k/30:64k/30:256k/40 --size=128M --verify=crc32c --verify_fatal=1 --randseed=99)
fio "${job[@]}" --do_verify=1 --output=fio.log || { cat fio.log; fail "fio under back-pressure failed"; }
grep -E "WRITE:|READ:" fio.log
"$NVMCTL" --config node.toml status
"$NVMCTL" --config node.toml status --json | python3 -c '
import json, sys
e = json.load(sys.stdin)["engine"]
cap = sum(p["capacity_bytes"] for p in e["partitions"])
assert e["bytes_flushed"] > 10 * cap, (e["bytes_flushed"], cap)
print("wrote", e["bytes_flushed"] >> 20, "MiB through", cap >> 20, "MiB of NVRAM")'
say "PASS"
