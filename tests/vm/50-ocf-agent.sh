#!/bin/bash
# The Pacemaker OCF resource agent (scripts/ocf/nvmirror) against a live two-node setup:
# two daemons in this VM (node-a, node-b), TCP mirror link on 127.0.0.1, one shared loop
# medium, takeover = "manual" (Pacemaker is the authority). The LUN has 2 ranges: range 0
# is node-a's (resource resA, ranges_of=node-a), range 1 node-b's (resB, ranges_of=node-b);
# /dev/ublkb0 is node-a's device, /dev/ublkb1 node-b's.
#
# 1. crm_resource --validate with good and bad parameters (agent looked up by class/provider).
# 2. The metadata validated against ra-api-1.dtd (with OCF 1.1's additions); with NVM_SOAK=1
#    also ocf-tester on node-a (resA) while node-b's daemon runs and is connected.
# 3. The roles driven by calling the agent as Pacemaker would (OCF env vars): start on both
#    nodes, promote on the home nodes (monitor 8 there, 0 on the partner), data written
#    through node-a with its flusher paused (so it exists only in the NVRAMs), kill -9 of
#    node-a's daemon (monitor 9 for the promoted resA, 1 for the unpromoted resB there,
#    with restart_crashed=false; by default, tried first with writes in flight, the monitor
#    restarts it in place and the device and the writes survive),
#    promote of resA on node-b = takeover with replay, the data read back through node-b,
#    node-a restarted, demote on node-b = giveback, promote on node-a, data again; then a
#    switchover driven by the pre-demote notification (handover), a refused promote while
#    the partner holds the ranges, a refused demote when the partner is gone, and the shared
#    daemon living exactly as long as one resource uses it.
#
# crm_resource finds agents only under its compiled-in /usr/lib/ocf/resource.d. The test
# puts an overlay (upper dir in this test's tmpfs scratch) on that directory for its run
# and unmounts it at exit, so the shared VM (and the host, whose root the VM sees read-only
# below its RAM overlay) keeps no trace of the agent.
# vm-timeout: 900
source "$NVM_REPO/tests/vm/lib/nvm.sh"
nvm_init
AGENT_SRC=$NVM_REPO/scripts/ocf/nvmirror
RD=/usr/lib/ocf/resource.d
[[ -f $AGENT_SRC ]] || fail "$AGENT_SRC missing"
for t in ocf-tester crm_resource xmllint python3 flock setsid; do
	command -v $t >/dev/null || skip "$t is not installed in the VM (Debian: resource-agents, pacemaker-cli-utils, libxml2-utils)"
done
[[ -f /usr/lib/ocf/lib/heartbeat/ocf-shellfuncs ]] || skip "no /usr/lib/ocf/lib/heartbeat/ocf-shellfuncs (resource-agents)"

# --- the agent in the OCF tree: overlay on /usr/lib/ocf/resource.d ----------------------
mkdir -p ocf-upper/nvmirror ocf-work
install -m 0755 "$AGENT_SRC" ocf-upper/nvmirror/nvmirror
mount -t overlay ocf-agents -o "lowerdir=$RD,upperdir=$PWD/ocf-upper,workdir=$PWD/ocf-work" "$RD" ||
	fail "cannot put an overlay on $RD"
