#!/bin/bash
# Two nodes whose configs name DIFFERENT media (a mistake: claim set A needs one shared disk;
# shared-nothing mode does not exist yet). The disk lease cannot arbitrate then, and a
# takeover would serve this medium's stale copy of the partner's flushed writes. Each node
# must say so (log ERROR, status) while the link is up, and after node-a's kill -9 node-b
# must not take node-a's range over, by itself or when told to (a manual takeover).
# vm-timeout: 200
source "$NVM_REPO/tests/vm/lib/nvm.sh"
nvm_init
ma=$(nvm_medium medium-a 64)
mb=$(nvm_medium medium-b 64)
nvm_cluster_config a "$ma" auto tcp 127.0.0.1 7811
nvm_cluster_config b "$mb" auto tcp 127.0.0.1 7811
nvm_start node-a.toml daemon-a.log
pa=$NVM_LAST_PID
nvm_start node-b.toml daemon-b.log
for _ in $(seq 150); do nvm_status_has node-b.toml '"link": "Up' && break; sleep 0.2; done
nvm_status_has node-b.toml '"link": "Up' || fail "the mirror link did not come up"
# The check waits twice the lease's dead_after (3.5 s here) after the link came up.
for n in a b; do
	for _ in $(seq 100); do
		nvm_status_has node-$n.toml 'do not see the same medium' && break
		sleep 0.2
	done
	nvm_status_has node-$n.toml 'do not see the same medium' ||
		fail "node-$n's status does not report the different media"
	grep -q 'ERROR.*the two nodes do not see the same medium' daemon-$n.log ||
		fail "node-$n logged no error about the different media"
	say "ok: node-$n reports that the nodes do not see the same medium"
done
"$NVMCTL" --config node-b.toml status | grep '^takeover:'
say "kill -9 node-a"
kill -9 "$pa"
nvm_wait_gone "$pa"
# Longer than an automatic takeover takes on one shared medium (dead_after 3.5 s + link).
sleep 10
"$NVMCTL" --config node-b.toml status --json >st.json || fail "status of node-b"
python3 - <<'PY' || fail "node-b took node-a's range over although they do not share a medium"
import json, sys
e = json.load(open("st.json"))["engine"]
owners = [r["owner"] for r in e["ranges"]]
note = e.get("takeover_note") or ""
print("owners:", owners, "| takeover note:", note)
sys.exit(0 if "node-a" in owners and "same medium" in note else 1)
PY
say "ok: node-b did not take over, and says why"
# A manual takeover (what Pacemaker's promote runs) is refused for the same reason.
if out=$("$NVMCTL" --config node-b.toml takeover 2>&1); then
	fail "a manual takeover was accepted: $out"
fi
grep -q 'do not see the same medium' <<<"$out" || fail "takeover refused for another reason: $out"
say "ok: manual takeover refused: $out"
echo "ok: different media are reported and never taken over"
