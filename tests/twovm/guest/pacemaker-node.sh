#!/bin/bash
# tests/twovm/guest/pacemaker-node.sh ROLE (a | b): one node of the Pacemaker cluster of
# tests/twovm/46-pacemaker.sh, INSIDE its VM, under systemd as PID 1 (nvm_systemd=1).
# corosync (knet over the virtio-net link, the VMs' only one) and Pacemaker from Debian's packages,
# started by systemd; fencing by fence_nvmvm (the host kills the fenced node's QEMU); a
# promotable clone of ocf:nvmirror:nvmirror for the ranges the config gives node-a
# (active/passive: all of them) and an ocf:heartbeat:Filesystem (ext4 on /dev/ublkb0,
# device id 0 on both nodes) colocated with the promoted role.
# Sync files in $NVM_OUT/sync (atomic, every wait bounded, `abort` stops everyone):
#   a-up, b-up (Pacemaker online on that node), a-fs (node-a promoted and the filesystem
#   mounted there), moved-b (node-a moved the promoted role to node-b), b-checked (node-b
#   verified the files there), failed-back (back on node-a, verified), kill-a (node-a's
#   load has been running, its daemon was killed and restarted in place by the agent's
#   monitor: cut its power; written by node-a), fence-node-X (fence_nvmvm asks the host
#   to kill node-X's VM), fenced-node-X (host: it is dead), b-done (node-b promoted, the
#   filesystem mounted there, every fsync'ed change verified).
# Environment: NVM_BIN, NVM_REPO, NVM_OUT.  Exit 0 = this node's part passed, 77 = SKIP.
set -euo pipefail
role=${1:?usage: pacemaker-node.sh a|b}
: "${NVM_BIN:?}" "${NVM_REPO:?}" "${NVM_OUT:?}"
SYNC=$NVM_OUT/sync
node=node-$role
ip_a=10.77.0.1 ip_b=10.77.0.2
exec > >(tee -a "$NVM_OUT/node-$role.log") 2>&1
say() { printf '[%s %s] %s\n' "$(date +%T.%2N)" "$role" "$*"; }
mark() { printf '%s\n' "${2:-$(date +%s.%N)}" >"$SYNC/$1.tmp" && mv -f "$SYNC/$1.tmp" "$SYNC/$1"; }
fail() {
	say "FAIL: $*"
	crm_mon -1 -A -f >"$NVM_OUT/crm_mon-$role-fail.txt" 2>&1 || true
	journalctl --no-pager -o short-precise -u pacemaker -u corosync -n 200 >"$NVM_OUT/journal-$role.log" 2>&1 || true
	mark abort "$role: $*" 2>/dev/null || true
	exit 1
}
skip() { say "SKIPPED: $*"; exit 77; }
await() { # NAME SECONDS
	local i
	for ((i = 0; i < $2 * 5; i++)); do
		[[ -e $SYNC/$1 ]] && return 0
		[[ -e $SYNC/abort ]] && fail "gave up waiting for $1: $(cat "$SYNC/abort")"
		sleep 0.2
	done
	fail "timed out after $2 s waiting for $1"
}
# until_mon SECONDS WHAT REGEX: until `crm_mon -1` matches REGEX
until_mon() {
	local i
	for ((i = 0; i < $1; i++)); do
		crm_mon -1 2>/dev/null | grep -Eq "$3" && return 0
		[[ -e $SYNC/abort ]] && fail "gave up waiting for $2: $(cat "$SYNC/abort")"
		sleep 1
	done
	crm_mon -1 -A -f 2>&1 | sed 's/^/    /'
	fail "$2: not within $1 s"
}

[[ $(ps -o comm= -p 1) == systemd ]] || fail "PID 1 is not systemd"
for t in corosync pacemakerd crm_mon cibadmin mkfs.ext4; do
	command -v $t >/dev/null || skip "$t is not installed (scripts/test.sh installs corosync and pacemaker)"
done
[[ -e /usr/lib/ocf/resource.d/heartbeat/Filesystem ]] || skip "no ocf:heartbeat:Filesystem (package resource-agents)"
modprobe ublk_drv || fail "modprobe ublk_drv"

