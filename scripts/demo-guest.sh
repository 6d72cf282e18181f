#!/bin/bash
# Runs inside the VM (see scripts/demo.sh): the main job on two nodes.
# node-a and node-b share one storage medium and mirror every write into each other's
# NVRAM over the mirror link (TCP here; RDMA with DEMO_TRANSPORT=rdma over Soft-RoCE).
# ext4 goes on node-a's /dev/ublkb0, files are written and fsync'ed (acknowledged), the
# flusher is paused so they exist only in the two NVRAMs, node-a's daemon is killed with
# SIGKILL, node-b notices, takes the LUN over (replaying node-a's mirrored writes), and
# every acknowledged file is read back through node-b's /dev/ublkb1.
set -euo pipefail
BIN=${NVM_BIN:?}
work=$(mktemp -d /tmp/nvmirror-demo.XXXX)
cd "$work"
step() { printf '\n==> %s\n' "$*"; }
die() { printf '\nDEMO FAILED: %s\n' "$*"; exit 1; }
transport=${DEMO_TRANSPORT:-tcp}

modprobe ublk_drv
addr=127.0.0.1
if [[ $transport == rdma ]]; then
	modprobe rdma_rxe
	ip link add demo0 type dummy && ip addr add 10.98.0.1/24 dev demo0 && ip link set demo0 up
	rdma link add demorxe0 type rxe netdev demo0
	addr=10.98.0.1
fi
truncate -s 512M shared.img
medium=$(losetup --find --show shared.img)
head -c 48 /dev/urandom | base64 >secret
for n in a b; do
	cat >node-$n.toml <<CFG
[node]
name = "node-$n"

[nvram]
path = "$work/nvram-$n.img"   # each node's own NVRAM (first store + the partner's second store)
size = "64MiB"
partitions = 4

[cluster]
id = 1
secret_file = "$work/secret"
transport = "$transport"
heartbeat_interval_ms = 100
heartbeat_timeout_ms = 1000
# Disk heartbeat on the shared medium: node-a is dead once its heartbeat is unchanged for
# 1.1 x 2 + 1 + 0.25 s (and the link is down); only then does node-b take over.
disk_heartbeat_ms = 250
disk_lease_ms = 2000
medium_io_timeout_ms = 1000
takeover = "auto"

[[cluster.node]]
name = "node-a"
address = "$addr:7801"

[[cluster.node]]
name = "node-b"
address = "$addr:7802"

[[lun]]
name = "lun0"
medium = "$medium"           # the shared storage medium
device_id = $([[ $n == a ]] && echo 0 || echo 1)
ranges = 2
owners = ["node-a", "node-b"]  # range 0 on node-a, range 1 on node-b
CFG
done
step "node-a's config (node-b's differs in name and device id):"
cat node-a.toml

step "start both daemons: each serves the LUN, owns one range, mirrors into the other"
"$BIN/nvmirrord" --config node-a.toml 2>daemon-a.log &
pid_a=$!
"$BIN/nvmirrord" --config node-b.toml 2>daemon-b.log &
pid_b=$!
"$BIN/nvmirrorctl" --config node-a.toml wait --timeout 60
"$BIN/nvmirrorctl" --config node-b.toml wait --timeout 60
for _ in $(seq 100); do
	"$BIN/nvmirrorctl" --config node-a.toml status --json | grep -q '"link": "Up' && break
	sleep 0.2
done

step "mkfs.ext4 and mount on node-a's /dev/ublkb0 (node-b's range is reached by forwarding)"
mkfs.ext4 -q -F /dev/ublkb0
mkdir mnt && mount /dev/ublkb0 mnt
"$BIN/nvmirrorctl" --config node-a.toml flush pause
"$BIN/nvmirrorctl" --config node-b.toml flush pause
step "flushers paused: from now on acknowledged writes exist only in the NVRAMs (and their mirrors)"
for i in $(seq 1 30); do
	head -c $((i * 2 * 1024)) /dev/urandom >"mnt/file$i"
	sync -d "mnt/file$i" # returns = acknowledged
done
sync -f mnt
(cd mnt && sha256sum file*) >acked.sha256
"$BIN/nvmirrorctl" --config node-a.toml status

step "kill -9 node-a's daemon"
kill -9 "$pid_a"
wait "$pid_a" 2>/dev/null || true
t0=$(date +%s.%N)
for _ in $(seq 300); do
	"$BIN/nvmirrorctl" --config node-b.toml status --json | python3 -c '
import json, sys
r = json.load(sys.stdin)["engine"]["ranges"]
sys.exit(0 if all(x["owner"] == "node-b" and x["state"] == "local" for x in r) else 1)' && break
	sleep 0.1
done
echo "node-b took over in $(python3 -c "import time; print(round(time.time() - $t0, 2))") s (link down after 1 s, node-a's disk heartbeat dead after 3.45 s):"
grep -E "down|heartbeat has not changed|taking over|takeover|replay" daemon-b.log | sed 's/^[^ ]* *//' | tail -5
"$BIN/nvmirrorctl" --config node-b.toml status | sed -n '/LUN *RANGE/,/^$/p'

# Degraded now (no partner): with the default write-through policy node-b acknowledges new
# writes once they are on the medium, so its flusher must run.
"$BIN/nvmirrorctl" --config node-b.toml flush resume >/dev/null

step "node-a's mount is dead (its daemon is gone); remove its device, then use node-b's /dev/ublkb1"
"$BIN/nvmirrorctl" del 0
umount -l mnt
fsck.ext4 -fn /dev/ublkb1 >fsck.log 2>&1 || { cat fsck.log; die "fsck found problems"; }
echo "fsck.ext4 -fn /dev/ublkb1: clean"
mount /dev/ublkb1 mnt
(cd mnt && sha256sum -c --quiet ../acked.sha256) || die "an acknowledged file differs"
echo "all $(wc -l <acked.sha256) acknowledged files read back through node-b match"
umount mnt

for _ in $(seq 300); do [[ -e /sys/class/ublk-char/ublkc0 ]] || break; sleep 0.1; done
step "restart node-a: it rejoins, mirroring resumes (node-b now owns both ranges)"
"$BIN/nvmirrord" --config node-a.toml 2>>daemon-a.log &
pid_a=$!
"$BIN/nvmirrorctl" --config node-a.toml wait --timeout 60
for _ in $(seq 100); do
	"$BIN/nvmirrorctl" --config node-b.toml status --json | grep -q '"link": "Up' && break
	sleep 0.2
done
"$BIN/nvmirrorctl" --config node-b.toml status | grep -E "^mirror|^second"
kill -TERM "$pid_a" "$pid_b"
wait "$pid_a" "$pid_b" 2>/dev/null || true
losetup -d "$medium"
step "DEMO OK: the survivor served every acknowledged write"
