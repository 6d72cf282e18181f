#!/bin/bash
# tests/twovm/48-power-cut-both-own.sh - test 41's power cut of both nodes in shared-nothing
# mode (issue #17: a power cut of either node; test 43 cuts node-a's, this one node-b's too).
# Runs ON THE HOST (a two-VM test; contract at the top of scripts/test.sh).
# twovm-timeout: 540
# soak-only: runs with NVM_SOAK=1 or when named (about 3.5 minutes under TCG: the CI hour has
# no room for it; 29-own-storage and 31-own-fs-failover cover storage = "own" across kill -9)
#
# Two VMs, each with its own emulated NVDIMM and ITS OWN disk as the medium
# (`cluster.storage = "own"`), a 4 MiB arbiter disk both attach (ownership table, disk
# leases, outdated-media marks) and a virtio-net link carrying the mirror link (Soft-RoCE;
# TCP with NVM_PC_TRANSPORT=tcp).  node-a's flusher is paused, fio writes with verify through
# node-a into both ranges (range 1 forwarded to node-b), and the host SIGKILLs both QEMUs at
# once.  Only node-b boots again (same NVDIMM, same disk, node-a's disk never comes back):
# its daemon replays its own log into its medium, rebuilds its second store from its NVRAM,
# finds node-a's heartbeat on the arbiter dead, takes range 0 over and replays node-a's
# mirrored writes into its own medium, and every write fio's verify state vouches for
# verifies through node-b's /dev/ublkb1.  The scenario and its checks are
# 41-power-cut-both.sh's (NVM_PC_STORAGE=own).
set -euo pipefail
: "${NVM_REPO:?}"
NVM_PC_STORAGE=own exec bash "$NVM_REPO/tests/twovm/41-power-cut-both.sh"