# ------------------------------------------------------------ the node ---
# Under systemd, udev's coldplug loads virtio_net and names the link, and this script may start
# before it has.  The name depends on the host's udev rules and .link files (the CI machine
# named it ens5 despite net.ifnames=0), so the link is found by the MAC address lib.sh gives
# it (52:54:00:4e:56:0X), after udev has settled, so no rename follows.
nic_by_mac() {
	local d
	for d in /sys/class/net/*; do
		[[ $(cat "$d/address" 2>/dev/null) == 52:54:00:4e:56:0? ]] && { echo "${d##*/}"; return 0; }
	done
	return 1
}
nic=''
for ((i = 0; i < 100; i++)); do
	nic=$(nic_by_mac) && break
	sleep 0.3
done
[[ -n $nic ]] || fail "no virtio-net link 30 s after boot: $(ls /sys/class/net)"
udevadm settle --timeout=15 || say "udevadm settle timed out; using the link as named now"
nic=$(nic_by_mac) || fail "the virtio-net link went away: $(ls /sys/class/net)"
say "the link to the partner is $nic"
ip link set "$nic" up || fail "ip link set $nic up"
ip addr add "$([[ $role == a ]] && echo $ip_a || echo $ip_b)/24" dev "$nic"
install -m 0755 "$NVM_REPO/tests/twovm/guest/fence_nvmvm" /usr/sbin/fence_nvmvm
install -D -m 0755 "$NVM_REPO/scripts/ocf/nvmirror" /usr/lib/ocf/resource.d/nvmirror/nvmirror
mkdir -p /etc/nvmirror /var/lib/nvmirror
cp "$NVM_OUT/secret" /etc/nvmirror/secret
chmod 600 /etc/nvmirror/secret
cat >/etc/nvmirror/pair.toml <<-CFG
[node]
name = "$node"
control_socket = "/run/nvmirror-pair.sock"

[nvram]
path = "/var/lib/nvmirror/nvram.img"
size = "64MiB"
partitions = 2

[cluster]
id = 46
secret_file = "/etc/nvmirror/secret"
transport = "tcp"
heartbeat_interval_ms = 250
heartbeat_timeout_ms = 3000
# Pacemaker decides; the agent's promote claims the ranges (after fencing).
takeover = "manual"
degraded = "write-through"

[[cluster.node]]
name = "node-a"
address = "$ip_a:7800"

[[cluster.node]]
name = "node-b"
address = "$ip_b:7800"

[[lun]]
name = "lun0"
medium = "/dev/vda"
device_id = 0
ranges = 2
owners = ["node-a"]
CFG
# (It warns that node-b stages nothing: true of an active/passive pair.)
"$NVM_BIN/nvmirrorctl" config check /etc/nvmirror/pair.toml >"$NVM_OUT/config-check-$role.log" 2>&1 || fail "config check: $(cat "$NVM_OUT/config-check-$role.log")"

mkdir -p /etc/corosync
cat >/etc/corosync/corosync.conf <<-CFG
totem {
	version: 2
	cluster_name: nvmirror-test
	transport: knet
	crypto_cipher: none
	crypto_hash: none
	# Two 1-vCPU TCG VMs on a busy host: a generous token.
	token: 5000
}
nodelist {
	node {
		ring0_addr: $ip_a
		name: node-a
		nodeid: 1
	}
	node {
		ring0_addr: $ip_b
		name: node-b
		nodeid: 2
	}
}
quorum {
	provider: corosync_votequorum
	two_node: 1
}
logging {
	to_syslog: yes
}
CFG
systemctl start corosync || fail "systemctl start corosync"
systemctl start pacemaker || fail "systemctl start pacemaker"
until_mon 180 "both nodes online" 'Online: \[ node-a node-b \]'
say "corosync $(corosync -v | head -n 1 | grep -o '[0-9][0-9.]*' | head -n 1) and Pacemaker $(pacemakerd --version | head -n 1 | awk '{print $2}') online on both nodes"
mark "$role-up"

