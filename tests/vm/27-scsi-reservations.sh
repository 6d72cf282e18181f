#!/bin/bash
# Issue 14, item 3: fencing at the device with SCSI-3 persistent reservations. The kernel's
# LIO target emulates one SCSI disk (a fileio backstore) seen through two tcm_loop ports,
# /dev/sdX for node-a and /dev/sdY for node-b: two initiators, one reservation, as two
# servers on a SAN would see it. Both daemons run with cluster.reservations = "scsi3".
# Checked:
# 1. reservations = "scsi3" on a medium that is not SCSI (a loop device) is refused at start,
#    naming the field and the fix;
# 2. both nodes register their keys; one holds a "write exclusive, registrants only"
#    reservation (type 5); data written through either node reads back through the other;
# 3. node-a is killed; node-b takes its range over and preempts node-a's key: a write
#    through node-a's path to the disk now fails at the device (RESERVATION CONFLICT), while
#    the same write through node-b's path succeeds;
# 4. node-a restarts, registers again, gets its range back (giveback) and writes again.
# vm-timeout: 240
source "$NVM_REPO/tests/vm/lib/nvm.sh"
nvm_init
modprobe -a target_core_mod target_core_file tcm_loop 2>/dev/null || skip "no LIO/tcm_loop modules in this kernel"
# No udev in the VM: the SCSI disk driver is not loaded when the disks appear.
modprobe sd_mod || fail "modprobe sd_mod"
mountpoint -q /sys/kernel/config || mount -t configfs none /sys/kernel/config || fail "mount configfs"
T=/sys/kernel/config/target
[[ -d $T/core ]] || fail "LIO's configfs tree $T is missing"

