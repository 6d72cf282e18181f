#!/bin/bash
# A link partition with both nodes alive. node-b reaches node-a through a small TCP proxy;
# SIGSTOP of the proxy silences the link (no FIN, no RST: heartbeats just stop). node-a
# (takeover = manual) keeps writing, first mirrored, then degraded write-through; node-b
# (takeover = auto) takes over node-a's range with a new epoch. Then:
#   - every write node-a acknowledged (before or after the cut) reads back from node-b;
#   - node-a is fenced: its partition fails with a clear error, its later writes fail, and it
#     never writes the medium again (node-b's new data stays);
#   - the takeover skipped the mirror copies node-a's flush marks show on the medium.
# vm-timeout: 300
source "$NVM_REPO/tests/vm/lib/nvm.sh"
nvm_init
medium=$(nvm_medium shared 96)
nvm_cluster_config a "$medium" manual tcp 127.0.0.1 7851
nvm_cluster_config b "$medium" auto tcp 127.0.0.1 7851
# node-b dials node-a through the proxy (7861 -> 7851); node-a listens on 7851 itself.
sed -i 's/address = "127.0.0.1:7851"/address = "127.0.0.1:7861"/' node-b.toml

cat >proxy.py <<'PY'
import socket, sys, threading
listen, target = int(sys.argv[1]), int(sys.argv[2])
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", listen)); srv.listen(8)
def pump(a, b):
    try:
        while (d := a.recv(65536)):
            b.sendall(d)
    except OSError:
        pass
    for s in (a, b):
        try: s.shutdown(socket.SHUT_RDWR)
        except OSError: pass
while True:
    c, _ = srv.accept()
    u = socket.create_connection(("127.0.0.1", target))
    for x, y in ((c, u), (u, c)):
        threading.Thread(target=pump, args=(x, y), daemon=True).start()
PY
python3 proxy.py 7861 7851 &
proxy=$!
nvm_extra_cleanup() { kill -CONT "$proxy" 2>/dev/null; kill "$proxy" 2>/dev/null; }

# One writer, 4 KiB O_DIRECT blocks in node-a's range 0, each stamped with its write number;
# a write number is logged only once pwrite returned (acknowledged).
cat >writer.py <<'PY'
import mmap, os, sys, time
dev, nblocks, seconds, log = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
buf = mmap.mmap(-1, 4096)
out = open(log, "w", buffering=1)
end, i, errors = time.time() + seconds, 0, 0
while time.time() < end and errors < 3:
    buf.seek(0); buf.write((b"write %08d " % i) * 273 + b"\0" * (4096 - 15 * 273))
    out.write("try %d\n" % i)
    try:
        os.pwrite(fd, buf, (i % nblocks) * 4096)
        out.write("ack %d\n" % i)
    except OSError as e:
        out.write("err %d %s\n" % (i, e.strerror)); errors += 1
    i += 1
    time.sleep(0.005)
PY

nvm_start node-a.toml daemon-a.log
pid_a=$NVM_LAST_PID
nvm_start node-b.toml daemon-b.log
state() { "$NVMCTL" --config "node-$1.toml" status --json | python3 -c "import json,sys; s=json.load(sys.stdin); print($2)"; }
for _ in $(seq 100); do [[ $(state a 's["engine"]["mirror"]["state"]') == mirroring ]] && break; sleep 0.2; done
[[ $(state a 's["engine"]["mirror"]["state"]') == mirroring ]] || fail "the link did not come up through the proxy"