configure() {
	local nv=(config=/etc/nvmirror/pair.toml ranges_of=node-a nvmirrord="$NVM_BIN/nvmirrord" nvmirrorctl="$NVM_BIN/nvmirrorctl")
	crm_attribute -t crm_config -n stonith-enabled -v true
	crm_attribute -t crm_config -n stonith-timeout -v 120s
	# A TCG guest's load average sits above 1 on its one vCPU (the emulation), so with the
	# default threshold (80%) the controller throttles itself to one action at a time in the
	# whole cluster: the probes and the clone's two starts ran one after the other (about 20 s
	# more). This cluster's load is the test's, not a node in trouble.
	crm_attribute -t crm_config -n load-threshold -v 1000%
	cibadmin -C -o resources -X "<primitive id=\"fence-vm\" class=\"stonith\" type=\"fence_nvmvm\">
	  <instance_attributes id=\"fence-vm-ia\">
	    <nvpair id=\"fence-vm-hosts\" name=\"pcmk_host_list\" value=\"node-a node-b\"/>
	    <nvpair id=\"fence-vm-check\" name=\"pcmk_host_check\" value=\"static-list\"/>
	    <nvpair id=\"fence-vm-sync\" name=\"sync_dir\" value=\"$SYNC\"/>
	  </instance_attributes>
	  <operations><op id=\"fence-vm-mon\" name=\"monitor\" interval=\"60s\"/></operations>
	</primitive>" || fail "cibadmin: the fence device"
	local ia='' p
	for p in "${nv[@]}"; do ia+="<nvpair id=\"nv-${p%%=*}\" name=\"${p%%=*}\" value=\"${p#*=}\"/>"; done
	# Monitors every 10 s (promoted) and 20 s: more keeps the 1-vCPU TCG VMs busy. Their
	# timeout covers a crashed daemon's restart in place (restart_crashed): 12-45 s under TCG.
	cibadmin -C -o resources -X "<clone id=\"nv-clone\">
	  <meta_attributes id=\"nv-clone-meta\">
	    <nvpair id=\"nv-promotable\" name=\"promotable\" value=\"true\"/>
	    <nvpair id=\"nv-promoted-max\" name=\"promoted-max\" value=\"1\"/>
	    <nvpair id=\"nv-notify\" name=\"notify\" value=\"true\"/>
	  </meta_attributes>
	  <primitive id=\"nv\" class=\"ocf\" provider=\"nvmirror\" type=\"nvmirror\">
	    <instance_attributes id=\"nv-ia\">$ia</instance_attributes>
	    <operations>
	      <op id=\"nv-start\" name=\"start\" interval=\"0s\" timeout=\"120s\"/>
	      <op id=\"nv-stop\" name=\"stop\" interval=\"0s\" timeout=\"180s\"/>
	      <op id=\"nv-promote\" name=\"promote\" interval=\"0s\" timeout=\"180s\"/>
	      <op id=\"nv-demote\" name=\"demote\" interval=\"0s\" timeout=\"120s\"/>
	      <op id=\"nv-mon-p\" name=\"monitor\" interval=\"10s\" role=\"Promoted\" timeout=\"90s\"/>
	      <op id=\"nv-mon-u\" name=\"monitor\" interval=\"20s\" role=\"Unpromoted\" timeout=\"90s\"/>
	    </operations>
	  </primitive>
	</clone>" || fail "cibadmin: the nvmirror clone"
}

configure_fs() {
	cibadmin -C -o resources -X "<primitive id=\"fs\" class=\"ocf\" provider=\"heartbeat\" type=\"Filesystem\">
	  <instance_attributes id=\"fs-ia\">
	    <nvpair id=\"fs-dev\" name=\"device\" value=\"/dev/ublkb0\"/>
	    <nvpair id=\"fs-dir\" name=\"directory\" value=\"/mnt/nv\"/>
	    <nvpair id=\"fs-type\" name=\"fstype\" value=\"ext4\"/>
	  </instance_attributes>
	  <operations>
	    <op id=\"fs-start\" name=\"start\" interval=\"0s\" timeout=\"60s\"/>
	    <op id=\"fs-stop\" name=\"stop\" interval=\"0s\" timeout=\"60s\"/>
	    <op id=\"fs-mon\" name=\"monitor\" interval=\"20s\" timeout=\"40s\"/>
	  </operations>
	</primitive>" || fail "cibadmin: the filesystem"
	cibadmin -C -o constraints -X '<rsc_colocation id="fs-with-promoted" rsc="fs" with-rsc="nv-clone" with-rsc-role="Promoted" score="INFINITY"/>' ||
		fail "cibadmin: colocation"
	cibadmin -C -o constraints -X '<rsc_order id="promote-then-fs" first="nv-clone" first-action="promote" then="fs" then-action="start"/>' ||
		fail "cibadmin: order"
}