# LIO keeps a file per device for reservations that persist through power loss (APTPL) and
# writes it on every registration; its default place (/var/target) is read-only here.
mkdir -p "$PWD/lio-db/pr"
echo "$PWD/lio-db" >"$T/dbroot" || fail "setting LIO's dbroot"
truncate -s 320M lio.img
store=$T/core/fileio_0/nvm_shared
mkdir -p "$store"
echo "fd_dev_name=$PWD/lio.img,fd_dev_size=$((320 << 20))" >"$store/control"
echo 1 >"$store/enable"
disks() { ls -d /sys/block/sd* 2>/dev/null | sort; }
# port N: a tcm_loop target port with its own initiator (nexus) onto the one backstore;
# prints the new /dev/sdX
port() {
	local wwn=naa.50014050000000a$1 before d
	before=$(disks)
	# The nexus first: adding the LUN makes the kernel scan it, through the nexus.
	mkdir -p "$T/loopback/$wwn/tpgt_1"
	echo "naa.50014050000000b$1" >"$T/loopback/$wwn/tpgt_1/nexus"
	mkdir -p "$T/loopback/$wwn/tpgt_1/lun/lun_0"
	ln -s "$store" "$T/loopback/$wwn/tpgt_1/lun/lun_0/nvm_port"
	for _ in $(seq 100); do
		d=$(comm -13 <(echo "$before") <(disks) | head -1)
		[[ -n $d && -b /dev/${d##*/} ]] && { echo "/dev/${d##*/}"; return 0; }
		sleep 0.1
	done
	return 1
}
nvm_extra_cleanup() {
	local w
	for w in "$T"/loopback/naa.*; do
		[[ -d $w ]] || continue
		echo NULL >"$w/tpgt_1/nexus" 2>/dev/null
		rm -f "$w/tpgt_1/lun/lun_0/nvm_port"
		rmdir "$w/tpgt_1/lun/lun_0" "$w/tpgt_1" "$w" 2>/dev/null
	done
	rmdir "$store" "$T/core/fileio_0" 2>/dev/null
}
sd_a=$(port 1) || fail "the first tcm_loop port gave no SCSI disk: $(dmesg | tail -5)"
sd_b=$(port 2) || fail "the second tcm_loop port gave no SCSI disk"
say "one LIO disk, two initiators: node-a uses $sd_a, node-b $sd_b"

nvm_cluster_config a "$sd_a" auto tcp 127.0.0.1 7871
nvm_cluster_config b "$sd_b" auto tcp 127.0.0.1 7871
for n in a b; do sed -i 's/^takeover = .*/&\nreservations = "scsi3"/' node-$n.toml; done

say "1. reservations on a medium that is not SCSI are refused"
loopdev=$(nvm_medium plain 320)
sed "s|^medium = .*|medium = \"$loopdev\"|" node-a.toml >node-a-loop.toml
if "$NVMD" --config node-a-loop.toml --state-dir "$PWD/state" >loop.log 2>&1; then
	fail "nvmirrord started with reservations on a loop device"
fi
grep -q 'cluster.reservations = "scsi3".*SCSI' loop.log || { cat loop.log; fail "the refusal does not name cluster.reservations"; }
say "   refused: $(grep -o 'cluster.reservations.*' loop.log | head -1 | cut -c1-170)"

say "2. both nodes register; one holds the registrants-only reservation"
nvm_start node-a.toml daemon-a.log
pid_a=$NVM_LAST_PID
nvm_start node-b.toml daemon-b.log
pid_b=$NVM_LAST_PID
res() { "$NVMCTL" --config "node-$1.toml" status --json | python3 -c "import json,sys; r=json.load(sys.stdin)['engine']['reservations'][0]; print($2)"; }
key_a=$(res a 'r["my_key"]')
key_b=$(res b 'r["my_key"]')
for _ in $(seq 50); do [[ $(res a 'len(r["keys"])') == 2 ]] && break; sleep 0.2; done
[[ $(res a 'sorted(r["keys"])') == "$(python3 -c "print(sorted(['$key_a', '$key_b']))")" ]] ||
	fail "registered keys: $(res a 'r["keys"]'), expected $key_a and $key_b"
[[ $(res b 'r["kind"]') == 5 && $(res b 'r["holder"] in (r["keys"])') == True ]] ||
	fail "no registrants-only reservation: $(res b 'r')"
say "   keys $key_a (node-a) and $key_b (node-b) registered; holder $(res b 'r["holder"]'), type 5"
for _ in $(seq 100); do
	nvm_status_has node-a.toml '"state": "mirroring"' && nvm_status_has node-b.toml '"state": "mirroring"' && break
	sleep 0.2
done
dd if=/dev/urandom of=data bs=1M count=8 status=none
dd if=data of=/dev/ublkb0 bs=1M oflag=direct status=none || fail "writing through node-a"
cmp <(dd if=/dev/ublkb1 bs=1M count=8 iflag=direct status=none) data || fail "node-b reads other data than node-a wrote"
# Captured first: under pipefail, `status | grep -q` fails when grep quits before status has
# written its last line (status then dies of EPIPE).
status_a=$("$NVMCTL" --config node-a.toml status)
grep -q "reservation on $sd_a: our key $key_a registered" <<<"$status_a" ||
	fail "node-a's status does not show its registration: $(grep -i reservation <<<"$status_a")"

say "3. node-a is killed: node-b takes over and preempts node-a's key"
kill -9 "$pid_a"
nvm_wait_gone "$pid_a"
for _ in $(seq 300); do
	nvm_status_has node-b.toml '"owner": "node-a"' || break
	sleep 0.1
done
for _ in $(seq 100); do [[ $(res b 'r["keys"]') == "['$key_b']" ]] && break; sleep 0.1; done
[[ $(res b 'r["keys"]') == "['$key_b']" ]] || fail "node-a's key was not preempted: $(res b 'r')"
grep -q "node-a's key preempted" daemon-b.log || fail "node-b did not log the preemption"
# A block in the middle of the LUN, rewritten with what it holds.
blk=$(($(blockdev --getsz "$sd_a") / 16))
dd if="$sd_a" of=blk bs=4k skip=$((blk / 8)) count=1 iflag=direct status=none || fail "reading through node-a's path (reads stay allowed)"
if dd if=blk of="$sd_a" bs=4k seek=$((blk / 8)) count=1 oflag=direct conv=notrunc status=none 2>dd-a.err; then
	fail "a write through node-a's path succeeded after its key was preempted"
fi
say "   a write through node-a's path fails at the device: $(head -1 dd-a.err)"
dmesg | grep -qi "reservation conflict" && say "   kernel: $(dmesg | grep -i 'reservation conflict' | tail -1 | cut -c1-120)"
dd if=blk of="$sd_b" bs=4k seek=$((blk / 8)) count=1 oflag=direct conv=notrunc status=none ||
	fail "the same write through node-b's path failed"
cmp <(dd if=/dev/ublkb1 bs=1M count=8 iflag=direct status=none) data || fail "node-b lost node-a's acknowledged data"

say "4. node-a restarts, registers again, gets its range back and writes again"
"$NVMCTL" del 0 >/dev/null 2>&1 || true
nvm_wait_dev_gone 0
nvm_start node-a.toml daemon-a2.log
pid_a=$NVM_LAST_PID
for _ in $(seq 50); do [[ $(res a 'len(r["keys"])') == 2 ]] && break; sleep 0.2; done
[[ $(res a 'r["registered"]') == True ]] || fail "node-a did not register again: $(res a 'r')"
for _ in $(seq 150); do nvm_status_has node-a.toml '"state": "mirroring"' && break; sleep 0.2; done
"$NVMCTL" --config node-b.toml giveback --timeout 60 >/dev/null || fail "giveback to node-a"
dd if=data of=/dev/ublkb0 bs=1M seek=16 oflag=direct status=none || fail "writing through node-a after its return"
"$NVMCTL" --config node-a.toml drain --timeout 60 >/dev/null || fail "node-a did not drain to the medium"
cmp <(dd if=/dev/ublkb1 bs=1M skip=16 count=8 iflag=direct status=none) data || fail "node-b reads other data than node-a wrote after its return"
dd if=blk of="$sd_a" bs=4k seek=$((blk / 8)) count=1 oflag=direct conv=notrunc status=none ||
	fail "node-a's path still refuses writes after it registered again"
say "PASS: both nodes registered, node-a's key preempted at its takeover (its path's writes refused by the disk), registered again on its return"
