#!/bin/bash
# tests/twovm/49-power-cut-voters.sh - test 43's power cut with the quorum arbiter (issue #17).
# Runs ON THE HOST (a two-VM test; contract at the top of scripts/test.sh).
# twovm-timeout: 660
# soak-only: runs with NVM_SOAK=1 or when named (about 5 minutes under TCG; 36-voters covers
# the voters in CI, in one VM over TCP)
#
# Two VMs, each with its own emulated NVDIMM (device-DAX) and ITS OWN disk, no disk both see:
# `storage = "own"` with `[cluster.voters]`, the ownership table and the leases on three
# voters: each node's own (its state on the results dir, so node-a's survives its power
# cut) and an nvmirror-tiebreaker that node-b's VM runs (a test shortcut; in production a
# third machine). Every link, the pair's vote link and the tie-breaker links included, over
# Soft-RoCE (TCP with NVM_PC_TRANSPORT=tcp). Otherwise test 43: node-a's flusher is paused,
# fio writes with verify through node-a, the host SIGKILLs node-a's QEMU mid-write; node-b
# takes range 0 over on 2 of 3 voters (its own and the tie-breaker), replays node-a's
# mirrored writes into its medium, marks node-a's medium outdated, every acknowledged write
# verifies through node-b; node-a boots again (its voter state intact), node-b resyncs its
# medium and gives range 0 back, both verifies pass through both nodes, and the host finds
# the two disk images byte-identical.
set -euo pipefail
: "${NVM_REPO:?}"
NVM_PC_FIO_TRIGGER=${NVM_PC_FIO_TRIGGER:-10} NVM_PC_STORAGE=voters exec bash "$NVM_REPO/tests/twovm/40-power-cut.sh"