churn=$NVM_REPO/tests/vm/lib/fs_churn.py
# With NVM_PC_RESTART=1 (NVM_SOAK=1 sets it; about a minute under TCG, out of CI's hour;
# 50-ocf-agent checks the agent's restart in place with writes in flight):
restart_in_place() {
	# A resource failure: nvmirrord killed under the mounted filesystem with the load running.
	# The promoted monitor (every 10 s) restarts it in place; ublk recovery keeps the device,
	# so the filesystem and the load never see an error and nothing moves.
	pid=$(pgrep -x nvmirrord) || fail "no nvmirrord running on node-a"
	say "kill -9 nvmirrord (pid $pid) under the mounted filesystem, the load running"
	kill -9 "$pid"
	t_kill=$SECONDS
	for ((i = 0; i < 60; i++)); do
		new=$(pgrep -x nvmirrord) && [[ $new != "$pid" ]] &&
			"$NVM_BIN/nvmirrorctl" --config /etc/nvmirror/pair.toml wait --timeout 1 >/dev/null 2>&1 && break
		sleep 1
	done
	((i < 60)) || fail "no nvmirrord serving again 60 s after the kill"
	t_back=$((SECONDS - t_kill))
	# The agent counts the restart in a node attribute once the daemon serves again.
	for ((i = 0; i < 30; i++)); do
		[[ $(crm_attribute -l reboot -N node-a -n nvmirror-restarts-pair -G -q 2>/dev/null) == 1 ]] && break
		sleep 1
	done
	((i < 30)) || fail "node attribute nvmirror-restarts-pair is not 1: $(crm_attribute -l reboot -N node-a -n nvmirror-restarts-pair -G 2>&1)"
	crm_mon -1 -A -f >"$NVM_OUT/crm_mon-restarted.txt" 2>&1
	grep -Eq 'Promoted: \[ node-a \]' "$NVM_OUT/crm_mon-restarted.txt" && grep -Eq 'fs.*Started node-a' "$NVM_OUT/crm_mon-restarted.txt" ||
		fail "after the restart in place nvmirror is not promoted or fs not started on node-a: $(cat "$NVM_OUT/crm_mon-restarted.txt")"
	kill -0 "$load" 2>/dev/null || fail "the load died across the daemon's crash: $(tail -n 3 "$NVM_OUT/churn-a.log")"
	# The agent logs with logger(1), which exits at once: under a busy TCG journald may no
	# longer find its cgroup and cannot tie the line to pacemaker.service, so no -u here.
	for ((i = 0; i < 20; i++)); do
		journalctl --no-pager -o cat | grep -q 'nvmirrord of pair restarted in place' && break
		sleep 1
	done
	((i < 20)) || fail "no 'restarted in place' warning from the agent in the journal"
	say "ok: the agent's monitor restarted nvmirrord in place $t_back s after the kill (pid $pid -> $new); still promoted here, the filesystem mounted, the load running"
}

# With NVM_PC_SWITCHOVER=1 (NVM_SOAK=1 sets it; about 4.5 minutes under TCG):
switchover_and_failback() {
	# A planned switchover: the load stops, `crm_resource --move` of the promoted role to
	# node-b (Pacemaker unmounts here, demotes here: handover, promotes there, mounts there),
	# node-b checks every fsync'ed change, then `--clear` lets the promotion scores bring
	# it back home (demote there: giveback, promote here) and this node checks again.
	mkdir -p /mnt/nv/moved
	python3 "$churn" run /mnt/nv/moved "$NVM_OUT/journal-move" --seed 45 2>"$NVM_OUT/churn-move.log" &
	load=$!
	sleep 8
	kill "$load"
	wait "$load" || true
	say "switchover: the load stopped after $(grep -c '^[PAD] ' "$NVM_OUT/journal-move") durable operations; crm_resource --move of the promoted role to node-b"
	crm_resource --move -r nv-clone --promoted -N node-b || fail "crm_resource --move"
	until_mon 300 "switchover to node-b" 'fs.*Started node-b'
	t_moved=$SECONDS
	mark moved-b
	await b-checked 120
	crm_mon -1 >"$NVM_OUT/crm_mon-switched.txt"
	crm_resource --clear -r nv-clone || fail "crm_resource --clear"
	say "failback: crm_resource --clear; the promotion scores bring the ranges home"
	until_mon 300 "failback to node-a" 'fs.*Started node-a'
	grep -Eq 'Promoted: \[ node-a \]' <(crm_mon -1) || fail "the filesystem is back on node-a but nvmirror is not promoted here"
	result=$(python3 "$churn" check /mnt/nv/moved "$NVM_OUT/journal-move") || { echo "$result"; fail "after the failback an fsync'ed change is lost or wrong"; }
	say "ok: failback done $((SECONDS - t_moved)) s after the switchover; $result"
	mark failed-back
}