nvm_extra_cleanup() {
	umount "$RD" 2>/dev/null || umount -l "$RD" 2>/dev/null
	umount /usr/share/resource-agents 2>/dev/null
	cp -f ./*.toml pcmk-attrs.log "$NVM_OUT/" 2>/dev/null
}
AGENT=$RD/nvmirror/nvmirror
# The test's scratch dir is 0700 (tmpfs default): ocf-tester runs `su nobody ... meta-data`.
chmod 755 "$PWD" ocf-upper ocf-upper/nvmirror
[[ -x $AGENT ]] || fail "the agent is not at $AGENT after the overlay mount"

# No Pacemaker runs here, so the agent's crm_attribute / crm_master calls (promotion score,
# degraded attribute) would each fail after about a second of TCG start-up and reach no one.
# Stand-ins record them instead (ocf-shellfuncs calls them as $HA_SBIN_DIR/...), and the test
# checks the promotion scores the agent set: the values Pacemaker would have placed by.
mkdir -p pcmk-sbin
for tool in crm_attribute crm_master; do
	cat >pcmk-sbin/$tool <<-EOS
		#!/bin/sh
		echo "\${OCF_RESKEY_CRM_meta_on_node:-?} \${OCF_RESOURCE_INSTANCE:-?} $tool \$*" >>"$PWD/pcmk-attrs.log"
	EOS
	chmod 755 pcmk-sbin/$tool
done
export HA_SBIN_DIR=$PWD/pcmk-sbin PATH=$PWD/pcmk-sbin:$PATH
# score NODE RES: the promotion score the agent last set for RES on node-NODE ("none" once
# deleted, "unset" if never set).
score() {
	awk -v who="pcmk-$1 $2" '
		index($0, who " crm_master ") == 1 || index($0, who " crm_attribute -p ") == 1 {
			v = "none"; for (i = 4; i <= NF; i++) if ($i == "-v") v = $(i + 1); last = v }
		END { print (last == "" ? "unset" : last) }' pcmk-attrs.log 2>/dev/null || echo unset
}
# want_score NODE RES VALUE WHY
want_score() {
	local got
	got=$(score "$1" "$2")
	[[ $got == "$3" ]] || fail "$4: promotion score of $2 on node-$1 is $got, want $3"
}

medium=$(nvm_medium shared 130)
for n in a b; do nvm_cluster_config $n "$medium" manual tcp 127.0.0.1 7851; done
mkdir -p run

# ra NODE(a|b) RESOURCE RANGES_OF(a|b) ACTION [VAR=VALUE...]: the agent as Pacemaker runs it
ra() {
	local n=$1 res=$2 of=$3 act=$4
	shift 4
	env OCF_ROOT=/usr/lib/ocf OCF_RESOURCE_INSTANCE="$res" \
		OCF_RESKEY_config="$PWD/node-$n.toml" OCF_RESKEY_ranges_of="node-$of" \
		OCF_RESKEY_nvmirrord="$NVMD" OCF_RESKEY_nvmirrorctl="$NVMCTL" \
		OCF_RESKEY_state_dir="$PWD/state-$n" OCF_RESKEY_run_dir="$PWD/run" \
		OCF_RESKEY_daemon_log="$PWD/daemon-$n.log" OCF_RESKEY_CRM_meta_on_node="pcmk-$n" \
		OCF_RESKEY_CRM_meta_timeout=120000 OCF_RESKEY_CRM_meta_interval=10000 \
		"$@" "$AGENT" "$act" 2>>agent-$n.log
}
# expect WANT DESCRIPTION NODE RES OF ACTION [VAR=VALUE...]
expect() {
	local want=$1 what=$2 rc=0
	shift 2
	say "agent: node-$1 $2 $4 (ranges_of=node-$3) -> expect $want"
	ra "$@" || rc=$?
	if [[ $rc != "$want" ]]; then
		tail -n 15 agent-$1.log
		fail "$what: $4 of $2 on node-$1 returned $rc, expected $want"
	fi
}
st() { "$NVMCTL" --config node-$1.toml status --json; }
# owners N: prints "owner-of-range-0 owner-of-range-1" as node N sees them (local/remote)
owners() { st "$1" | python3 -c 'import json,sys; print(" ".join(x["owner"] + "/" + x["state"] for x in json.load(sys.stdin)["engine"]["ranges"]))'; }
link_up() { st "$1" 2>/dev/null | grep -q '"state": "mirroring"'; }
wait_link() {
	for _ in $(seq 150); do link_up a && link_up b && return 0; sleep 0.2; done
	fail "the mirror link between node-a and node-b did not come up"
}
dpid() { cat "run/node-$1/nvmirrord.pid"; }
alive() { [[ -r /proc/$1/stat ]] && [[ $(sed 's/.*) //' "/proc/$1/stat" | cut -c1) != [ZX] ]]; }
track_daemon() { NVM_DAEMON_PIDS+=("$(dpid "$1")"); }

# --- 1. crm_resource --validate ------------------------------------------------------
good=(--option "config=$PWD/node-a.toml" --option ranges_of=node-a --option "nvmirrord=$NVMD"
	--option "nvmirrorctl=$NVMCTL" --option "run_dir=$PWD/run")
validate() { crm_resource --validate --class ocf --provider nvmirror --agent nvmirror "$@" 2>&1; }
out=$(validate "${good[@]}") || fail "crm_resource --validate with good parameters: $out"
say "crm_resource --validate (good parameters): $out"
rc=0; out=$(validate "${good[@]}" --option "config=$PWD/missing.toml") || rc=$?
((rc != 0)) && grep -q "missing.toml does not exist" <<<"$out" ||
	fail "validate with a missing config file: rc $rc, output: $out"
say "crm_resource --validate (missing config): rc $rc: $(grep -m1 ocf-exit-reason <<<"$out")"
rc=0; out=$(validate "${good[@]}" --option ranges_of=node-x) || rc=$?
((rc != 0)) && grep -q "ranges_of='node-x' is not a node of the cluster" <<<"$out" ||
	fail "validate with an unknown ranges_of: rc $rc, output: $out"
say "crm_resource --validate (unknown ranges_of): rc $rc: $(grep -m1 ocf-exit-reason <<<"$out")"
sed 's/^ranges = 2$/ranges = 2\nbogus_key = 1/' node-a.toml >bad.toml
rc=0; out=$(validate "${good[@]}" --option "config=$PWD/bad.toml") || rc=$?
((rc != 0)) && grep -q "bogus_key" <<<"$out" || fail "validate with an invalid config: rc $rc, output: $out"
say "crm_resource --validate (invalid config): rc $rc (names bogus_key)"
for bad in ranges_of='node a' peer_wait=soon handover_wait=-1 restart_crashed=maybe; do
	rc=0; out=$(validate "${good[@]}" --option "$bad") || rc=$?
	((rc == 6)) && grep -q "ocf-exit-reason" <<<"$out" ||
		fail "validate with $bad: rc $rc (want 6, OCF_ERR_CONFIGURED: wrong everywhere), output: $out"
done
say "crm_resource --validate (bad parameter values: ranges_of, peer_wait, handover_wait): rc 6 (OCF_ERR_CONFIGURED)"
# OCF 1.1: the metadata says so, and the waits are reloadable (reload-agent).
meta=$(OCF_ROOT=/usr/lib/ocf "$AGENT" meta-data)
xmllint --noout - <<<"$meta" || fail "the agent's metadata is not well-formed XML"
[[ $(xmllint --xpath 'string(/resource-agent/version)' - <<<"$meta") == 1.1 ]] || fail "metadata: OCF version is not 1.1"
[[ $(xmllint --xpath 'string(//parameter[@name="peer_wait"]/@reloadable)' - <<<"$meta") == 1 ]] || fail "metadata: peer_wait is not reloadable"
xmllint --xpath '//action[@name="reload-agent"]' - <<<"$meta" >/dev/null || fail "metadata: no reload-agent action"
[[ $(xmllint --xpath 'count(//action[@role="Master" or @role="Slave"])' - <<<"$meta") == 0 ]] || fail "metadata: OCF 1.0 role names"
say "metadata: OCF 1.1, Promoted/Unpromoted monitors, reload-agent with peer_wait and handover_wait reloadable"
rc=0; out=$(validate "${good[@]}" --option "nvmirrorctl=/nonexistent/nvmirrorctl") || rc=$?
((rc == 5)) || fail "validate with a missing nvmirrorctl: rc $rc (want 5, not installed): $out"
# With the quorum arbiter ([cluster.voters]) and no voter state yet: not installed on this
# node (the operator's init-voter, never the agent's), and the reason names the command.
sed 's/^takeover = .*/&\nstorage = "own"/' node-a.toml >voters.toml
cat >>voters.toml <<-CFG
size = "64MiB"

[cluster.voters]
port = 7863
tiebreaker_id = 3
tiebreaker = ["127.0.0.1:7891", "127.0.0.1:7892"]
state_dir = "$PWD/voter-validate"
CFG
rc=0; out=$(validate "${good[@]}" --option "config=$PWD/voters.toml") || rc=$?
((rc == 5)) && grep -q "init-voter" <<<"$out" ||
	fail "validate without the voter state: rc $rc (want 5, not installed, naming init-voter): $out"
"$NVMCTL" --config voters.toml init-voter >/dev/null || fail "init-voter for voters.toml"
out=$(validate "${good[@]}" --option "config=$PWD/voters.toml") || fail "validate with the voter state created: $out"
say "crm_resource --validate with [cluster.voters]: rc 5 (not installed, names init-voter) until init-voter, then 0"

# --- 2. ocf-tester on node-a, node-b's daemon running -----------------------------------
# ocf-tester validates the metadata against resource-agents' ra-api-1.dtd, which in Debian 12
# (4.12) predates OCF 1.1: it lacks the reload-agent action and the reloadable attribute. An
# overlay gives it the DTD with just those two additions of the OCF 1.1 standard.
DTD_DIR=/usr/share/resource-agents
mkdir -p dtd-upper dtd-work
python3 - "$DTD_DIR/ra-api-1.dtd" dtd-upper/ra-api-1.dtd <<'PY' || fail "cannot extend ra-api-1.dtd with OCF 1.1"
import re, sys
dtd = open(sys.argv[1]).read()
dtd, n1 = re.subn(r"\|reload\|", "|reload|reload-agent|", dtd, count=1)
dtd, n2 = re.subn(r'(<!ATTLIST parameter[^>]*unique\s+\(1\|0\)\s+"0")>', r'\1\n        reloadable (1|0) "0">', dtd, count=1)
assert n1 == 1 and n2 == 1, (n1, n2)
open(sys.argv[2], "w").write(dtd)
PY
mount -t overlay ra-dtd -o "lowerdir=$DTD_DIR,upperdir=$PWD/dtd-upper,workdir=$PWD/dtd-work" "$DTD_DIR" ||
	fail "cannot put an overlay on $DTD_DIR"
OCF_ROOT=/usr/lib/ocf "$AGENT" meta-data | (cd "$DTD_DIR" && xmllint --noout --valid -) ||
	fail "the agent's metadata does not conform to ra-api-1.dtd (with OCF 1.1's additions)"
say "metadata: valid against ra-api-1.dtd with OCF 1.1's additions"
expect 0 "node-b up for ocf-tester" b resA a start
track_daemon b
# ocf-tester takes about 70 s under TCG; CI's hour is tight, so it runs with NVM_SOAK=1. The
# role checks below drive every action it does (and more) with the exit codes checked.
if [[ ${NVM_SOAK:-0} == 1 ]]; then
	say "ocf-tester on node-a (resA, ranges_of=node-a)"
	ocf-tester -v -n resA -o "config=$PWD/node-a.toml" -o ranges_of=node-a -o "nvmirrord=$NVMD" \
		-o "nvmirrorctl=$NVMCTL" -o "state_dir=$PWD/state-a" -o "run_dir=$PWD/run" \
		-o "daemon_log=$PWD/daemon-a.log" "$AGENT" >ocf-tester.log 2>&1 ||
		{ cat ocf-tester.log; fail "ocf-tester failed"; }
	grep -q "passed all tests" ocf-tester.log || { cat ocf-tester.log; fail "ocf-tester did not report success"; }
	tail -n 1 ocf-tester.log
	[[ -e run/node-a/nvmirrord.pid ]] && fail "ocf-tester's last stop left node-a's pid file"
	[[ -e /sys/class/ublk-char/ublkc0 ]] && fail "node-a's /dev/ublkb0 still exists after ocf-tester's stop"
	say "ocf-tester passed; node-a stopped cleanly, range 0 still node-a's (home demote keeps it)"
else
	say "ocf-tester not run (it runs with NVM_SOAK=1)"
fi
[[ $(owners b) == "node-a/remote node-b/local" ]] || fail "ranges with node-a stopped: $(owners b)"

# --- 3. roles ---------------------------------------------------------------------------
expect 0 "start" a resA a start
track_daemon a
expect 0 "start" a resB b start
expect 0 "start" b resB b start
[[ $(dpid a) != "$(dpid b)" ]] || fail "one daemon for both nodes?"
wait_link
expect 0 "started, not yet promoted (home, already serving)" a resA a monitor
expect 0 "probe of a started resource" a resA a monitor OCF_RESKEY_CRM_meta_interval=0
expect 0 "started on the partner" b resA a monitor
expect 0 "promote on the home node" a resA a promote
expect 0 "promote on the home node" b resB b promote
expect 8 "promoted on its home" a resA a monitor
expect 8 "probe of a promoted resource" a resA a monitor OCF_RESKEY_CRM_meta_interval=0
expect 0 "unpromoted on the partner" b resA a monitor
expect 8 "promoted on its home" b resB b monitor
expect 0 "unpromoted on the partner" a resB b monitor
want_score a resA 1000 "home node serving its ranges"
want_score b resA 10 "partner connected, ranges elsewhere"

say "a promote on node-b while node-a serves resA's ranges and is connected is refused"
expect 1 "promote against a live, connected owner" b resA a promote OCF_RESKEY_handover_wait=3
grep -q "node-a holds the ranges of node-a and is connected" agent-b.log || fail "no clear refusal message"
expect 0 "after the refused promote" b resA a monitor

# A crash under a promoted resource with writes in flight: the recurring monitor restarts the
# daemon in place (restart_crashed, the default). ublk recovery keeps /dev/ublkb0, so the
# writes waiting on the dead daemon complete without an error and read back; Pacemaker's own
# recovery would have had to unmount a filesystem from the dead device first.
head -c 8M /dev/urandom >inflight.bin
pid_a=$(dpid a)
(
	for i in $(seq 0 31); do
		timeout 90 dd if=inflight.bin of=/dev/ublkb0 bs=256K skip="$i" seek=$((64 + i)) count=1 \
			oflag=direct conv=notrunc status=none || exit 1
		sleep 0.05
	done
) &
writer=$!
sleep 0.5
say "kill -9 node-a's daemon (pid $pid_a) while a writer runs through /dev/ublkb0"
kill -9 "$pid_a"
for _ in $(seq 100); do alive "$pid_a" || break; sleep 0.1; done
alive "$pid_a" && fail "node-a's daemon survived kill -9"
expect 8 "promoted, daemon killed: restarted in place by the monitor" a resA a monitor
track_daemon a
[[ $(dpid a) != "$pid_a" ]] && alive "$(dpid a)" || fail "no new daemon after the monitor's restart"
grep -q "restarted in place (pid $(dpid a); restart 1 since boot" agent-a.log || fail "no restart warning in node-a's agent log"
grep -q "recovering /dev/ublkb0 left by a previous nvmirrord" daemon-a.log ||
	fail "the restarted daemon did not recover /dev/ublkb0 in place"
grep -q "crm_attribute -l reboot -n nvmirror-restarts-node-a -v 1" pcmk-attrs.log ||
	fail "no node attribute nvmirror-restarts-node-a=1"
wait "$writer" || fail "a write in flight across the crash failed (the device did not survive the restart)"
got=$(timeout 60 dd if=/dev/ublkb0 bs=1M skip=16 count=8 iflag=direct status=none | sha256sum | cut -d' ' -f1)
[[ $got == "$(sha256sum <inflight.bin | cut -d' ' -f1)" ]] || fail "the 8 MiB written across the crash read back wrong"
expect 0 "unpromoted resB on the restarted daemon" a resB b monitor
wait_link
say "ok: the monitor restarted node-a's daemon in place (pid $pid_a -> $(dpid a)); /dev/ublkb0 recovered, the writes in flight completed, 8 MiB read back"

# Data: 4 MiB at 1 MiB into range 0 (node-a's), with node-a's flusher paused: it exists only
# in node-a's NVRAM and in node-b's second store (a partition holds about 6 MiB here: more
# would wait for the paused flusher).
"$NVMCTL" --config node-a.toml flush pause >/dev/null
head -c 4M /dev/urandom >pattern.bin
want=$(sha256sum <pattern.bin | cut -d' ' -f1)
timeout 60 dd if=pattern.bin of=/dev/ublkb0 bs=1M seek=1 oflag=direct conv=fsync status=none ||
	fail "write through node-a"
held=$(st b | python3 -c 'import json,sys; print(json.load(sys.stdin)["engine"]["mirror"]["second_store"]["records"])')
((held > 0)) || fail "node-b's second store holds nothing of node-a's write"
say "4 MiB written through node-a (sha256 ${want:0:16}...), flusher paused; node-b holds $held mirrored record(s)"

pid_a=$(dpid a)
say "kill -9 node-a's daemon (pid $pid_a)"
kill -9 "$pid_a"
for _ in $(seq 100); do alive "$pid_a" || break; sleep 0.1; done
alive "$pid_a" && fail "node-a's daemon survived kill -9"
# restart_crashed=false: the crash is Pacemaker's to recover (the takeover below).
expect 9 "promoted, daemon killed" a resA a monitor OCF_RESKEY_restart_crashed=false
grep -q "is not running but resA is promoted here" agent-a.log || fail "no crash message for resA"
expect 1 "unpromoted, daemon killed" a resB b monitor OCF_RESKEY_restart_crashed=false
expect 9 "a probe never restarts the daemon" a resA a monitor OCF_RESKEY_CRM_meta_interval=0
for _ in $(seq 100); do link_up b || break; sleep 0.1; done
link_up b && fail "node-b still sees the link up 10 s after node-a's death"
expect 0 "partner dead, not yet promoted" b resA a monitor
want_score b resA 5 "partner gone, ranges elsewhere: takeover candidate"
grep -q "degraded: the partner link is down" agent-b.log || fail "no degraded warning on node-b"

say "promote resA on node-b: takeover with replay of node-a's mirrored writes"
expect 0 "promote on the survivor" b resA a promote
expect 8 "promoted on the survivor" b resA a monitor
want_score b resA 500 "the survivor serving the ranges it took over"
st b | python3 -c '
import json, sys
e = json.load(sys.stdin)["engine"]
t = e["takeover"]
assert t and t["phase"] == "done" and t["records_done"] > 0, t
assert [x["owner"] for x in e["ranges"]] == ["node-b", "node-b"], e["ranges"]
print("takeover:", t["phase"], t["records_done"], "record(s) replayed; epochs", [x["epoch"] for x in e["ranges"]])' ||
	fail "node-b's takeover"
got=$(timeout 60 dd if=/dev/ublkb1 bs=1M skip=1 count=4 iflag=direct status=none | sha256sum | cut -d' ' -f1)
[[ $got == "$want" ]] || fail "after the takeover node-b reads $got, node-a wrote $want"
say "node-b serves the 4 MiB node-a acknowledged: checksums match"

say "node-a: Pacemaker's recovery (demote, stop both resources), then start again"
expect 0 "demote with the daemon dead" a resA a demote
expect 0 "stop" a resA a stop
expect 0 "stop (last user of node-a's daemon: cleans up)" a resB b stop
expect 7 "stopped" a resA a monitor
expect 7 "stopped" a resB b monitor
nvm_wait_dev_gone 0 # stop deleted the dead daemon's quiesced /dev/ublkb0
expect 0 "start after the crash" a resA a start
track_daemon a
expect 0 "start" a resB b start
wait_link
expect 0 "restarted home node, ranges elsewhere" a resA a monitor
want_score a resA 900 "home node back and connected (failback)"
[[ $(owners a) == "node-b/remote node-b/remote" ]] || fail "node-a after its restart sees $(owners a)"

say "failback: demote on node-b (giveback), promote on node-a"
expect 0 "demote on the survivor = giveback" b resA a demote
expect 0 "after giveback" b resA a monitor
[[ $(owners b) == "node-a/remote node-b/local" ]] || fail "after giveback node-b sees $(owners b)"
expect 0 "promote on the home node" a resA a promote
expect 8 "promoted at home again" a resA a monitor
expect 0 "unpromoted on the partner" b resA a monitor
expect 8 "resB untouched" b resB b monitor
for dev in /dev/ublkb0 /dev/ublkb1; do
	got=$(timeout 60 dd if=$dev bs=1M skip=1 count=4 iflag=direct status=none | sha256sum | cut -d' ' -f1)
	[[ $got == "$want" ]] || fail "after failback $dev reads $got, want $want"
done
say "after failback both devices read node-a's 4 MiB correctly"

say "switchover: pre-demote notification names node-b as the promote target -> handover"
for n in a b; do
	expect 0 "notify pre-demote" $n resA a notify OCF_RESKEY_CRM_meta_notify_type=pre \
		OCF_RESKEY_CRM_meta_notify_operation=demote OCF_RESKEY_CRM_meta_notify_promote_uname="pcmk-b " \
		OCF_RESKEY_CRM_meta_notify_demote_uname=pcmk-a
done
expect 0 "demote on the home node with a promotion planned on node-b = handover" a resA a demote
[[ $(owners a) == "node-b/remote node-b/remote" ]] || fail "after handover node-a sees $(owners a)"
expect 0 "promote on node-b (the ranges are already there)" b resA a promote
expect 8 "promoted on node-b" b resA a monitor
expect 0 "demoted on node-a" a resA a monitor
for n in a b; do
	expect 0 "notify post-promote" $n resA a notify OCF_RESKEY_CRM_meta_notify_type=post \
		OCF_RESKEY_CRM_meta_notify_operation=promote OCF_RESKEY_CRM_meta_notify_promote_uname=pcmk-b
done
got=$(timeout 60 dd if=/dev/ublkb0 bs=1M skip=1 count=4 iflag=direct status=none | sha256sum | cut -d' ' -f1)
[[ $got == "$want" ]] || fail "after the switchover node-a (forwarding) reads $got"
expect 0 "switch back: demote on node-b = giveback" b resA a demote
expect 0 "promote at home" a resA a promote
expect 8 "promoted at home" a resA a monitor
expect 0 "unpromoted on node-b" b resA a monitor

say "demote of resB on node-b while it must move its ranges but node-a is gone -> refused"
# node-b serves its own range; a notification says Pacemaker promotes resB on node-a, and
# node-a's daemon is stopped cleanly (resA and resB stopped there).
expect 0 "demote (home keeps)" a resA a demote
expect 0 "stop" a resA a stop
expect 0 "stop" a resB b stop
expect 0 "notify" b resB b notify OCF_RESKEY_CRM_meta_notify_type=pre \
	OCF_RESKEY_CRM_meta_notify_operation=demote OCF_RESKEY_CRM_meta_notify_promote_uname=pcmk-a
expect 1 "handover with the partner gone" b resB b demote OCF_RESKEY_peer_wait=2
grep -q "it is not connected; node-b keeps serving them" agent-b.log || fail "no clear demote refusal"
expect 8 "still promoted after the refused demote" b resB b monitor

say "shared daemon: it stops only with the last resource of its config"
pid_b=$(dpid b)
expect 0 "stop resA on node-b (resB still uses the daemon)" b resA a stop
alive "$pid_b" || fail "node-b's daemon stopped although resB still runs there"
expect 8 "resB unaffected" b resB b monitor
rm -f run/node-b/resB.notify # the aborted transition's notification (Pacemaker's post-notify)
expect 0 "demote (home, no promotion elsewhere: keeps the range)" b resB b demote
expect 0 "stop the last resource" b resB b stop
for _ in $(seq 100); do alive "$pid_b" || break; sleep 0.2; done
alive "$pid_b" && fail "node-b's daemon still runs after its last resource stopped"
nvm_wait_dev_gone 1
expect 7 "stopped" b resB b monitor
expect 0 "stop of a stopped resource" b resB b stop
say "PASS: crm_resource --validate, the metadata, $([[ ${NVM_SOAK:-0} == 1 ]] && echo "ocf-tester, ")and the roles across kill -9, takeover, failback and switchover"
