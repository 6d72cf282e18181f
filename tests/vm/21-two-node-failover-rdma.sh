#!/bin/bash
# The two-node acid test (20-two-node-failover) with the mirror link over RDMA (Soft-RoCE).
# vm-timeout: 600
# soak-only: runs with NVM_SOAK=1 or when named (CI has no room; over RDMA, CI takes a node
# over after a power cut in twovm/40 and 41, and partitions it in twovm/42)
NVM_TRANSPORT=rdma exec bash "$NVM_REPO/tests/vm/20-two-node-failover.sh"