case $role in
a)
	await b-up 240
	configure
	until_mon 240 "nvmirror promoted on node-a" 'Promoted: \[ node-a \]'
	say "ocf:nvmirror:nvmirror promoted on node-a (its home), unpromoted on node-b"
	mkfs.ext4 -q -F -E nodiscard /dev/ublkb0 || fail "mkfs.ext4 /dev/ublkb0"
	configure_fs
	until_mon 120 "the filesystem started on node-a" 'fs.*Started node-a'
	mountpoint -q /mnt/nv || fail "Pacemaker says fs started, but /mnt/nv is not a mount point"
	crm_mon -1 >"$NVM_OUT/crm_mon-before.txt"
	mark a-fs
	if [[ ${NVM_PC_SWITCHOVER:-0} == 1 ]]; then switchover_and_failback; fi
	mkdir -p /mnt/nv/churn
	python3 "$churn" run /mnt/nv/churn "$NVM_OUT/journal-pcmk" --seed 46 2>"$NVM_OUT/churn-a.log" &
	load=$!
	sleep 5
	if [[ ${NVM_PC_RESTART:-0} == 1 ]]; then restart_in_place; fi
	sleep 5
	kill -0 "$load" 2>/dev/null || fail "the load stopped: $(cat "$NVM_OUT/churn-a.log")"
	journalctl --no-pager -o short-precise -u pacemaker -u corosync >"$NVM_OUT/journal-a.log" 2>&1 || true
	say "the load has made $(grep -c '^[PAD] ' "$NVM_OUT/journal-pcmk") operations durable; cut my power"
	mark kill-a
	sleep 300
	fail "still alive 300 s after kill-a"
	;;
b)
	if [[ ${NVM_PC_SWITCHOVER:-0} == 1 ]]; then
		await moved-b 900
		mountpoint -q /mnt/nv || fail "Pacemaker moved the filesystem here, but /mnt/nv is not mounted"
		grep -Eq 'Promoted: \[ node-b \]' <(crm_mon -1) || fail "the filesystem runs here but nvmirror is not promoted here"
		result=$(python3 "$churn" check /mnt/nv/moved "$NVM_OUT/journal-move") || { echo "$result"; fail "after the switchover an fsync'ed change is lost or wrong"; }
		say "ok: switchover: promoted here, the filesystem mounted by Pacemaker; $result"
		mark b-checked
	fi
	await kill-a 600
	say "node-a's power goes: Pacemaker must fence it, promote nvmirror here (takeover) and mount the filesystem"
	until_mon 300 "nvmirror promoted and the filesystem started on node-b" 'fs.*Started node-b'
	crm_mon -1 -f >"$NVM_OUT/crm_mon-after.txt" 2>&1
	grep -Eq 'Promoted: \[ node-b \]' "$NVM_OUT/crm_mon-after.txt" || fail "the filesystem runs on node-b but nvmirror is not promoted there"
	stonith_admin --history node-a >"$NVM_OUT/fence-history.txt" 2>&1 || true
	grep -q 'successful' "$NVM_OUT/fence-history.txt" || fail "no successful fencing of node-a in the history: $(cat "$NVM_OUT/fence-history.txt")"
	say "fencing: $(head -n 1 "$NVM_OUT/fence-history.txt")"
	mountpoint -q /mnt/nv || fail "/mnt/nv is not mounted on node-b"
	for j in moved:journal-move churn:journal-pcmk; do
		[[ -e $NVM_OUT/${j#*:} ]] || continue
		result=$(python3 "$churn" check "/mnt/nv/${j%%:*}" "$NVM_OUT/${j#*:}") || { echo "$result"; fail "an fsync'ed change is lost or wrong on node-b"; }
		say "ok: $result"
	done
	"$NVM_BIN/nvmirrorctl" --config /etc/nvmirror/pair.toml status >"$NVM_OUT/status-b.txt" 2>&1 || true
	journalctl --no-pager -o short-precise -u pacemaker -u corosync >"$NVM_OUT/journal-b.log" 2>&1 || true
	mark b-done
	say "PASS (node-b): fenced node-a, promoted here with takeover, the filesystem mounted by Pacemaker holds every fsync'ed change"
	;;
*) fail "unknown role $role" ;;
esac
