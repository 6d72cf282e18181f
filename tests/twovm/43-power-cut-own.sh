#!/bin/bash
# tests/twovm/43-power-cut-own.sh - test 40's power cut in shared-nothing mode (issue #17).
# Runs ON THE HOST (a two-VM test; contract at the top of scripts/test.sh).
# twovm-timeout: 660
# soak-only: runs with NVM_SOAK=1 or when named (about 5 minutes under TCG: the CI hour has no
# room for it next to the rest; 29-own-storage and 31-own-fs-failover cover storage = "own"
# across kill -9 in CI)
#
# Two VMs, each with its own emulated NVDIMM as NVRAM and ITS OWN disk as the medium
# (`cluster.storage = "own"`), plus a 4 MiB disk both attach as the arbiter (ownership table
# and disk leases), and a virtio-net link carrying the mirror link (Soft-RoCE; TCP with
# NVM_PC_TRANSPORT=tcp).  node-a's flusher is paused, fio writes with verify through node-a
# into both ranges, the host SIGKILLs node-a's QEMU mid-write.  node-b takes range 0 over
# (arbiter lease), replays node-a's mirrored writes into ITS medium, marks node-a's medium
# outdated, and every acknowledged write verifies through node-b; node-b then writes
# [0,16M) alone.  node-a boots again: it replays nothing of the range it lost, node-b
# resyncs node-a's medium (the marks are withdrawn), gives range 0 back, and both fio
# verifies pass through both nodes.  Finally both nodes drain, `nvmirrorctl verify`
# reports each range identical on both media, and the host finds the two disk images
# byte-identical.  The scenario and its checks are 40-power-cut.sh's (NVM_PC_STORAGE=own).
# fio's trigger comes after 10 s here (test 40: 18 s): the verifies through both nodes at
# queue depth 1 are most of the test's time, and 10 s of writes still leave over a thousand
# records for node-b to replay.
set -euo pipefail
: "${NVM_REPO:?}"
NVM_PC_FIO_TRIGGER=${NVM_PC_FIO_TRIGGER:-10} NVM_PC_STORAGE=own exec bash "$NVM_REPO/tests/twovm/40-power-cut.sh"