# 32 blocks at the start of node-a's range 0, each written several times: node-b's second
# store holds old copies of blocks that node-a overwrites while the link is down.
blocks=32
timeout 60 python3 writer.py /dev/ublkb0 $blocks 14 writes.log &
writer=$!
sleep 2
# Let mirrored records pile up unflushed, so the cut leaves copies in node-b's second store.
"$NVMCTL" --config node-a.toml flush pause >/dev/null
sleep 2
say "cutting the link (SIGSTOP of the proxy); $(grep -c '^ack' writes.log) write(s) acknowledged so far"
kill -STOP "$proxy"
"$NVMCTL" --config node-a.toml flush resume >/dev/null
# node-b: heartbeat timeout (1 s), takeover, grace (1 s), replay.
for _ in $(seq 100); do [[ $(state b 's["engine"]["ranges"][0]["owner"]') == node-b ]] && break; sleep 0.2; done
[[ $(state b 's["engine"]["ranges"][0]["owner"]') == node-b ]] || fail "node-b did not take over range 0"
for _ in $(seq 100); do [[ $(state b 's["engine"]["takeover"]["phase"]') == done ]] && break; sleep 0.2; done
[[ $(state b 's["engine"]["takeover"]["phase"]') == done ]] || fail "node-b's takeover did not finish: $(state b 's["engine"]["takeover"]')"
wait "$writer" || true
acked=$(grep -c '^ack' writes.log || true)
errs=$(grep -c '^err' writes.log || true)
say "writer: $acked acknowledged, $errs failed; node-b: $(state b 's["engine"]["takeover"]')"
((acked > 50)) || fail "too few acknowledged writes ($acked) to mean anything"

# node-a must be fenced with a clear reason, and refuse further writes to range 0.
failed=$(state a '" | ".join(p["failed"] or "" for p in s["engine"]["partitions"])')
[[ $failed == *fenced* ]] || fail "node-a is not fenced (partitions: $failed)"
say "node-a fenced: ${failed//|/}"
if timeout 20 dd if=/dev/zero of=/dev/ublkb0 bs=4k count=1 oflag=direct status=none 2>dd.err; then
	fail "node-a acknowledged a write to a range it lost"
fi

# Every acknowledged write reads back from node-b (its device serves the whole LUN now).
dd if=/dev/ublkb1 of=range0.img bs=4k count=$blocks iflag=direct status=none
dd if="$medium" of=medium0.img bs=4k count=$blocks iflag=direct status=none
python3 - "$blocks" <<'PY' || fail "an acknowledged write is missing on node-b"
import re, sys
n = int(sys.argv[1])
acked, tried = {}, {}
for line in open("writes.log"):
    kind, i = line.split()[:2]
    i = int(i)
    (acked if kind == "ack" else tried)[i % n] = max(i, (acked if kind == "ack" else tried).get(i % n, -1))
bad = 0
for name in ("range0.img", "medium0.img"):
  img = open(name, "rb").read()
  for blk, last in acked.items():
    m = re.match(rb"write (\d{8}) ", img[blk * 4096: blk * 4096 + 15])
    got = int(m.group(1)) if m else None
    # The block holds its last acknowledged write, or a later one that was in flight.
    if got is None or got < last:
        bad += 1
        print("%s block %d: last acknowledged write %d, found %s" % (name, blk, last, got))
print("checked %d blocks against %d acknowledged writes: %d wrong" % (len(acked), sum(1 for _ in open("writes.log")), bad))
sys.exit(1 if bad else 0)
PY

# node-b writes over range 0; fenced node-a must never write the medium again.
head -c 1M /dev/urandom >newer
dd if=newer of=/dev/ublkb1 bs=1M count=1 oflag=direct status=none
"$NVMCTL" --config node-b.toml drain --timeout 30 >/dev/null
sleep 3
[[ $(dd if="$medium" bs=1M count=1 iflag=direct status=none | md5sum) == $(md5sum <newer) ]] ||
	fail "the medium lost node-b's newer data: the fenced node-a wrote it"
say "takeover replayed $(state b 's["engine"]["takeover"]["records_done"]') mirrored record(s), skipped $(state b 's["engine"]["takeover"]["skipped_already_flushed"]') that node-a's flush marks showed on the medium"
say "PASS: partition: node-b took over, every acknowledged write survived, node-a fenced and silent"
