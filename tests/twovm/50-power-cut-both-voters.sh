#!/bin/bash
# tests/twovm/50-power-cut-both-voters.sh - test 41's power cut of both nodes with the quorum
# arbiter (issue #17: no disk both nodes see; the table and the leases on three voters).
# Runs ON THE HOST (a two-VM test; contract at the top of scripts/test.sh).
# twovm-timeout: 600
# soak-only: runs with NVM_SOAK=1 or when named (about 4 minutes under TCG; 36-voters covers
# the voters in CI, in one VM over TCP)
#
# Two VMs, each with its own emulated NVDIMM and ITS OWN disk (`storage = "own"`) and
# `[cluster.voters]`: each node's voter keeps its state on the results dir, and node-b's VM
# runs the tie-breaker (a test shortcut; in production a third machine), its state there too.
# Every link (mirror, the pair's vote link, the tie-breaker links) over Soft-RoCE (TCP with
# NVM_PC_TRANSPORT=tcp). node-a's flusher is paused, fio writes with verify through node-a
# into both ranges, and the host SIGKILLs both QEMUs at once. Only node-b boots again: the
# tie-breaker and node-b's voter restart from their states, which are a majority, so node-b
# takes its lease, finds node-a's heartbeat on the voters dead, takes range 0 over, replays
# node-a's mirrored writes into its own medium, marks node-a's medium outdated, and every
# write fio's verify state vouches for verifies through node-b. The scenario and its checks
# are 41-power-cut-both.sh's (NVM_PC_STORAGE=voters).
set -euo pipefail
: "${NVM_REPO:?}"
NVM_PC_STORAGE=voters exec bash "$NVM_REPO/tests/twovm/41-power-cut-both.sh"
